"""Deployment files, checked as far as this machine allows: no Docker engine and no cluster run here.

- docker-compose.yml: validated against the compose specification, then its topology is run without
  containers: every embedpipe service's command and health check, as processes, against a real Redis
  and a real PostgreSQL with pgvector (service host names rewritten), through one real run.
- deploy/ (Kustomize): rendered by a real kustomize, core resources validated against the Kubernetes
  schemas, KEDA ScaledObjects and the PodMonitor checked against the objects they point at.
- Dockerfile: linted with hadolint.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from redis import Redis

from shared.settings import STAGES
from shared.store import open_store

from .helpers import EMBEDPIPE, EXAMPLES, REPO, cli_env, embedpipe, wait_until
from .servers import free_port

COMPOSE = REPO / "docker-compose.yml"
SCALED = ("loader", "chunker", "embedder", "writer")
LONGEST_JOB_S = 60 + 131072 // 100  # the default embed timeout of a full part (shared/settings.py)


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(EMBEDPIPE).parent))
    if path is None:
        pytest.fail(f"{name} is not installed: run `make test`, which installs it")
    return path


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def seconds(value: str) -> int:
    return int(value.rstrip("s"))


@pytest.mark.slow
def test_compose_files_follow_the_compose_specification():
    for files in ([COMPOSE], [REPO / "docker-compose.gpu.yml"]):
        result = subprocess.run(
            [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", *map(str, files)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    if shutil.which("docker-compose"):  # Debian's docker-compose 1.29 also resolves and merges them
        for args in (["-f", str(COMPOSE)], ["-f", str(COMPOSE), "-f", str(REPO / "docker-compose.gpu.yml")]):
            result = subprocess.run(["docker-compose", *args, "config", "-q"], capture_output=True, text=True)
            assert result.returncode == 0, result.stderr


def test_compose_scales_and_stops_safely():
    services = compose()["services"]
    for name in SCALED:
        service = services[name]
        assert "container_name" not in service and "ports" not in service, f"{name} would not scale"
        assert seconds(service["stop_grace_period"]) > LONGEST_JOB_S, f"{name} would be killed mid-job"
        assert service["environment"]["EMBEDPIPE_METRICS_PORT"] == "9100"
    gpu = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())["services"]["embedder"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    redis_conf = (REPO / "deploy" / "redis" / "redis.conf").read_text().split("\n")
    assert "appendonly yes" in redis_conf and "maxmemory-policy noeviction" in redis_conf
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert set(scrape["dns_sd_configs"][0]["names"]) == {"janitor", *SCALED}  # every replica, by DNS


@pytest.mark.slow
def test_the_compose_topology_runs_as_processes(redis_url, pg_url, tmp_path):
    """Each embedpipe service's command, environment and health check, minus the containers."""
    services = {n: s for n, s in compose()["services"].items() if "build" in s and not s.get("profiles")}
    assert set(services) == {"janitor", *SCALED}
    rewrite = {"redis://worker@redis:6379/0": redis_url, "postgresql://embedpipe@postgres:5432/embedpipe": pg_url}
    passwords = ("PGPASSWORD", "EMBEDPIPE_REDIS_PASSWORD")  # the test's own servers take none (tests/test_acl.py does)
    procs, logs = {}, []
    try:
        for name, service in services.items():
            env = {k: rewrite.get(str(v), str(v)) for k, v in service["environment"].items() if k not in passwords}
            env["EMBEDPIPE_METRICS_PORT"] = str(free_port())
            logs.append(open(tmp_path / f"{name}.log", "w"))
            procs[name] = subprocess.Popen([EMBEDPIPE, *service["command"]], env=cli_env(**env), stderr=logs[-1])
        env = cli_env(EMBEDPIPE_REDIS_URL=redis_url, EMBEDPIPE_STORE=pg_url)
        _wait_for_workers(Redis.from_url(redis_url), procs, tmp_path)
        for service in services.values():  # the health checks compose would run
            check = service["healthcheck"]["test"]
            assert check[0] == "CMD" and check[1] == "embedpipe"
            embedpipe(*check[2:], env=env)
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
        return all(Worker.count(queue=queue(redis, s)) for s in STAGES)

    wait_until(started, 240, f"the services started; see {logs}", interval_s=0.5)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> list[dict]:
    """deploy/ rendered by kubectl's kustomize, with the example secrets; where no kubectl is
    installed (Debian's archive has none), the resource files as they are, unrendered."""
    if shutil.which("kubectl") is None:  # test_kustomize_renders_deploy reports the skip
        kustomization = yaml.safe_load((REPO / "deploy" / "kustomization.yaml").read_text())
        return [
            d for f in kustomization["resources"] for d in yaml.safe_load_all((REPO / "deploy" / f).read_text()) if d
        ]
    root = tmp_path_factory.mktemp("deploy") / "deploy"
    shutil.copytree(REPO / "deploy", root)
    shutil.copy(root / "k8s" / "secrets.env.example", root / "k8s" / "secrets.env")
    result = subprocess.run(["kubectl", "kustomize", str(root)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def by_kind(resources: list[dict], kind: str) -> dict[str, dict]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def test_kustomize_renders_deploy(rendered):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its kustomize) is not installed: the manifests were validated unrendered")
    kinds = {r["kind"] for r in rendered}
    assert {"ConfigMap", "Secret", "Namespace"} <= kinds  # the generators ran


@pytest.mark.slow
def test_kubernetes_manifests_are_valid(rendered, tmp_path):
    core = [r for r in rendered if r["kind"] not in ("ScaledObject", "PodMonitor")]
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump_all(core))
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", "1.32.0", "--quiet", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    if shutil.which("kubectl"):  # kustomize sets the namespace of everything
        assert {r["metadata"].get("namespace") for r in rendered if r["kind"] != "Namespace"} == {"embedpipe"}


