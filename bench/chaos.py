"""Chaos benchmark: what SIGKILLed workers cost the distributed pipeline, and that they lose nothing.

    python bench/chaos.py [--docs 3000] [--kills-per-pool 3] [--embedders 2] [--out FILE.json]

The larger version of tests/test_reliability.py::test_sigkilled_workers_of_every_pool_lose_nothing.
A private redis-server on a free port (nothing saved; the Redis on 6379 is never touched), N short
documents (the test's `short_documents`) as JSONL, and a pool of real `embedpipe` processes: the
janitor and load 1, chunk 1, embed --embedders, write 1, with the test's FAST_RECOVERY settings.

1. Clean run: the pool on Redis db 0 and store `clean/`; timed from `embedpipe enqueue` until
   `embedpipe wait` returns. Then the pool is stopped (SIGTERM).
2. Chaos run: a fresh pool on db 1 and store `chaos/`, the same documents, the same clock. While it
   runs, --kills-per-pool rounds: in each, every pool (in random order) loses a worker by SIGKILL at
   a moment when that worker is running a job (its rq worker hash says `busy` with a current job),
   and the worker is restarted at once; after the rounds the janitor is killed and restarted once.

Both runs use EMBEDPIPE_MAX_BACKLOG_JOBS=--backlog (30): `enqueue` then feeds load batches as the
pipeline drains instead of all at once, so the load and chunk pools still have jobs to be killed in
during the later rounds (without it they finish their work in the first seconds).

Reported: the two times, the extra time the kills cost, and the outcome (each document stored
with exactly its chunks, or a dead letter: lost and duplicate chunks must be 0). Per kill: the job
it interrupted and
  - job_done_s: kill → that job's final successful end (rq's `ended_at`). A job of a SIGKILLed
    worker is retried once its lease runs out (EMBEDPIPE_JOB_LEASE_S, 20 s after the worker's last
    heartbeat: workers/lease.py) and the janitor's next clean-up round (5 s), then after 5 s, plus
    the job itself and whatever queued before its retry.
  - stage_drained_s (proxy): kill → the first moment (sampled every 0.25 s) at which the killed
    stage's queue + started registry held 0 jobs. The orphaned job sits in the started registry
    until rq declares it abandoned (its lease run out) and moves it to the
    scheduled registry for its retry, so this is >= the time until recovery, plus whatever backlog
    the stage had; for the bottleneck stage (embed) it can be much of the rest of the run.
    A killed janitor holds rq's scheduler locks for up to 60 s more, so retries due in that window
    wait for its successor: job_done_s shows that, stage_drained_s does not.
Exit status 1 when anything is lost, partly stored, stored and dead, duplicated, or a process did
not stop cleanly. Takes 10-20 minutes for 3000 documents on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from redis import Redis  # noqa: E402
from rq import worker_registration  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

from shared.messages import SourceDoc  # noqa: E402
from shared.queues import queue  # noqa: E402
from shared.settings import STAGES, Settings  # noqa: E402
from shared.store import open_store  # noqa: E402
from tests.helpers import EMBEDPIPE, FAST_RECOVERY, Pool, cli_env, expected_chunks, short_documents  # noqa: E402
from tests.servers import start_redis  # noqa: E402

SAMPLE_S = 0.25


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cli(env: dict[str, str], *args: str, timeout: float = 600) -> str:
    result = subprocess.run([EMBEDPIPE, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"embedpipe {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result.stdout


class Monitor(threading.Thread):
    """Samples each stage's queued + started job count (no registry clean-up: read-only)."""

    def __init__(self, redis: Redis, t0: float) -> None:
        super().__init__(daemon=True)
        self.redis, self.t0 = redis, t0
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.stopping = threading.Event()
        self.keys = {s: (queue(redis, s, "").key, queue(redis, s, "").started_job_registry.key) for s in STAGES}

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                pipe = self.redis.pipeline(transaction=False)
                for qkey, started in self.keys.values():
                    pipe.llen(qkey)
                    pipe.zcard(started)
                n = pipe.execute()
                counts = {s: n[2 * i] + n[2 * i + 1] for i, s in enumerate(self.keys)}
                self.samples.append((time.monotonic() - self.t0, counts))
            except Exception:  # a sampling hiccup is not worth stopping the benchmark for
                pass
            self.stopping.wait(SAMPLE_S)

    def drained_after(self, stage: str, t: float) -> float | None:
        for ts, counts in self.samples:
            if ts > t and counts[stage] == 0:
                return round(ts - t, 1)
        return None


