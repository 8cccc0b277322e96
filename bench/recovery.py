"""Recovery benchmark: how long until the job of a SIGKILLed embed worker is redone, whatever its size.

    .venv/bin/python bench/recovery.py [--docs 128] [--model all-MiniLM-L6-v2] [--lease S] [--batch-docs 64]
                                       [--kill-after 2] [--keep-logs DIR] [--out FILE.json]

A private redis-server on a free port (tests/servers.py: nothing saved, never the Redis on 6379), the
janitor and real `embedpipe` workers (load 1, chunk 1, embed 2, write 1) with EMBEDPIPE_EMBED_TIMEOUT_S=3600,
so that rq's own recovery of a SimpleWorker's job (job_timeout + 60 s after its start) would take an
hour, and the first --docs SciFact documents (title + " " + text) enqueued as JSONL. Once the first
embed job has run --kill-after s, the worker running it (the execution's worker in rq's started
registry) is SIGKILLed and not restarted: the other embedder must redo the job. With the default 128
documents (two parts, one per embedder) nothing queues ahead of the redone job, so the figures are
the recovery itself; with more documents they include the backlog of the surviving embedder.

Reported, from rq's records of the killed job and of its part's write job (seconds after the kill):
  redone_from_s   the job started again on the other worker (its last execution's started_at): the
                  lease running out, the janitor's clean-up round (5 s), the first retry interval (5 s)
  job_done_s      that embed job finished;  part_written_s: its part's write job finished
  idle_s          `embedpipe wait` returned (the whole pipeline idle);  total_s: enqueue -> idle
and the outcome: each document stored with exactly the chunks that chunking it here gives (none lost,
partly stored or duplicated), dead letters. One human-readable line, then one JSON line. Exit status 1
if anything is lost or wrong. `measure_recovery(...)` returns the same dict for other benchmarks.
About a minute on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from redis import Redis  # noqa: E402
from rq.job import Job  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

from shared.messages import SourceDoc  # noqa: E402
from shared.queues import job_id  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.store import open_store  # noqa: E402
from tests.helpers import EMBEDPIPE, SCIFACT, Pool, cli_env, expected_chunks, process_of, running_job  # noqa: E402
from tests.servers import start_redis  # noqa: E402

EMBED_TIMEOUT_S = 3600
WORKERS = {"load": 1, "chunk": 1, "embed": 2, "write": 1}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def scifact_documents(n: int, scifact: Path = SCIFACT) -> list[dict[str, str]]:
    """The first n SciFact abstracts as title + " " + text, as bench/throughput.py embeds them."""
    docs = []
    with open(scifact / "corpus.jsonl") as f:
        for line in f:
            d = json.loads(line)
            docs.append({"id": d["_id"], "text": (d.get("title", "") + " " + d["text"]).strip()})
            if len(docs) == n:
                break
    return docs


def cli(env: dict[str, str], *args: str, timeout: float = 600) -> str:
    result = subprocess.run([EMBEDPIPE, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"embedpipe {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result.stdout


def measure_recovery(
    docs: int = 128,
    model: str = "all-MiniLM-L6-v2",
    lease_s: int | None = None,
    batch_docs: int = 64,
    kill_after_s: float = 2.0,
    scifact: Path = SCIFACT,
    keep_logs: Path | None = None,
) -> dict[str, Any]:
    """Kill the embed worker running the first embed job, mid-job, and time the job's recovery."""
    tmp = Path(tempfile.mkdtemp(prefix="embedpipe-recovery-"))
    server, pool = None, None
    try:
        (tmp / "redis").mkdir()
        server, port = start_redis(tmp / "redis")
        redis = Redis(port=port)
        sources = scifact_documents(docs, scifact)
        (tmp / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in sources))
        extra = {"EMBEDPIPE_JOB_LEASE_S": str(lease_s)} if lease_s else {}
        env = cli_env(
            EMBEDPIPE_REDIS_URL=f"redis://127.0.0.1:{port}/0",
            EMBEDPIPE_STORE=str(tmp / "store"),
            EMBEDPIPE_MODEL=model,
            EMBEDPIPE_EMBED_TIMEOUT_S=str(EMBED_TIMEOUT_S),
            EMBEDPIPE_BATCH_DOCS=str(batch_docs),
            EMBEDPIPE_LOG_LEVEL="INFO",
            **extra,
        )
        settings = Settings.from_env(env)
        pool = Pool(env, tmp / "logs", workers=WORKERS)
        log(f"starting {len(pool.commands)} processes")
        pool.start_all(redis)
        t0 = time.monotonic()
        cli(env, "enqueue", str(tmp / "docs.jsonl"))
        killed_job, worker_name = running_job(redis, "embed")
        victim = process_of(pool, redis, worker_name)
        time.sleep(kill_after_s)
        status = Job.fetch(killed_job, connection=redis, serializer=JSONSerializer).get_status()
        if status != "started":
            raise RuntimeError(f"job {killed_job} was {status} after {kill_after_s} s: lower --kill-after")
        killed_at = time.time()
        pool.kill(victim)
        log(f"killed {victim} (rq worker {worker_name}) {kill_after_s:g} s into {killed_job}")
        cli(env, "wait", "--timeout", "1800", timeout=1900)
        idle_s, total_s = time.time() - killed_at, time.monotonic() - t0
        codes, pool = pool.stop(), None
        job = Job.fetch(killed_job, connection=redis, serializer=JSONSerializer)
        batch_id, part = job.args
        write = Job.fetch(job_id("write", (batch_id, part), ""), connection=redis, serializer=JSONSerializer)
        logs = "".join(p.read_text(errors="replace") for p in sorted((tmp / "logs").glob("*.log")))
        embedded = re.findall(rf"embed {re.escape(batch_id)}/{part}: chunks=(\d+) .*?in ([\d.]+) s", logs)
        expected = expected_chunks(settings, [SourceDoc(d["id"], text=d["text"]) for d in sources])
        result = {
            "documents": docs,
            "model": model,
            "lease_s": settings.job_lease_s,
            "embed_timeout_s": EMBED_TIMEOUT_S,
            "workers": WORKERS,
            "killed": {"job": killed_job, "worker": victim, "after_s": kill_after_s},
            "job_chunks": int(embedded[-1][0]) if embedded else None,
            "job_seconds": float(embedded[-1][1]) if embedded else None,
            "redone_from_s": _after(job.started_at, killed_at),
            "job_done_s": _after(job.ended_at, killed_at),
            "part_written_s": _after(write.ended_at, killed_at),
            "idle_s": round(idle_s, 1),
            "total_s": round(total_s, 1),
            "job_status": job.get_status().value,
            "job_retries_left": job.retries_left,
            "redone_by_another_worker": job.latest_result().worker_name != worker_name,
            "outcome": outcome(env, expected),
            "exit_codes": {n: c for n, c in codes.items() if n != victim},
            "lease_exits": logs.count("exiting with code"),
        }
        return result
    finally:
        if pool is not None:
            pool.stop()
        if server is not None:
            server.terminate()
            server.wait(30)
        if keep_logs and (tmp / "logs").is_dir():
            shutil.copytree(tmp / "logs", keep_logs, dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _after(at: datetime | None, wall: float) -> float | None:
    if at is None:
        return None
    return round((at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp() - wall, 1)


def outcome(env: dict[str, str], expected: dict[str, set[str]]) -> dict[str, int]:
    """The store against the chunks each document must have: stored, lost, partly stored, duplicates."""
    store = open_store(env["EMBEDPIPE_STORE"])
    stored = store.chunk_ids(list(expected))
    dead = {d["doc_id"] for d in json.loads(cli(env, "failed", "--json", "--limit", "0"))["failed"]} & set(expected)
    complete = {d for d, ids in stored.items() if ids == expected[d]}
    return {
        "stored": len(complete),
        "dead_letters": len(dead),
        "lost": len(set(expected) - complete - dead),
        "partly_stored": sum(1 for d, ids in stored.items() if ids and ids != expected[d]),
        "duplicate_chunks": store.count() - sum(len(expected[d]) for d in complete),
        "chunks_expected": sum(map(len, expected.values())),
    }


def healthy(result: dict[str, Any]) -> bool:
    o = result["outcome"]
    return (
        result["job_status"] == "finished"
        and result["redone_by_another_worker"]
        and not (o["lost"] or o["partly_stored"] or o["duplicate_chunks"] or o["dead_letters"])
        and set(result["exit_codes"].values()) == {0}
    )


def summary(r: dict[str, Any]) -> str:
    o = r["outcome"]
    return (
        f"recovery: embed job of {r['job_chunks']} chunks ({r['job_seconds']} s of embedding) killed "
        f"{r['killed']['after_s']:g} s in; redone from {r['redone_from_s']} s after the kill on the other worker, "
        f"done at {r['job_done_s']} s, its part written at {r['part_written_s']} s; idle at {r['idle_s']} s "
        f"(total {r['total_s']} s); lease {r['lease_s']} s, embed timeout {r['embed_timeout_s']} s; "
        f"{o['stored']}/{r['documents']} documents stored, {o['lost']} lost, {o['duplicate_chunks']} duplicate chunks, "
        f"{o['dead_letters']} dead letters"
    )


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=128)
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--lease", type=int, help="EMBEDPIPE_JOB_LEASE_S (default: the setting's default)")
    parser.add_argument("--batch-docs", type=int, default=64, help="documents per batch: sizes the embed parts")
    parser.add_argument("--kill-after", type=float, default=2.0, help="seconds into the embed job")
    parser.add_argument("--scifact", type=Path, default=SCIFACT)
    parser.add_argument("--keep-logs", type=Path, help="copy the worker logs here at the end")
    parser.add_argument("--out", type=Path, help="write the result as JSON")
    args = parser.parse_args()
    if not (args.scifact / "corpus.jsonl").is_file():
        sys.exit(f"no SciFact corpus at {args.scifact}/corpus.jsonl: the benchmark needs the shared data set")
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM runs the clean-up, as Ctrl-C does
    result = measure_recovery(
        args.docs, args.model, args.lease, args.batch_docs, args.kill_after, args.scifact, args.keep_logs
    )
    print(summary(result))
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if healthy(result) else 1


if __name__ == "__main__":
    sys.exit(main())
