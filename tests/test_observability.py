"""Prometheus, alerts and the Grafana dashboard, proven with a real Prometheus scraping real workers
during a real run: every panel's query must return data, not just parse."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml
from redis import Redis

from .helpers import EMBEDPIPE, EXAMPLES, REPO, Pool, cli_env, embedpipe, wait_until
from .servers import free_port, start_redis

DASHBOARD = REPO / "grafana" / "dashboards" / "embedpipe.json"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
# Grafana's variables, as it would substitute them for a 10-minute view scraped every second
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__range": "10m", "$__interval": "5s"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: run `make test`, which installs Debian's prometheus package")
    return path


def panels(dashboard: dict) -> list[dict]:
    """Every panel but the rows, those inside collapsed rows included."""
    flat = [q for p in dashboard["panels"] for q in (p, *p.get("panels", []))]
    return [p for p in flat if p["type"] != "row"]


def panel_queries() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels(json.loads(DASHBOARD.read_text())) for t in p["targets"]]


def variables_in(text: str) -> set[str]:
    return set(re.findall(r"\$\{?(\w+)", text))


def test_dashboard_is_well_formed_with_collapsible_rows():
    dashboard = json.loads(DASHBOARD.read_text())
    every = [q for p in dashboard["panels"] for q in (p, *p.get("panels", []))]
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids)) and len(panels(dashboard)) >= 30
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    for wanted in ("Throughput", "Queues", "Embedding", "Quality", "Failures", "API", "Resources"):
        assert any(wanted in r for r in rows), (wanted, rows)
    assert all(p["type"] == "row" for p in dashboard["panels"] if p.get("collapsed"))
    for panel in panels(dashboard):
        assert panel["title"] and panel["targets"], panel
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
    refs = {t["refId"] for p in panels(dashboard) for t in p["targets"]}
    assert refs <= set("ABCDEFGH")
    used = {p["type"] for p in every if p["type"] != "row"}
    required = {r["id"] for r in dashboard["__requires"] if r["type"] == "panel"}
    assert used <= required, used - required
    for title in ("Pool utilisation", "Time queued", "Freshness", "Memory (RSS)", "CPU per pool"):
        assert any(p["title"].startswith(title) for p in panels(dashboard)), title


def test_dashboard_imports_under_a_data_source_of_any_uid():
    """What Grafana's import does: each ${DS_...} of __inputs becomes the uid of the data source the user
    picks. After that, every panel and query must follow the `datasource` variable (no uid of ours
    left, such as the provisioning's `prometheus`), and every query must select on the job and namespace
    variables, so that two installations on one Prometheus do not add up."""
    text = DASHBOARD.read_text()
    dashboard = json.loads(text)
    [ds_input] = dashboard["__inputs"]
    assert ds_input["type"] == "datasource" and ds_input["pluginId"] == "prometheus"
    assert {"datasource", "prometheus"} <= {r["type"] for r in dashboard["__requires"]} | {
        r["id"] for r in dashboard["__requires"]
    }
    placeholder = "${" + ds_input["name"] + "}"
    assert variables_in(text) & {ds_input["name"]}, "the import input is never used"
    imported = json.loads(text.replace(placeholder, "a-prometheus-of-another-uid"))
    variables = {v["name"]: v for v in imported["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == "a-prometheus-of-another-uid"
    follows = {"type": "prometheus", "uid": "${datasource}"}
    for name in ("job", "namespace"):
        assert variables[name]["datasource"] == follows
    assert variables["namespace"]["includeAll"] and variables["namespace"]["allValue"] == ".*"  # compose: no namespace
    builtins = {"__rate_interval", "__range", "__interval", "__all"}
    for panel in panels(imported):
        assert panel["datasource"] == follows, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == follows, (panel["title"], target["refId"])
            assert variables_in(target["expr"]) <= set(variables) | builtins, target["expr"]
            selectors = re.findall(r"\b(?:embedpipe|process)_\w+(\{[^}]*\})?", target["expr"])
            assert selectors, target["expr"]
            for selector in selectors:
                assert 'job=~"$job"' in selector and 'namespace=~"$namespace"' in selector, target["expr"]
    assert '"uid": "prometheus"' not in text  # the provisioned uid: absent wherever Grafana imports it


def test_failures_table_is_formatted():
    [table] = [p for p in panels(json.loads(DASHBOARD.read_text())) if p["type"] == "table"]
    [target] = table["targets"]
    assert target["format"] == "table" and target["instant"]
    # one row per document (several janitors report the same series), the Unix time in ms for Grafana
    assert target["expr"].startswith("max by (doc_id, stage, reason) (") and target["expr"].endswith(") * 1000")
    [organize] = [t["options"] for t in table["transformations"] if t["id"] == "organize"]
    assert organize["excludeByName"] == {"Time": True}
    assert organize["renameByName"]["Value"] == "Failed at"
    units = {
        o["matcher"]["options"]: p["value"]
        for o in table["fieldConfig"]["overrides"]
        for p in o["properties"]
        if p["id"] == "unit"
    }
    assert units == {"Failed at": "dateTimeAsIso"}


@pytest.mark.slow
def test_prometheus_config_and_alert_rules(tmp_path):
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp_path / "alerts.yml")
    config = (PROMETHEUS_DIR / "prometheus.yml").read_text().replace("/etc/prometheus/alerts.yml", "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(config)
    for args in (
        ["check", "config", str(tmp_path / "prometheus.yml")],
        ["check", "rules", str(PROMETHEUS_DIR / "alerts.yml")],
        ["test", "rules", str(PROMETHEUS_DIR / "alerts.test.yml")],
    ):
        result = subprocess.run([promtool(), *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    # every alert has a unit test that makes it fire
    alerts = {
        r["alert"] for g in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]
    }
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts.test.yml").read_text())["tests"]
    fired = {c["alertname"] for t in tests for c in t["alert_rule_test"] if c.get("exp_alerts")}
    assert fired == alerts


@pytest.mark.slow
def test_every_panel_shows_real_data_from_a_real_prometheus(redis_url, tmp_path):
    promtool()
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus is not installed: run `make test`"
    corpus = tmp_path / "corpus"
    shutil.copytree(EXAMPLES, corpus)
    (corpus / "empty.txt").write_text("")  # one dead letter, for the failures panels and table
    env = cli_env(
        EMBEDPIPE_REDIS_URL=redis_url,
        EMBEDPIPE_STORE=str(tmp_path / "store"),
        EMBEDPIPE_PROBE_EVAL=str(EXAMPLES / "eval"),
        EMBEDPIPE_INBOX_WAIT_S="0.2",
        EMBEDPIPE_BATCH_DOCS="8",
        EMBEDPIPE_PART_MAX_CHUNKS="16",
        EMBEDPIPE_LOG_LEVEL="INFO",
    )
    redis = Redis.from_url(redis_url)
    pool = Pool(env, tmp_path / "logs", metrics=True)
    port = free_port()
    targets = [f"127.0.0.1:{p}" for p in pool.metrics_ports.values()]
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [{"job_name": "embedpipe", "static_configs": [{"targets": targets}]}],
            }
        )
    )
    prometheus_log = open(tmp_path / "prometheus.log", "w")
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=prometheus_log,
    )
    try:
        pool.start_all(redis)
        embedpipe("enqueue", str(corpus), env=env)
        redis.rpush("embedpipe:inbox", json.dumps({"v": 1, "id": "inbox-1", "text": "Kites need steady wind."}))
        embedpipe("wait", "--timeout", "600", env=env, timeout=660)
        wait_until(
            lambda: json.loads(embedpipe("status", "--json", env=env).stdout)["probe"],
            180,
            "the quality probe ran after the pipeline went idle",
            interval_s=1,
        )
        embedpipe("wait", "--timeout", "300", env=env, timeout=360)
        time.sleep(6)  # a few more scrapes after the janitor's next export

        for name, metrics_port in pool.metrics_ports.items():
            exposition = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read()
            check = subprocess.run([promtool(), "check", "metrics"], input=exposition, capture_output=True)
            assert check.returncode == 0, f"{name}: {check.stdout.decode()}{check.stderr.decode()}"
            assert b'doc_id="' not in exposition or name == "janitor"  # only the bounded view has IDs

        values = _dashboard_variables(port)
        assert values["$job"] == "embedpipe"  # the job variable found the scrape job
        empty = []
        for title, expr in panel_queries():
            for var in sorted(values, key=len, reverse=True):
                expr = expr.replace(var, values[var])
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            answer = json.loads(urllib.request.urlopen(url).read())
            assert answer["status"] == "success", (title, expr, answer)
            if not answer["data"]["result"]:
                empty.append(f"{title}: {expr}")
        assert not empty, "panels without data:\n" + "\n".join(empty)

        recent = _query(port, "embedpipe_recent_failure")
        assert {r["metric"]["doc_id"] for r in recent} == {"empty.txt"}
        assert float(_query(port, "embedpipe_quality_recall_at_10")[0]["value"][1]) >= 0.9
        # the new series measure what they say: every job started was timed in its queue, every part
        # stored was timed from its submission, and the embedders were busy at least their model time
        for stage in ("load", "chunk", "embed", "write"):
            started = _value(port, f'sum(embedpipe_queue_wait_seconds_count{{stage="{stage}"}})')
            finished = _value(port, f'sum(embedpipe_jobs_total{{stage="{stage}"}})')
            assert started == finished > 0, (stage, started, finished)
        write_jobs = _value(port, 'sum(embedpipe_jobs_total{stage="write",outcome="ok"})')
        assert _value(port, "sum(embedpipe_freshness_seconds_count)") >= write_jobs - 1  # finalize/prune: no part
        assert _value(port, "sum(embedpipe_freshness_seconds_count)") > 0
        busy = _value(port, 'sum(embedpipe_worker_busy_seconds_total{stage="embed"})')
        assert busy >= _value(port, "sum(embedpipe_embed_job_seconds_sum)") > 0
        stages = {r["metric"]["stage"] for r in _query(port, "embedpipe_process_info")}
        assert stages == {"janitor", "load", "chunk", "embed", "write"}
        for name, metrics_port in pool.metrics_ports.items():  # every process's loop is live
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/livez") as response:
                assert response.status == 200 and response.read().startswith(b"ok: "), name
    finally:
        pool.stop()
        server.terminate()
        server.wait(30)
        prometheus_log.close()
    pool.assert_clean_exit()


def _query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    return json.loads(urllib.request.urlopen(url).read())["data"]["result"]


def _value(port: int, expr: str) -> float:
    [result] = _query(port, expr)
    return float(result["value"][1])


def _dashboard_variables(port: int) -> dict[str, str]:
    """Grafana's built-ins, then each query variable as Grafana fills it in: label_values(...) asked
    of the real Prometheus; the first value, or the `All` value where the variable defaults to All."""
    values = dict(GRAFANA_VARIABLES)
    for var in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]
        for name in sorted(values, key=len, reverse=True):
            query = query.replace(name, values[name])
        series, label = re.fullmatch(r"label_values\((.+), *(\w+)\)", query).groups()
        url = f"http://127.0.0.1:{port}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": series})
        found = sorted(json.loads(urllib.request.urlopen(url).read())["data"])
        if var.get("includeAll") and (not found or var["current"].get("value") == ["$__all"]):
            values["$" + var["name"]] = var["allValue"]
        else:
            assert found, f"the {var['name']} variable finds nothing: {var['query']}"
            values["$" + var["name"]] = found[0]
    return values


# --- liveness: GET /livez on the metrics port reports the worker's own loop -----------------------


class _HeldPage(http.server.BaseHTTPRequestHandler):
    """A page whose response waits until the test releases it: a fetch that keeps a load job running."""

    release = threading.Event()

    def do_GET(self) -> None:
        self.release.wait(60)
        body = b"A page that took its time to arrive, as slow servers do."
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _livez(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


def _start_loader(env: dict[str, str], log_path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [EMBEDPIPE, "worker", "load"], env=env | {"EMBEDPIPE_METRICS_PORT": str(port)}, stderr=log
        )
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"the loader exited; see {log_path}"
        assert time.monotonic() < deadline, f"the loader served no /livez; see {log_path}"
        try:
            if _livez(port)[0] == 200:
                return proc, port
        except OSError:  # not listening yet
            pass
        time.sleep(0.2)


@pytest.mark.slow
def test_liveness_fails_while_a_job_blocks_the_loop_and_recovers(redis_url, tmp_path):
    """A load job held by a slow page keeps the loader's loop from coming round for longer than the
    stuck-job limit (2 s here): /livez turns 503 and names the job; once the page arrives and the job
    ends, the loop comes round and /livez is 200 again."""
    page = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HeldPage)
    _HeldPage.release.clear()
    threading.Thread(target=page.serve_forever, daemon=True).start()
    env = cli_env(
        EMBEDPIPE_REDIS_URL=redis_url,
        EMBEDPIPE_STORE=str(tmp_path / "store"),
        EMBEDPIPE_FETCH_ALLOW="127.0.0.1",
        EMBEDPIPE_STUCK_JOB_S="2",
    )
    proc, port = _start_loader(env, tmp_path / "loader.log")
    redis = Redis.from_url(redis_url)
    try:
        # /livez answers from the start ("starting an rq worker"); the loop then reaches its wait
        wait_until(lambda: _livez(port)[1].startswith("ok: waiting for a job"), 120, "the loader waiting for a job")
        embedpipe("enqueue", f"http://127.0.0.1:{page.server_port}/slow.txt", env=env)
        seen: list[tuple[int, str]] = []
        deadline = time.monotonic() + 30
        while not seen or seen[-1][0] != 503:
            assert time.monotonic() < deadline, f"/livez never reported the blocked loop: {seen[-3:]}"
            seen.append(_livez(port))
            time.sleep(0.25)
        assert seen[-1][1].startswith("stuck: job load_"), seen[-1]
        assert proc.poll() is None  # the endpoint says so; the platform, not the worker, restarts it
        _HeldPage.release.set()
        deadline = time.monotonic() + 30
        while redis.llen("rq:queue:chunk") == 0 or _livez(port)[0] != 200:
            assert time.monotonic() < deadline, f"the loop did not come round after the job: {_livez(port)}"
            time.sleep(0.25)
    finally:
        _HeldPage.release.set()
        page.shutdown()
        page.server_close()
        proc.terminate()
        proc.wait(60)


@pytest.mark.slow
def test_liveness_stays_ok_through_a_redis_outage(tmp_path):
    """Redis stopped for ~15 s and started again: the dependency check (`embedpipe health`, the
    readiness probe) fails meanwhile, /livez never does, and the loader goes on working afterwards."""
    redis_port = free_port()
    server, _ = start_redis(tmp_path, port=redis_port)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = cli_env(EMBEDPIPE_REDIS_URL=redis_url, EMBEDPIPE_STORE=str(tmp_path / "store"))
    proc, port = _start_loader(env, tmp_path / "loader.log")
    answers: list[tuple[int, str]] = []
    try:
        server.terminate()
        server.wait(10)
        outage_ends = time.monotonic() + 15
        health = embedpipe("health", "--stage", "load", env=env, check=False)
        assert health.returncode != 0, "the dependency check should fail while Redis is down"
        while time.monotonic() < outage_ends:
            answers.append(_livez(port))
            time.sleep(0.5)
        server, _ = start_redis(tmp_path, port=redis_port)
        embedpipe("enqueue", str(EXAMPLES / "docs"), env=env)
        redis = Redis.from_url(redis_url)
        deadline = time.monotonic() + 90
        while redis.llen("rq:queue:chunk") == 0:  # the loader took the load job and passed it on
            assert time.monotonic() < deadline, f"the loader did not resume; see {tmp_path / 'loader.log'}"
            answers.append(_livez(port))
            time.sleep(0.5)
        answers.append(_livez(port))
        assert proc.poll() is None
        assert len(answers) > 20 and all(code == 200 for code, _ in answers), [a for a in answers if a[0] != 200]
    finally:
        proc.terminate()
        proc.wait(60)
        server.terminate()
        server.wait(10)


def test_freshness_reads_the_submission_time_from_the_batch_id():
    from producer.submit import new_batch_id
    from shared.metrics import submitted_at_s

    assert abs(submitted_at_s(new_batch_id()) - time.time()) < 5
    for foreign in ("not-a-batch", "", "ffffffffffffff-00", "0-00"):  # IDs come from Redis: never trusted
        assert submitted_at_s(foreign) is None