def busy_workers(redis: Redis, stage: str, pids: dict[int, str]) -> list[tuple[str, str]]:
    """(pool name, current job id) of our live workers of `stage` that are running a job now."""
    wkeys = list(worker_registration.get_keys(queue=queue(redis, stage, ""), connection=redis))
    pipe = redis.pipeline(transaction=False)
    for k in wkeys:
        pipe.hmget(k, "pid", "state", "current_job")
    busy = []
    for pid, state, job in pipe.execute():
        name = pids.get(int(pid)) if pid else None
        if name and state == b"busy" and job:
            busy.append((name, job.decode()))
    return busy


def live_pids(pool: Pool, stage: str) -> dict[int, str]:
    return {p.pid: n for n, p in pool.procs.items() if n.startswith(stage + "-") and p.poll() is None}


def kill_all(pool: Pool, redis: Redis, t0: float, args: argparse.Namespace, kills: list[dict]) -> None:
    """--kills-per-pool rounds of one SIGKILL + restart per pool, in random order, each while the
    victim runs a job (or after --busy-timeout without one); then the janitor once."""
    rng = random.Random(args.seed)
    for round_ in range(args.kills_per_pool):
        for stage in rng.sample(STAGES, len(STAGES)):
            waited = time.monotonic()
            while not (busy := busy_workers(redis, stage, live_pids(pool, stage))):
                if time.monotonic() - waited > args.busy_timeout:
                    break
                time.sleep(0.02)
            if busy:
                name, job = rng.choice(busy)
            else:
                name, job = rng.choice([n for n in pool.commands if n.startswith(stage + "-")]), None
            kills.append(kill(pool, name, job, t0, round_ + 1, waited))
    kills.append(kill(pool, "janitor", None, t0, None, time.monotonic()))


def kill(pool: Pool, name: str, job: str | None, t0: float, round_: int | None, waited: float) -> dict:
    wall, t = time.time(), time.monotonic() - t0
    pool.kill(name)
    pool.start(name)
    log(f"kill: {name} at {t:.1f} s" + (f" running {job}" if job else " (no job seen running)"))
    stage = name.split("-")[0]
    return {
        "round": round_,
        "stage": stage,
        "worker": name,
        "job": job,
        "t": round(t, 1),
        "wall": wall,
        "waited_s": round(time.monotonic() - waited, 1),
    }


