"""Compose and Dockerfiles, checked as far as this machine allows: no Docker engine runs here.

- docker-compose.yml: validated against the compose specification, then its topology is run without
  containers: every embedpipe service's command and health check, as processes, against a real Redis
  and a real PostgreSQL with pgvector (service host names rewritten), through one real run. The overrides
  (gpu, models) validated and merged with it; the models one gives each model of EMBEDPIPE_MODELS an embedder.
- Dockerfiles: linted with hadolint.

Kubernetes is tests/test_kubernetes.py; the images' installs (pins, torch only in the embedder's) are
tests/test_installs.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from redis import Redis

from shared.settings import STAGES
from shared.store import open_store

from .helpers import EMBEDPIPE, EXAMPLES, LONGEST_JOB_S, REPO, SCALED, cli_env, embedpipe, tool, wait_until
from .servers import free_port

COMPOSE = REPO / "docker-compose.yml"
MODELS_COMPOSE = REPO / "docker-compose.models.yml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def seconds(value: str) -> int:
    return int(value.rstrip("s"))


@pytest.mark.slow
def test_compose_files_follow_the_compose_specification():
    gpu = REPO / "docker-compose.gpu.yml"
    for files in ([COMPOSE], [gpu], [MODELS_COMPOSE]):
        result = subprocess.run(
            [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", *map(str, files)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    if shutil.which("docker-compose"):  # Debian's docker-compose 1.29 also resolves and merges them
        env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"} | {"OPENAI_API_KEY": "sk-test"}
        for files in ([COMPOSE], [COMPOSE, gpu], [COMPOSE, MODELS_COMPOSE], [COMPOSE, gpu, MODELS_COMPOSE]):
            args = [a for f in files for a in ("-f", str(f))]
            result = subprocess.run(["docker-compose", *args, "config", "-q"], capture_output=True, text=True, env=env)
            assert result.returncode == 0, result.stderr
        # merged: an embed service per model, each naming its entry of EMBEDPIPE_MODELS
        args = ["-f", str(COMPOSE), "-f", str(MODELS_COMPOSE)]
        result = subprocess.run(["docker-compose", *args, "config"], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        assert_an_embedder_per_model(yaml.safe_load(result.stdout)["services"])
        # the API key comes from the environment: none, no stack
        del env["OPENAI_API_KEY"]
        result = subprocess.run(["docker-compose", *args, "config", "-q"], capture_output=True, text=True, env=env)
        assert result.returncode != 0 and "OPENAI_API_KEY" in result.stderr


def assert_an_embedder_per_model(services: dict) -> None:
    """Every embedpipe service has the same EMBEDPIPE_MODELS, and each model has an embed service of its own
    whose --model names its entry (as the worker resolves it: shared/lanes.py own_lane)."""
    from shared.lanes import lane_name, own_lane
    from shared.settings import Settings

    ours = {n: s for n, s in services.items() if s.get("image", "").startswith(("embedpipe:", "embedpipe-support:"))}
    assert {"janitor", "loader", "chunker", "writer", "cli", "embedder", "embedder-api"} <= set(ours)
    models_of = {n: s["environment"].get("EMBEDPIPE_MODELS") for n, s in ours.items()}
    [models] = set(models_of.values()) - {None}
    assert None not in models_of.values(), models_of  # every process, the same list
    entries = models.split(",")
    assert len(entries) == 2
    embedders = {n: s["command"] for n, s in ours.items() if s["command"][:2] == ["worker", "embed"]}
    served = {command[command.index("--model") + 1]: name for name, command in embedders.items()}
    assert set(served) == set(entries) and len(served) == len(embedders), embedders  # one service each
    for entry in entries:
        assert own_lane(Settings.from_env({"EMBEDPIPE_MODELS": models}, model=entry)).name == lane_name(entry)


def test_compose_scales_and_stops_safely():
    services = compose()["services"]
    for name in SCALED:
        service = services[name]
        assert "container_name" not in service and "ports" not in service, f"{name} would not scale"
        assert seconds(service["stop_grace_period"]) > LONGEST_JOB_S, f"{name} would be killed mid-job"
        assert service["environment"]["EMBEDPIPE_METRICS_PORT"] == "9100"
    gpu = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())["services"]["embedder"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    # lean images: torch only where the model runs
    stages = dockerfile_stages(REPO / "Dockerfile")
    assert stages[-1] == "embedder"  # a plain `docker build .` gives the full image, as before
    for name in ("janitor", "loader", "chunker", "writer"):
        assert services[name]["build"]["target"] == "support" and services[name]["image"].startswith(
            "embedpipe-support:"
        )
    for name in ("embedder", "cli"):
        assert services[name]["build"]["target"] == "embedder" and services[name]["image"].startswith("embedpipe:")
    assert {s["build"]["target"] for s in services.values() if "target" in s.get("build", {})} <= set(stages)
    redis_conf = (REPO / "deploy" / "redis" / "redis.conf").read_text().split("\n")
    assert "appendonly yes" in redis_conf and "maxmemory-policy noeviction" in redis_conf
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    # every replica, by DNS; embedder-api where docker-compose.models.yml adds it
    assert set(scrape[0]["dns_sd_configs"][0]["names"]) == {"janitor", *SCALED, "embedder-api"}


def test_compose_models_override_gives_each_model_an_embed_service():
    base, models = compose()["services"], yaml.safe_load(MODELS_COMPOSE.read_text())["services"]
    merged = {}  # as Compose merges the two files: keys replaced, environments merged
    for name, service in models.items():
        below = base.get(name, {})
        merged[name] = below | service | {"environment": below.get("environment", {}) | service["environment"]}
    assert_an_embedder_per_model(base | merged)
    api = merged["embedder-api"]
    # the key from the host's environment, never a default or a flag; the store's password it never needs
    assert api["environment"]["EMBEDPIPE_OPENAI_API_KEY"].startswith("${OPENAI_API_KEY:?")
    assert "PGPASSWORD" not in api["environment"] and not any("KEY" in a for a in api["command"])
    for key in ("stop_grace_period", "image", "build", "depends_on", "init", "restart"):
        assert api[key] == base["embedder"][key], key  # written out as the embedder's (no `extends`)
    # its health check checks the model it serves (embedpipe health --model: an API model has nothing on disk)
    model = api["command"][api["command"].index("--model") + 1]
    assert api["healthcheck"]["test"] == [*base["embedder"]["healthcheck"]["test"], "--model", model]


def test_rq_tools_are_offered_read_our_jobs_and_are_scraped():
    services = compose()["services"]
    dashboard, exporter = services["rq-dashboard"], services["rq-exporter"]
    assert dashboard["profiles"] == exporter["profiles"] == ["extras"]
    assert "--json" in dashboard["command"]  # our jobs are JSON: rq's default serializer is pickle
    assert dashboard["ports"][0].startswith("127.0.0.1:")
    assert "rq-dashboard==" in (REPO / dashboard["build"]["context"] / "Dockerfile").read_text()  # pinned
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    [rq] = [job for job in scrape if "rq-exporter" in job["dns_sd_configs"][0]["names"]]
    assert rq["dns_sd_configs"][0]["port"] == 9726  # rq-exporter's port
    for tool_service in (dashboard, exporter):  # the user the ACL lets maintain rq's keys, never `default`
        url = next(v for k, v in tool_service["environment"].items() if k.endswith("REDIS_URL"))
        assert url.startswith("redis://worker:")


def dockerfile_stages(path: Path) -> list[str]:
    import re

    return re.findall(r"^FROM \S+ AS (\S+)", path.read_text(), flags=re.MULTILINE)


@pytest.mark.slow
def test_the_compose_topology_runs_as_processes(redis_url, pg_url, tmp_path):
    """Each embedpipe service's command, environment and health check, minus the containers."""
    services = {n: s for n, s in compose()["services"].items() if "build" in s and not s.get("profiles")}
    assert set(services) == {"janitor", *SCALED}
    rewrite = {"redis://worker@redis:6379/0": redis_url, "postgresql://embedpipe@postgres:5432/embedpipe": pg_url}
    passwords = ("PGPASSWORD", "EMBEDPIPE_REDIS_PASSWORD")  # the test's own servers take none (tests/test_acl.py does)
    procs, logs, ports = {}, [], {}
    try:
        for name, service in services.items():
            env = {k: rewrite.get(str(v), str(v)) for k, v in service["environment"].items() if k not in passwords}
            env["EMBEDPIPE_METRICS_PORT"] = ports[name] = str(free_port())
            logs.append(open(tmp_path / f"{name}.log", "w"))
            procs[name] = subprocess.Popen([EMBEDPIPE, *service["command"]], env=cli_env(**env), stderr=logs[-1])
        env = cli_env(EMBEDPIPE_REDIS_URL=redis_url, EMBEDPIPE_STORE=pg_url)
        _wait_for_workers(Redis.from_url(redis_url), procs, tmp_path)
        for service in services.values():  # the health checks compose would run
            check = service["healthcheck"]["test"]
            assert check[0] == "CMD" and check[1] == "embedpipe"
            embedpipe(*check[2:], env=env)
        for name, port in ports.items():  # and the liveness Kubernetes probes, on the metrics port
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=10) as response:
                assert response.status == 200, name
        embedpipe("enqueue", str(EXAMPLES / "docs"), env=env)
        embedpipe("wait", "--timeout", "600", env=env, timeout=660)
        status = json.loads(embedpipe("status", "--json", env=env).stdout)
        assert status["documents_done"] == len(list((EXAMPLES / "docs").iterdir()))
        store = open_store(pg_url)
        assert store.count() > status["documents_done"]
        store.close()
    finally:
        for p in procs.values():
            p.terminate()
        codes = {n: p.wait(60) for n, p in procs.items()}
        for f in logs:
            f.close()
    assert codes == dict.fromkeys(codes, 0), codes


def _wait_for_workers(redis: Redis, procs: dict, logs: Path) -> None:

    from rq import Worker

    from shared.queues import queue

    def started() -> bool:
        assert all(p.poll() is None for p in procs.values()), f"a service exited; see {logs}"
        return all(Worker.count(queue=queue(redis, s, "")) for s in STAGES)

    wait_until(started, 240, f"the services started; see {logs}", interval_s=0.5)


@pytest.mark.slow
def test_dockerfiles_lint_clean():
    for dockerfile in (REPO / "Dockerfile", REPO / "deploy" / "rq-dashboard" / "Dockerfile"):
        result = subprocess.run([tool("hadolint"), str(dockerfile)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