def test_kubernetes_pools_scale_on_their_queues_and_stop_safely(rendered):
    deployments = by_kind(rendered, "Deployment")
    assert set(deployments) == {"janitor", *SCALED}
    for name, d in deployments.items():
        pod = d["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["readinessProbe"]["exec"]["command"][:2] == ["embedpipe", "health"]
        assert {p["name"] for p in container["ports"]} == {"metrics"}
        # no pod takes the whole secret: each names the keys it needs; the store's password only where
        # the store is opened, Postgres's own superuser password nowhere but in Postgres
        assert not [e for e in container["envFrom"] if "secretRef" in e], name
        keys_taken = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "valueFrom" in e}
        store = {"PGPASSWORD"} if name in ("chunker", "embedder", "writer") else set()
        assert keys_taken == {"EMBEDPIPE_REDIS_WORKER_PASSWORD", *store}, (name, keys_taken)
        assert pod["containers"][0]["securityContext"]["runAsNonRoot"]
        if name != "janitor":
            assert pod["terminationGracePeriodSeconds"] > LONGEST_JOB_S
    assert deployments["janitor"]["spec"]["replicas"] == 1
    assert deployments["janitor"]["spec"]["strategy"]["type"] == "Recreate"
    assert (
        deployments["embedder"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        == 1
    )
    stage_of = {"loader": "load", "chunker": "chunk", "embedder": "embed", "writer": "write"}
    scaled = by_kind(rendered, "ScaledObject")
    assert set(scaled) == set(SCALED)
    for name, so in scaled.items():
        assert so["apiVersion"] == "keda.sh/v1alpha1" and so["spec"]["scaleTargetRef"]["name"] in deployments
        [trigger] = so["spec"]["triggers"]
        assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == f"rq:queue:{stage_of[name]}"
        assert int(trigger["metadata"]["listLength"]) > 0 and so["spec"]["minReplicaCount"] >= 1
    [monitor] = by_kind(rendered, "PodMonitor").values()
    selector = monitor["spec"]["selector"]["matchLabels"]
    if shutil.which("kubectl"):  # kustomize's `labels` put the selected label on every pod
        for d in deployments.values():
            assert selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert by_kind(rendered, "StatefulSet")["redis"]["spec"]["volumeClaimTemplates"]
    redis = by_kind(rendered, "StatefulSet")["redis"]["spec"]["template"]["spec"]["containers"][0]
    assert redis["command"][:2] == ["sh", "/usr/local/etc/redis/start.sh"]  # the ACL users
    assert {e["name"] for e in redis["env"]} == {
        f"EMBEDPIPE_REDIS_{u}_PASSWORD" for u in ("ADMIN", "WORKER", "PRODUCER")
    }
    assert set(by_kind(rendered, "NetworkPolicy")) == {"redis", "postgres"}


@pytest.mark.slow
def test_dockerfile_lints_clean():
    result = subprocess.run([tool("hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
