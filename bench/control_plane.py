"""The control plane at scale: does housekeeping keep up with a million documents, and do the commands
an operator runs stay fast with a big backlog of failures?

    python bench/control_plane.py [--inbox 1000000] [--dead 100000] [--jobs 10000] [--baseline REV]
                                  [--memory-docs 2560] [--model DIR] [--out FILE.json]

Each code tree (this one, and with --baseline REV that revision's shared/, workers/ and producer/, read
from git) is measured in a process of its own against a private redis-server of its own:

  inbox     --inbox small JSON documents (one SciFact sentence each) pushed into the inbox; the janitor's
            rounds (Janitor.tick, in-process: every housekeeping step, as it runs) batch them into load
            jobs: documents/s over the whole inbox, or over --janitor-seconds if that ends first (the
            rounds run the same on an inbox of 1M or 10 messages: the batches come off its head).
  backlog   --dead dead letters (spread over stages and reasons) and --jobs queued jobs (load and embed),
            then the wall time of `embedpipe status --json`, `embedpipe failed` and `failed --json`
            (whole CLI processes; `embedpipe --help` gives the floor: Python and the CLI's imports), the
            janitor's export step (the gauges it sets from Redis), a scrape of its /metrics (its size in
            series) and one whole janitor round with every step due; then --failed-jobs jobs that failed
            for good (an outage) and the next janitor round.
  memory    (this tree, --memory-docs > 0) Redis memory per document in flight: --memory-docs SciFact
            abstracts pushed into the inbox, then each pool in turn (`embedpipe janitor --burst`, then
            `embedpipe worker STAGE --burst`) with a static model: Redis's used_memory over the empty
            database's, per document, after each step. The figure to size Redis by.

The CPU is printed first: compare the trees side by side in one run, not with figures from elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE)]

import fast  # noqa: E402  (bench/fast.py: cpu_name, static_model)
import harness as h  # noqa: E402  (bench/harness.py: write_docs, clean_env, EMBEDPIPE)

TREES = ("shared", "workers", "producer")


# --- in the child (PYTHONPATH = the tree measured) --------------------------------------------------


def sentences(n: int, scifact: Path) -> list[str]:
    """n short texts, deterministic: SciFact's sentences in order, repeated with a counter past the end."""
    out: list[str] = []
    with (scifact / "corpus.jsonl").open() as f:
        for line in f:
            out += [s.strip() + "." for s in json.loads(line)["text"].split(". ") if len(s) > 40]
            if len(out) >= n:
                break
    return [out[i % len(out)] + (f" ({i // len(out)})" if i >= len(out) else "") for i in range(n)]


def used_memory(redis) -> int:
    return int(redis.info("memory")["used_memory"])


def child_inbox(redis_url: str, n: int, seconds: float, scifact: str) -> dict:
    from redis import Redis

    from shared import keys
    from shared.settings import Settings
    from workers.janitor import Janitor

    redis = Redis.from_url(redis_url)
    empty = used_memory(redis)
    texts = sentences(min(n, 200_000), Path(scifact))
    started = time.perf_counter()
    for start in range(0, n, 10_000):
        msgs = [
            json.dumps({"v": 1, "id": f"doc-{i}", "text": texts[i % len(texts)]}).encode()
            for i in range(start, min(n, start + 10_000))
        ]
        redis.rpush(keys.DEFAULT.INBOX, *msgs)
    fill_s = time.perf_counter() - started
    in_inbox = used_memory(redis) - empty
    # no workers here: a backlog limit would stop the batching at 2,000 load jobs (backpressure)
    janitor = Janitor(Settings.from_env({}, redis_url=redis_url, max_backlog_jobs=10**9), redis)
    taken, rounds = 0, 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        got = janitor.tick()
        taken += got
        rounds += 1
        if not got and redis.llen(keys.DEFAULT.INBOX) == 0:
            break
    elapsed = time.perf_counter() - started
    return {
        "documents": n,
        "fill_s": round(fill_s, 2),
        "inbox_bytes_per_document": round(in_inbox / n),
        "batched": taken,
        "rounds": rounds,
        "seconds": round(elapsed, 2),
        "documents_per_s": round(taken / elapsed),
        "left_in_inbox": int(redis.llen(keys.DEFAULT.INBOX)),
    }


