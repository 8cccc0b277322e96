"""Prometheus, alerts and the Grafana dashboard, proven with a real Prometheus scraping real workers
during a real run: every panel's query must return data, not just parse."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml
from redis import Redis

from .helpers import EXAMPLES, REPO, Pool, cli_env, embedpipe, wait_until
from .servers import free_port

DASHBOARD = REPO / "grafana" / "dashboards" / "embedpipe.json"
DATASOURCES = REPO / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
# Grafana's variables, as it would substitute them for a 10-minute view scraped every second
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__range": "10m", "$__interval": "5s"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: run `make test`, which installs Debian's prometheus package")
    return path


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def test_dashboard_is_well_formed_and_uses_the_provisioned_data_source():
    dashboard = json.loads(DASHBOARD.read_text())
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 15
    for panel in dashboard["panels"]:
        assert panel["title"] and panel["targets"], panel
        assert panel["datasource"]["uid"] == uid
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"].strip()
    refs = {t["refId"] for p in dashboard["panels"] for t in p["targets"]}
    assert refs <= set("ABCDEFGH")


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

        empty = []
        for title, expr in panel_queries():
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            answer = json.loads(urllib.request.urlopen(url).read())
            assert answer["status"] == "success", (title, expr, answer)
            if not answer["data"]["result"]:
                empty.append(f"{title}: {expr}")
        assert not empty, "panels without data:\n" + "\n".join(empty)

        recent = _query(port, "embedpipe_recent_failure")
        assert {r["metric"]["doc_id"] for r in recent} == {"empty.txt"}
        assert float(_query(port, "embedpipe_quality_recall_at_10")[0]["value"][1]) >= 0.9
    finally:
        pool.stop()
        server.terminate()
        server.wait(30)
        prometheus_log.close()
    pool.assert_clean_exit()


def _query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    return json.loads(urllib.request.urlopen(url).read())["data"]["result"]
