"""The CLI for scripts (issue 17, item 6): --json with a schema_version on every command that reports,
enqueue's batch IDs that `wait --batch` waits on, NDJSON from `status --watch --json`, exit 1 from
`run --fail-on-dead-letters`, and `failed`/`status` that say a store is missing."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from redis import Redis

from shared.store import open_store

from .helpers import EMBEDPIPE, EXAMPLES, cli_env, embedpipe, worker_pool

pytestmark = pytest.mark.slow


def corpus(root: Path) -> Path:
    root.mkdir()
    for name in ("docs/redis-basics.md", "docs/moon-phases.md", "docs/photosynthesis.txt"):
        shutil.copy(EXAMPLES / name, root / Path(name).name)
    (root / "blob.bin").write_bytes(bytes(range(256)) * 8)  # a dead letter: unsupported_type
    return root


def reported(*args: str, env: dict[str, str], check: bool = True) -> dict:
    result = embedpipe(*args, "--json", env=env, check=check)
    data = json.loads(result.stdout)
    assert data["schema_version"] == 1, (args, data)
    return data


def test_embedded_run_for_scripts(tmp_path: Path) -> None:
    env = cli_env(EMBEDPIPE_STORE=str(tmp_path / "store"))
    docs = corpus(tmp_path / "corpus")
    summary = reported("run", str(docs), env=env)
    assert summary["documents_stored"] == 3 and summary["failed"] == 1

    strict = embedpipe("run", str(docs), "--fail-on-dead-letters", env=env, check=False)
    assert strict.returncode == 1, strict
    assert strict.stderr.strip().splitlines() == ["Error: 1 documents failed: see `embedpipe failed`"]
    assert embedpipe("run", str(docs), env=env).returncode == 0  # without the flag: a summary, exit 0

    assert [f["doc_id"] for f in reported("failed", env=env)["failed"]] == ["blob.bin"]
    assert reported("status", env=env)["documents_done"] == 3
    hits = reported("search", "phases of the moon", "-k", "2", env=env)["hits"]
    assert len(hits) == 2 and hits[0]["doc_id"] == "moon-phases.md"
    only = reported("search", "phases of the moon", "--where", "source=redis-basics.md", env=env)["hits"]
    assert only and {h["doc_id"] for h in only} == {"redis-basics.md"}
    assert [c["active"] for c in reported("collections", env=env)["collections"]] == [True]
    assert reported("delete", "moon-phases.md", env=env)["deleted"] == 1

    for command in ("failed", "status"):  # a mistyped store is said, not taken for an empty one
        missing = embedpipe(command, "--store", str(tmp_path / "stroe"), env=env, check=False)
        assert missing.returncode == 1 and "no embedded run at" in missing.stderr, missing
        assert "no failed documents" not in missing.stdout


def test_distributed_for_scripts(tmp_path: Path, redis_url: str) -> None:
    env = cli_env(EMBEDPIPE_REDIS_URL=redis_url, EMBEDPIPE_STORE=str(tmp_path / "store"), EMBEDPIPE_BATCH_DOCS="2")
    docs = corpus(tmp_path / "corpus")
    sent = reported("enqueue", str(docs), env=env)
    assert sent["documents"] == 4 and len(sent["batch_ids"]) == sent["batches"] == 2  # the loaders refuse blob.bin
    batch_args = [a for b in sent["batch_ids"] for a in ("--batch", b)]

    # no workers yet: the batches are not settled, and the timeout holds
    pending = reported("wait", *batch_args, "--timeout", "1", env=env, check=False)
    assert pending["done"] is False
    unknown = embedpipe("wait", "--batch", "0-feed", env=env, check=False)
    assert unknown.returncode == 1 and "no batch 0-feed" in unknown.stderr

    watch = subprocess.Popen(
        [EMBEDPIPE, "status", "--watch", "0.2", "--json"], env=env, stdout=subprocess.PIPE, text=True
    )
    time.sleep(3)
    watch.send_signal(signal.SIGINT)
    out, _ = watch.communicate(timeout=30)
    lines = out.splitlines()
    assert len(lines) >= 2 and "\x1b" not in out, out  # NDJSON: one object a line, no screen codes
    assert all(json.loads(line)["schema_version"] == 1 for line in lines)

    with worker_pool(env, tmp_path / "logs", Redis.from_url(redis_url)):
        waited = embedpipe("wait", *batch_args, "--timeout", "300", "--json", "--progress", env=env)
        done = json.loads(waited.stdout)
        assert done["done"] is True and done["batch_ids"] == sent["batch_ids"]
        # the progress line, from the pipeline's counters: where it ended is the last one drawn
        assert re.search(r"waiting: 3 documents done, 1 failed, [\d.]+ documents/s\s*$", waited.stderr), waited.stderr
        assert set(open_store(env["EMBEDPIPE_STORE"]).doc_ids()) == {
            "redis-basics.md",
            "moon-phases.md",
            "photosynthesis.txt",
        }
        assert reported("health", "--stage", "write", env=env) == {"schema_version": 1, "ok": True, "stage": "write"}
    assert [f["doc_id"] for f in reported("failed", env=env)["failed"]] == ["blob.bin"]