def cli_seconds(env: dict[str, str], *args: str, best_of: int = 2) -> float:
    times = []
    for _ in range(best_of):
        started = time.perf_counter()
        subprocess.run([h.EMBEDPIPE, *args], env=env, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - started)
    return round(min(times), 3)


def child_backlog(redis_url: str, dead: int, jobs: int, failed_jobs: int) -> dict:
    from prometheus_client import REGISTRY, generate_latest
    from redis import Redis

    from shared import keys
    from shared.errors import REASONS
    from shared.ledger import RedisLedger
    from shared.messages import DeadLetter
    from shared.queues import distributed_status, enqueue_jobs, queue
    from shared.settings import Settings
    from workers.janitor import Janitor, export_state

    redis = Redis.from_url(redis_url)
    settings = Settings.from_env({}, redis_url=redis_url)
    ledger = RedisLedger(redis, keys.DEFAULT)
    stages = ("inbox", "load", "chunk", "embed", "write")
    now = time.time()
    for start in range(0, dead, 1000):
        letters = [
            DeadLetter(
                f"failed-{i}",
                stages[i % len(stages)],
                REASONS[i % len(REASONS)],
                f"document {i} could not be read: a message of some length, as real ones are",
                at=now - dead + i,
                source={"id": f"failed-{i}", "text": "x" * 200},
            )
            for i in range(start, min(dead, start + 1000))
        ]
        ledger.add_dead(letters)
    for stage, share in (("load", jobs // 2), ("embed", jobs - jobs // 2)):
        for start in range(0, share, 1000):
            args = [
                (f"batch{i}",) if stage == "load" else (f"batch{i}", 0) for i in range(start, min(share, start + 1000))
            ]
            with redis.pipeline() as pipe:
                enqueue_jobs(queue(redis, stage, ""), settings, stage, args, pipe)
                pipe.execute()
    env = h.clean_env(EMBEDPIPE_REDIS_URL=redis_url, PYTHONPATH=os.environ["PYTHONPATH"])  # the tree measured

    def best(f, n: int = 3) -> float:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            f()
            times.append(time.perf_counter() - started)
        return round(min(times), 3)

    janitor = Janitor(settings, redis)

    def whole_round() -> None:
        janitor._last_clean = janitor._last_export = float("-inf")  # every step due
        janitor.tick()

    status = distributed_status(redis, settings)
    scrape = generate_latest(REGISTRY)
    measured = {
        "dead_letters": ledger.dead_count(),
        "queued_jobs": sum(s["queued"] for s in status["stages"].values()),
        "cli_floor_s": cli_seconds(env, "--help"),
        "status_cli_s": cli_seconds(env, "status", "--json"),
        "failed_cli_s": cli_seconds(env, "failed"),
        "failed_json_cli_s": cli_seconds(env, "failed", "--json"),
        "failed_lines": subprocess.run(
            [h.EMBEDPIPE, "failed"], env=env, capture_output=True, text=True, check=True
        ).stdout.count("\n"),
        "status_s": best(lambda: distributed_status(redis, settings)),
        "export_s": best(lambda: export_state(redis, "", ledger, distributed_status(redis, settings))),
        "scrape_s": best(lambda: generate_latest(REGISTRY)),
        "scrape_series": sum(1 for line in scrape.splitlines() if line and not line.startswith(b"#")),
        "scrape_bytes": len(scrape),
        "janitor_round_s": best(whole_round),
    }
    # jobs that failed for good in an outage (their batches' payloads gone): the next round expands them
    for start in range(0, failed_jobs, 1000):
        args = [(f"lost{i}",) for i in range(start, min(failed_jobs, start + 1000))]
        with redis.pipeline() as pipe:
            enqueue_jobs(queue(redis, "chunk", ""), settings, "chunk", args, pipe)
            pipe.execute()
    chunk_queue = queue(redis, "chunk", "")
    ids = [i.decode() for i in redis.lrange(chunk_queue.key, 0, -1)]
    redis.delete(chunk_queue.key)
    redis.zadd(chunk_queue.failed_job_registry.key, {i: time.time() + 86400 for i in ids})
    started = time.perf_counter()
    whole_round()
    measured["failed_jobs"] = len(ids)
    measured["round_with_failed_jobs_s"] = round(time.perf_counter() - started, 3)
    measured["failed_jobs_left"] = chunk_queue.failed_job_registry.get_job_count(cleanup=False)
    return measured


def child_memory(redis_url: str, docs: int, scifact: str, model: str) -> dict:
    """Redis's used_memory over the empty database's, per document, after each pool has run its queue."""
    from redis import Redis

    from shared import keys

    redis = Redis.from_url(redis_url)
    with tempfile.TemporaryDirectory(prefix="embedpipe-cp-") as tmp:
        docs_file = Path(tmp) / "docs.jsonl"
        h.write_docs(docs, docs_file, Path(scifact))
        env = h.clean_env(
            EMBEDPIPE_REDIS_URL=redis_url, EMBEDPIPE_STORE=str(Path(tmp) / "store"), EMBEDPIPE_MODEL=model
        )
        empty = used_memory(redis)
        redis.rpush(keys.DEFAULT.INBOX, *docs_file.read_bytes().splitlines())
        steps = {"in the inbox": None, "batched (janitor)": ["janitor", "--burst"]}
        steps |= {f"after the {s} pool": ["worker", s, "--burst"] for s in ("load", "chunk", "embed", "write")}
        out = {}
        for name, cmd in steps.items():
            if cmd:
                subprocess.run(
                    [h.EMBEDPIPE, *cmd], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True
                )
            out[name] = round((used_memory(redis) - empty) / docs)
        # what each kind of key holds now, to see what stays behind
        by_kind: dict[str, int] = {}
        for key in redis.scan_iter(count=1000):
            kind = key.decode().split(":")[1] if key.startswith(b"embedpipe:") else key.decode().split(":")[0]
            by_kind[kind] = by_kind.get(kind, 0) + int(redis.memory_usage(key) or 0)
        counters = {k.decode(): int(v) for k, v in redis.hgetall(keys.DEFAULT.COUNTERS).items()}
    return {"documents": docs, "bytes_per_document": out, "left_by_key_kind": by_kind, "counters": counters}


# --- the parent ---------------------------------------------------------------------------------------


def tree_of(rev: str, tmp: Path) -> Path:
    """REV's shared/, workers/ and producer/, unpacked from git."""
    out = tmp / f"tree-{rev}"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, *TREES], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def run_child(tree: Path, tmp: Path, *args: str) -> dict:
    """This script's child in a process of its own, importing `tree`, with a fresh private Redis."""
    from tests.servers import start_redis

    workdir = Path(tempfile.mkdtemp(dir=tmp))
    redis, port = start_redis(workdir)
    try:
        env = {**h.clean_env(), "PYTHONPATH": os.pathsep.join([str(tree), str(ROOT)])}
        cmd = [sys.executable, __file__, "--child", args[0], f"redis://127.0.0.1:{port}/0", *args[1:]]
        out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"child {args[0]} failed:\n{out.stderr[-4000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        redis.terminate()
        redis.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inbox", type=int, default=1_000_000, help="inbox messages (default 1,000,000)")
    parser.add_argument("--janitor-seconds", type=float, default=120, help="most seconds of janitor rounds")
    parser.add_argument("--dead", type=int, default=100_000, help="dead letters (default 100,000)")
    parser.add_argument("--jobs", type=int, default=10_000, help="queued jobs (default 10,000)")
    parser.add_argument("--failed-jobs", type=int, default=10_000, help="jobs failed for good (default 10,000)")
    parser.add_argument("--baseline", metavar="REV", help="also measure this git revision's code")
    parser.add_argument("--memory-docs", type=int, default=2560, help="documents for the memory row (0: none)")
    parser.add_argument("--model", type=Path, help="a static model directory (default: fast.py's)")
    parser.add_argument("--scifact", type=Path, default=h.SCIFACT)
    parser.add_argument("--only", nargs="+", choices=("inbox", "backlog", "memory"), help="only these rows")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, os.environ["PYTHONPATH"].split(os.pathsep)[0])  # the tree measured, before fast.py's ROOT
        what, url, *rest = args.child
        if what == "inbox":
            result = child_inbox(url, int(rest[0]), float(rest[1]), rest[2])
        elif what == "backlog":
            result = child_backlog(url, int(rest[0]), int(rest[1]), int(rest[2]))
        else:
            result = child_memory(url, int(rest[0]), rest[1], rest[2])
        print(json.dumps(result))
        return
    wanted = set(args.only or ("inbox", "backlog", "memory"))
    results: dict = {"cpu": fast.cpu_name()}
    print(f"{results['cpu']}; load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="embedpipe-cp-") as tmp_name:
        tmp = Path(tmp_name)
        trees = {"this tree": ROOT}
        if args.baseline:
            trees = {args.baseline: tree_of(args.baseline, tmp), **trees}
        for name, tree in trees.items():
            r = results[name] = {}
            if "inbox" in wanted:
                i = r["inbox"] = run_child(
                    tree, tmp, "inbox", str(args.inbox), str(args.janitor_seconds), str(args.scifact)
                )
                print(
                    f"{name}: janitor batched {i['batched']:,} of {i['documents']:,} inbox documents "
                    f"in {i['seconds']} s "
                    f"({i['rounds']} rounds) = {i['documents_per_s']:,} documents/s; "
                    f"{i['inbox_bytes_per_document']} B of Redis per inbox message",
                    flush=True,
                )
            if "backlog" in wanted:
                b = r["backlog"] = run_child(
                    tree, tmp, "backlog", str(args.dead), str(args.jobs), str(args.failed_jobs)
                )
                print(
                    f"{name}: {b['dead_letters']:,} dead letters, {b['queued_jobs']:,} queued jobs: "
                    f"status {b['status_cli_s']} s, failed {b['failed_cli_s']} s ({b['failed_lines']:,} lines), "
                    f"failed --json {b['failed_json_cli_s']} s (CLI floor {b['cli_floor_s']} s); in-process: "
                    f"status {b['status_s']} s, export {b['export_s']} s, scrape {b['scrape_s']} s "
                    f"({b['scrape_series']} series, {b['scrape_bytes']:,} B), a whole janitor round "
                    f"{b['janitor_round_s']} s; the round after {b['failed_jobs']:,} jobs failed for good "
                    f"{b['round_with_failed_jobs_s']} s ({b['failed_jobs_left']:,} left for the next rounds)",
                    flush=True,
                )
        if "memory" in wanted and args.memory_docs:
            model = str(fast.static_model(args.model))
            m = results["memory"] = run_child(ROOT, tmp, "memory", str(args.memory_docs), str(args.scifact), model)
            print(
                f"Redis memory per document ({m['documents']} SciFact abstracts, static model): "
                + ", ".join(f"{k} {v:,} B" for k, v in m["bytes_per_document"].items()),
                flush=True,
            )
            print(f"  left behind, bytes by key kind: {m['left_by_key_kind']}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
        print(f"results: {args.out}")


if __name__ == "__main__":
    main()
