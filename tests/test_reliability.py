"""Nothing lost: every submitted document ends stored completely or as a dead letter with a reason,
whatever is killed, restarted or fed to the pipeline. Real Redis, real worker processes."""

from __future__ import annotations

import http.server
import json
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import pytest
from redis import Redis

from shared.messages import SourceDoc
from shared.queues import queue
from shared.settings import STAGES, Settings
from shared.store import open_store
from workers.lease import LEASE_LOST_EXIT_CODE

from .helpers import (
    EXAMPLES,
    FAST_RECOVERY,
    assert_nothing_lost,
    cli_env,
    embedpipe,
    expected_chunks,
    short_documents,
    wait_until,
    worker_pool,
)
from .servers import free_port, redis_command, start_redis, wait_for_redis

pytestmark = pytest.mark.slow


def wait_busy(redis: Redis, stage: str, timeout_s: float = 20) -> bool:
    """Until a job of `stage` is running (so a kill lands mid-job), or the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if queue(redis, stage, "").started_job_registry.count:
            return True
        time.sleep(0.05)
    return False


def test_sigkilled_workers_of_every_pool_lose_nothing(redis_url, tmp_path, tokenizer):
    env = cli_env(EMBEDPIPE_REDIS_URL=redis_url, EMBEDPIPE_STORE=str(tmp_path / "store"), **FAST_RECOVERY)
    redis = Redis.from_url(redis_url)
    docs = short_documents(1000)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    with worker_pool(env, tmp_path / "logs", redis, workers={"load": 1, "chunk": 1, "embed": 2, "write": 1}) as pool:
        embedpipe("enqueue", str(tmp_path / "docs.jsonl"), env=env)
        rng = random.Random(11)
        killed = []  # each victim's exit code: -SIGKILL only if it was still running (not crashed) when killed
        for _round in range(2):  # every pool loses a worker mid-job twice; each is restarted at once
            for stage in rng.sample(STAGES, len(STAGES)):
                name = rng.choice([n for n in pool.commands if n.startswith(stage + "-")])
                wait_busy(redis, stage)
                killed.append(pool.kill(name))
                pool.start(name)
        killed.append(pool.kill("janitor"))  # the janitor too: its successor picks up where it was
        pool.start("janitor")
        # within pytest's own limit (900 s), so that a pipeline that never settles says where it stands
        settled = embedpipe("wait", "--timeout", "600", env=env, timeout=660, check=False).returncode == 0
        assert settled, f"not idle in 600 s: {embedpipe('status', '--json', env=env).stdout}; see {tmp_path / 'logs'}"
        assert all(pool.alive().values())
    assert killed == [-signal.SIGKILL] * 9, killed
    sources = [SourceDoc(d["id"], text=d["text"]) for d in docs]
    outcome = assert_nothing_lost(env, expected_chunks(Settings.from_env(env), sources, tokenizer))
    assert outcome["stored"] + outcome["dead"] == 1000
    pool.assert_clean_exit()


def test_sigterm_finishes_the_current_job_then_exits(redis_url, tmp_path, tokenizer):
    env = cli_env(EMBEDPIPE_REDIS_URL=redis_url, EMBEDPIPE_STORE=str(tmp_path / "store"), **FAST_RECOVERY)
    redis = Redis.from_url(redis_url)
    docs = short_documents(200)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    with worker_pool(env, tmp_path / "logs", redis) as pool:
        embedpipe("enqueue", str(tmp_path / "docs.jsonl"), env=env)
        registry = queue(redis, "embed", "").started_job_registry
        running = wait_until(lambda: registry.get_job_ids(cleanup=False), 20, "an embed job running")
        pool.procs["embed-0"].terminate()  # SIGTERM, as compose stop or a Kubernetes scale-in sends
        assert pool.procs["embed-0"].wait(120) == 0
        from rq.job import Job

        assert all(Job.fetch(j, connection=redis).get_status() == "finished" for j in running)  # not empty
        pool.start("embed-0")  # a new worker, new name: no clean-up needed
        embedpipe("wait", "--timeout", "600", env=env, timeout=660)
    sources = [SourceDoc(d["id"], text=d["text"]) for d in docs]
    expected = expected_chunks(Settings.from_env(env), sources, tokenizer)
    assert assert_nothing_lost(env, expected) == {"stored": 200, "dead": 0}
    pool.assert_clean_exit()


def test_a_redis_restart_mid_run_loses_nothing(tmp_path, tokenizer):
    """A redis-server of our own with AOF (as the compose file runs it), restarted mid-run."""
    port = free_port()
    data = tmp_path / "redis"
    data.mkdir()
    aof = ("--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction")
    command = redis_command(port, data, *aof)  # later flags win: AOF on, as the compose file runs Redis
    server, _ = start_redis(data, *aof, port=port)
    redis = Redis(port=port)
    env = cli_env(
        EMBEDPIPE_REDIS_URL=f"redis://127.0.0.1:{port}/0", EMBEDPIPE_STORE=str(tmp_path / "store"), **FAST_RECOVERY
    )
    docs = short_documents(300)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    try:
        with worker_pool(env, tmp_path / "logs", redis) as pool:
            embedpipe("enqueue", str(tmp_path / "docs.jsonl"), env=env)
            wait_busy(redis, "embed")
            redis.shutdown()  # AOF is flushed on shutdown; the workers lose their connection
            server.wait(30)
            time.sleep(30)  # longer than the Redis client's own retries (~25 s): rq and our loops must cope
            server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
            wait_for_redis(redis)
            # a worker that was mid-job could not renew its lease and ended itself: restart it, as the platform does
            exited = pool.restart_exited()
            assert set(exited.values()) <= {LEASE_LOST_EXIT_CODE}, f"exited otherwise: {exited}"
            embedpipe("wait", "--timeout", "900", env=env, timeout=960)
            assert all(pool.alive().values()), "a worker died instead of reconnecting"
            sources = [SourceDoc(d["id"], text=d["text"]) for d in docs]
            outcome = assert_nothing_lost(env, expected_chunks(Settings.from_env(env), sources, tokenizer))
            assert outcome == {"stored": 300, "dead": 0}
            logs = "".join(p.read_text() for p in (tmp_path / "logs").iterdir())
            assert "retrying with backoff" in logs  # the workers said what happened
    finally:
        server.terminate()
        server.wait(30)
    pool.assert_clean_exit()


def bad_corpus(root: Path) -> dict[str, tuple[str, str]]:
    """Files of every bad kind, and the (stage, reason) each must end with."""
    from pypdf import PdfWriter

    root.mkdir()
    (root / "empty.txt").write_text("")
    (root / "binary.bin").write_bytes(bytes(random.Random(1).randrange(256) for _ in range(4096)))
    (root / "mixed.txt").write_bytes("Déjà vu in UTF-8, ".encode() + "then Latin-1: déjà".encode("latin-1"))
    (root / "nul.txt").write_bytes(b"text with a NUL\x00 byte in it")
    with open(root / "huge.txt", "wb") as f:  # 50 MB, over the 20 MB default limit
        f.write(b"big words " * 5_000_000)
    (root / "longline.txt").write_text("x" * 1_000_000)
    (root / "allscript.html").write_text(
        "<html><head><script>let a = 1;</script></head><body><script>go()</script></body></html>"
    )
    (root / "corrupt.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\n% cut short")
    writer = PdfWriter()
    writer.add_blank_page(200, 200)
    writer.encrypt("secret")
    with open(root / "encrypted.pdf", "wb") as f:
        writer.write(f)
    (root / "records.jsonl").write_text(
        '{"id": "rec-1", "text": "A good record about tea."}\n{not json\n{"id": "rec-1", "text": "again"}\n'
    )
    return {
        "empty.txt": ("load", "empty"),
        "binary.bin": ("load", "unsupported_type"),
        "mixed.txt": ("load", "decode_error"),
        "nul.txt": ("load", "unsupported_type"),
        "huge.txt": ("submit", "too_large"),
        "longline.txt": ("load", "decode_error"),
        "allscript.html": ("load", "empty"),
        "corrupt.pdf": ("load", "decode_error"),
        "encrypted.pdf": ("load", "decode_error"),
        "records.jsonl:2": ("submit", "decode_error"),
        "rec-1 (duplicate 2)": ("submit", "decode_error"),
    }


def test_bad_input_becomes_exact_dead_letters_and_can_be_redriven(redis_url, tmp_path, tokenizer):
    env = cli_env(
        EMBEDPIPE_REDIS_URL=redis_url,
        EMBEDPIPE_STORE=str(tmp_path / "store"),
        EMBEDPIPE_FETCH_ALLOW="127.0.0.1",  # the test's own page server is on loopback
        **FAST_RECOVERY,
    )
    redis = Redis.from_url(redis_url)
    bad = bad_corpus(tmp_path / "bad")
    good = tmp_path / "good"
    good.mkdir()
    for name in ("docs/moon-phases.md", "web/bicycle-gears.html", "pdf/binoculars-for-stargazing.pdf"):
        (good / Path(name).name).write_bytes((EXAMPLES / name).read_bytes())
    url_port = free_port()  # nothing listens here yet
    url = f"http://127.0.0.1:{url_port}/later.html"
    with worker_pool(env, tmp_path / "logs", redis) as pool:
        embedpipe("enqueue", str(tmp_path / "bad"), str(good), url, env=env)
        redis.rpush(
            "embedpipe:inbox",
            b"this is not json",
            json.dumps({"v": 1, "text": "no id"}),
            json.dumps({"v": 1, "id": "wrong-types", "text": 42}),
            json.dumps({"v": 7, "id": "from-the-future", "text": "hello"}),
            msgpack.packb({"v": 1, "id": "inbox-good", "text": "Bees dance to share where flowers are."}),
        )
        embedpipe("wait", "--timeout", "600", env=env, timeout=660)
        assert all(pool.alive().values()), "a worker crashed on bad input"

        failed = json.loads(embedpipe("failed", "--json", env=env).stdout)["failed"]
        got = {f["doc_id"]: (f["stage"], f["reason"]) for f in failed}
        inbox_ids = [k for k in got if k.startswith("inbox:")]
        assert len(inbox_ids) == 2
        assert got == {
            **bad,
            url: ("load", "source_error"),
            "wrong-types": ("inbox", "decode_error"),
            "from-the-future": ("inbox", "decode_error"),
            **dict.fromkeys(inbox_ids, ("inbox", "decode_error")),
        }
        assert all(f["message"] and f["attempts"] == 1 for f in failed)
        only = json.loads(embedpipe("failed", "--json", "--reason", "source_error", env=env).stdout)["failed"]
        assert [f["doc_id"] for f in only] == [url]

        store = open_store(env["EMBEDPIPE_STORE"])
        stored = {
            d
            for d, ids in store.chunk_ids(
                ["moon-phases.md", "bicycle-gears.html", "binoculars-for-stargazing.pdf", "rec-1", "inbox-good"]
            ).items()
            if ids
        }
        assert stored == {
            "moon-phases.md",
            "bicycle-gears.html",
            "binoculars-for-stargazing.pdf",
            "rec-1",
            "inbox-good",
        }

        # The URL comes up: redriving its dead letter stores it and removes the dead letter.
        with _serve(url_port, b"<html><body><main><p>Kites fly on steady wind.</p></main></body></html>"):
            out = embedpipe("redrive", "--reason", "source_error", env=env).stdout
            assert "resubmitted 1 documents" in out
            embedpipe("wait", "--timeout", "300", env=env, timeout=360)
        assert store.chunk_ids([url])[url]
        assert url not in {f["doc_id"] for f in json.loads(embedpipe("failed", "--json", env=env).stdout)["failed"]}
    pool.assert_clean_exit()


class _Page(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


class _serve:
    def __init__(self, port: int, body: bytes) -> None:
        handler = type("Page", (_Page,), {"body": body})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)

    def __enter__(self) -> None:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_redis_password_from_the_environment_never_shows(tmp_path):
    server, port = start_redis(tmp_path, "--requirepass", "s3cret-pw")
    try:
        url = f"redis://127.0.0.1:{port}/0"
        ok = embedpipe("status", "--json", env=cli_env(EMBEDPIPE_REDIS_URL=url, EMBEDPIPE_REDIS_PASSWORD="s3cret-pw"))
        assert json.loads(ok.stdout)["mode"] == "distributed"
        secret_file = tmp_path / "pw"
        secret_file.write_text("s3cret-pw\n")
        embedpipe("status", env=cli_env(EMBEDPIPE_REDIS_URL=url, EMBEDPIPE_REDIS_PASSWORD_FILE=str(secret_file)))
        wrong = embedpipe(
            "status", env=cli_env(EMBEDPIPE_REDIS_URL=f"redis://:wrong-pw@127.0.0.1:{port}/0"), check=False
        )
        assert wrong.returncode == 1 and "wrong-pw" not in wrong.stdout + wrong.stderr
        assert "***" in wrong.stderr  # the URL it names is redacted
    finally:
        server.terminate()
        server.wait(10)


def test_rediss_urls_use_tls(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(tmp_path / "key.pem"),
            "-out",
            str(tmp_path / "cert.pem"),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    tls = [
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(tmp_path / "cert.pem"),
        "--tls-key-file",
        str(tmp_path / "key.pem"),
        "--tls-ca-cert-file",
        str(tmp_path / "cert.pem"),
        "--tls-auth-clients",
        "no",
        "--requirepass",
        "tls-secret",
    ]
    server = subprocess.Popen(redis_command(port, tmp_path, *tls), stdout=subprocess.DEVNULL)
    try:
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tmp_path / 'cert.pem'}"
        client = Redis.from_url(url, password="tls-secret")
        wait_for_redis(client)
        client.close()
        env = cli_env(
            EMBEDPIPE_REDIS_URL=url, EMBEDPIPE_REDIS_PASSWORD="tls-secret", EMBEDPIPE_STORE=str(tmp_path / "s")
        )
        (tmp_path / "doc.txt").write_text("Encrypted in transit.")
        assert "enqueued 1 documents" in embedpipe("enqueue", str(tmp_path / "doc.txt"), env=env).stdout
        embedpipe("worker", "load", "--burst", env=env)
        status = json.loads(embedpipe("status", "--json", env=env).stdout)
        assert status["stages"]["chunk"]["queued"] == 1  # the load worker did its job over TLS
    finally:
        server.terminate()
        server.wait(10)


def test_the_producer_waits_while_the_backlog_is_over_the_limit(redis_url, tmp_path):
    from producer.submit import submit
    from shared.settings import Settings

    settings = Settings.from_env({}, redis_url=redis_url, batch_docs=2, max_backlog_jobs=1)
    redis = Redis.from_url(redis_url)
    waits: list[str] = []
    docs = [SourceDoc(f"d{i}", text=f"Document number {i}.") for i in range(6)]  # 3 batches
    submitter = threading.Thread(target=submit, args=(redis, settings, docs), kwargs={"on_wait": waits.append})
    submitter.start()
    time.sleep(2)
    assert submitter.is_alive() and queue(redis, "load", "").count == 2  # held back
    assert waits[-1].startswith("2 jobs queued > 1 (EMBEDPIPE_MAX_BACKLOG_JOBS)")
    env = cli_env(EMBEDPIPE_REDIS_URL=redis_url, EMBEDPIPE_STORE=str(tmp_path / "store"), EMBEDPIPE_BATCH_DOCS="2")
    with worker_pool(env, tmp_path / "logs", redis) as pool:
        submitter.join(300)
        assert not submitter.is_alive()
        embedpipe("wait", "--timeout", "300", env=env, timeout=360)
        assert json.loads(embedpipe("status", "--json", env=env).stdout)["documents_done"] == 6
    pool.assert_clean_exit()