def timed_run(env: dict[str, str], docs_file: Path, during=None) -> float:
    """Seconds from `embedpipe enqueue` until `embedpipe wait` returns; `during(t0)` runs meanwhile."""
    t0 = time.monotonic()
    enqueue = subprocess.Popen(
        [EMBEDPIPE, "enqueue", str(docs_file)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        if during:
            during(t0)
        out, err = enqueue.communicate(timeout=1800)
        if enqueue.returncode != 0:
            raise RuntimeError(f"embedpipe enqueue exited {enqueue.returncode}:\n{err[-3000:]}")
        log(out.strip())
        cli(env, "wait", "--timeout", "1800", timeout=1900)
        return time.monotonic() - t0
    finally:
        if enqueue.poll() is None:
            enqueue.kill()
            enqueue.wait()


def outcome(env: dict[str, str], expected: dict[str, set[str]]) -> dict[str, int]:
    """assert_nothing_lost's logic, counting instead of asserting."""
    store = open_store(env["EMBEDPIPE_STORE"])
    stored = store.chunk_ids(list(expected))
    dead = {d["doc_id"] for d in json.loads(cli(env, "failed", "--json", "--limit", "0"))["failed"]} & set(expected)
    complete = {d for d, ids in stored.items() if ids == expected[d]}
    partial = {d for d, ids in stored.items() if ids and ids != expected[d]}
    lost = set(expected) - complete - dead
    rows = store.count()
    return {
        "stored": len(complete),
        "dead_letters": len(dead),
        "lost": len(lost),
        "duplicate_chunks": rows - sum(len(expected[d]) for d in complete),
        "partly_stored": len(partial),
        "stored_and_dead": len(complete & dead),
        "chunks_in_store": rows,
        "lost_examples": sorted(lost)[:10],
    }


def job_fate(redis: Redis, job_id: str | None, kill_wall: float) -> dict:
    from rq.job import Job

    if not job_id:
        return {}
    try:
        job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    except Exception as e:
        return {"job_status": f"unreadable: {type(e).__name__}"}
    ended = job.ended_at
    if ended is not None and ended.tzinfo is None:
        ended = ended.replace(tzinfo=UTC)
    done_s = round(ended.timestamp() - kill_wall, 1) if ended else None
    return {
        "job_status": job.get_status(refresh=False).value if job.get_status(refresh=False) else None,
        "job_retries_left": job.retries_left,
        "job_done_s": done_s,
        # a job that ended before the kill was finished by the time the signal landed
        "landed_mid_job": None if done_s is None else done_s > 0,
    }


def log_findings(logs: Path) -> dict[str, dict[str, int]]:
    found = {}
    for f in sorted(logs.glob("*.log")):
        text = f.read_text(errors="replace")
        counts = {k: text.count(k) for k in ("Traceback", "ERROR", "WARNING")}
        if any(counts.values()):
            found[f.stem] = counts
    return found


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--kills-per-pool", type=int, default=3)
    parser.add_argument("--embedders", type=int, default=2)
    parser.add_argument("--backlog", type=int, default=30, help="EMBEDPIPE_MAX_BACKLOG_JOBS for both runs")
    parser.add_argument("--busy-timeout", type=float, default=90, help="seconds to wait for a busy worker")
    parser.add_argument("--no-baseline", action="store_true", help="skip the clean run")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--keep-logs", type=Path, help="copy the worker logs here at the end")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM runs the clean-up below, as Ctrl-C does

    workers = {"load": 1, "chunk": 1, "embed": args.embedders, "write": 1}
    tmp = Path(tempfile.mkdtemp(prefix="embedpipe-chaos-"))
    redis_proc, pool = None, None
    result: dict = {"documents": args.docs, "workers": workers, "backlog": args.backlog, "settings": FAST_RECOVERY}
    try:
        (tmp / "redis").mkdir()
        redis_proc, port = start_redis(tmp / "redis")
        docs = short_documents(args.docs)
        docs_file = tmp / "docs.jsonl"
        docs_file.write_text("".join(json.dumps(d) + "\n" for d in docs))
        sources = [SourceDoc(d["id"], text=d["text"]) for d in docs]
        expected = expected_chunks(Settings.from_env(FAST_RECOVERY), sources)
        result["chunks_expected"] = sum(map(len, expected.values()))

        def env_for(db: int, name: str) -> dict[str, str]:
            return cli_env(
                EMBEDPIPE_REDIS_URL=f"redis://127.0.0.1:{port}/{db}",
                EMBEDPIPE_STORE=str(tmp / name),
                EMBEDPIPE_MAX_BACKLOG_JOBS=str(args.backlog),
                **FAST_RECOVERY,
            )

        if not args.no_baseline:
            env = env_for(0, "clean")
            pool = Pool(env, tmp / "logs-clean", workers=workers)
            log(f"clean run: starting {len(pool.commands)} processes")
            pool.start_all(Redis(port=port, db=0))
            seconds = timed_run(env, docs_file)
            codes, pool = pool.stop(), None
            result["clean"] = {"seconds": round(seconds, 1), "outcome": outcome(env, expected), "exit_codes": codes}
            log(f"clean run: {seconds:.1f} s")

        env = env_for(1, "chaos")
        redis = Redis(port=port, db=1)
        pool = Pool(env, tmp / "logs-chaos", workers=workers)
        log(f"chaos run: starting {len(pool.commands)} processes")
        pool.start_all(redis)
        kills: list[dict] = []
        monitor: Monitor | None = None

        def chaos(t0: float) -> None:
            nonlocal monitor
            monitor = Monitor(Redis(port=port, db=1), t0)
            monitor.start()
            kill_all(pool, redis, t0, args, kills)

        try:
            seconds = timed_run(env, docs_file, during=chaos)
        finally:
            if monitor:
                monitor.stopping.set()
                monitor.join()
        alive = pool.alive()
        codes, pool = pool.stop(), None
        log(f"chaos run: {seconds:.1f} s")
        for k in kills:
            k.update(job_fate(redis, k["job"], k.pop("wall")))
            drained = monitor and k["stage"] in STAGES
            k["stage_drained_s"] = monitor.drained_after(k["stage"], k["t"]) if drained else None
        result["chaos"] = {
            "seconds": round(seconds, 1),
            "kills": kills,
            "outcome": outcome(env, expected),
            "all_alive_at_end": all(alive.values()),
            "exit_codes": codes,
            "log_findings": log_findings(tmp / "logs-chaos"),
        }
        if "clean" in result:
            result["extra_seconds"] = round(result["chaos"]["seconds"] - result["clean"]["seconds"], 1)
        report(result)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        return 0 if healthy(result) else 1
    finally:
        if pool is not None:
            pool.stop()
        if redis_proc is not None:
            redis_proc.terminate()
            try:
                redis_proc.wait(30)
            except subprocess.TimeoutExpired:
                redis_proc.kill()
                redis_proc.wait()
        if args.keep_logs:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            for d in tmp.glob("logs-*"):
                shutil.copytree(d, args.keep_logs / d.name, dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


def healthy(result: dict) -> bool:
    ok = True
    for run in ("clean", "chaos"):
        if run in result:
            o, codes = result[run]["outcome"], result[run]["exit_codes"]
            ok &= not (o["lost"] or o["duplicate_chunks"] or o["partly_stored"] or o["stored_and_dead"])
            ok &= codes == dict.fromkeys(codes, 0)
    return ok and result["chaos"]["all_alive_at_end"]


def report(result: dict) -> None:
    chaos, kills = result["chaos"], result["chaos"]["kills"]
    w = result["workers"]
    mid = sum(1 for k in kills if k.get("landed_mid_job"))
    print(f"documents:        {result['documents']} ({result['chunks_expected']} chunks expected)")
    print(
        f"pools:            janitor + load {w['load']}, chunk {w['chunk']}, embed {w['embed']}, write {w['write']};"
        f" backlog {result['backlog']}"
    )
    print(f"kills:            {len(kills)} SIGKILL + restart: {len(kills) - 1} workers ({mid} mid-job) + the janitor")
    if "clean" in result:
        print(f"clean run:        {result['clean']['seconds']:.1f} s enqueue -> idle (same documents, db 0, own store)")
    print(f"chaos run:        {chaos['seconds']:.1f} s enqueue -> idle")
    if "clean" in result:
        extra = result["extra_seconds"]
        print(f"kills cost:       {extra:+.1f} s ({extra / result['clean']['seconds']:+.0%})")
        c = result["clean"]["outcome"]
        print(
            f"clean outcome:    stored {c['stored']}, dead letters {c['dead_letters']}, lost {c['lost']},"
            f" duplicate chunks {c['duplicate_chunks']}"
        )
    o = chaos["outcome"]
    print(
        f"chaos outcome:    stored {o['stored']}, dead letters {o['dead_letters']}, lost {o['lost']},"
        f" duplicate chunks {o['duplicate_chunks']}, partly stored {o['partly_stored']},"
        f" stored and dead {o['stored_and_dead']}"
    )
    print(
        f"processes:        all alive at the end: {chaos['all_alive_at_end']}; exit codes after SIGTERM: "
        + ", ".join(f"{n} {c}" for n, c in chaos["exit_codes"].items())
    )
    print(
        "per kill:         t = seconds after enqueue; job_done = kill -> the interrupted job's final end;"
        " drained = kill -> stage queue+started first 0"
    )
    for i, k in enumerate(kills, 1):
        job = k["job"] or "-"
        done = "-" if k.get("job_done_s") is None else f"{k['job_done_s']:.1f} s"
        drained = "-" if k["stage_drained_s"] is None else f"{k['stage_drained_s']:.1f} s"
        landed = {True: "mid-job", False: "job already done", None: ""}[k.get("landed_mid_job")]
        print(
            f"  {i:2d}. t={k['t']:7.1f}  {k['worker']:<8} {job[:44]:<44} {landed:<16} job_done {done:>8}"
            f"  drained {drained:>8}  retries_left {k.get('job_retries_left', '-')}"
        )
    if chaos["log_findings"]:
        print(
            "worker logs:      "
            + "; ".join(
                f"{n}: " + ", ".join(f"{c} {k}" for k, c in v.items() if c) for n, v in chaos["log_findings"].items()
            )
        )


if __name__ == "__main__":
    sys.exit(main())
