"""deploy/k8s (Kustomize, a base and the overlays cpu, gpu and two-models), checked as far as this machine
allows (no cluster runs here): rendered by a real kustomize, core resources validated against the
Kubernetes schemas, every container checked against the "restricted" Pod Security Standard as the
admission controller would (tests/pod_security.py), KEDA, PodMonitor, PrometheusRule, NetworkPolicies and
PDBs checked against the objects they point at; the generated files current.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from . import pod_security
from .helpers import LONGEST_JOB_S, REPO, SCALED, tool

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
