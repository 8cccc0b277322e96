"""The distributed prune job's memory on a large store: the listing in Redis (a set, asked a slice at a time)
against the listing in the job's claim check (what a client before the set sent, still accepted).

    python bench/prune_memory.py --store URL_or_PATH [--out FILE.json]

On the active collection of a store a run kept (`bench/scale.py --keep`), the listing is every stored
document ID but every 100th (a 1% prune, as scale.py's). For each way of sending it, a private redis-server
and a fresh worker process that runs the write pool's own `prune_job`: its RSS before the job, its peak RSS
(polled every 0.1 s), the job's time, and what the listing took in Redis (used_memory). Both prunes are
scoped to an ID prefix no document has, so each holds the listing and asks about every stored ID but
deletes nothing: the store is the same for both (and the deletion of the gone 1%, the same work either
way, is not measured). With --delete, a third prune (the listing in Redis) deletes the 1% for real. The
CPU is printed first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import fast  # noqa: E402  (bench/fast.py: cpu_name)
import harness as h  # noqa: E402

NO_SUCH_PREFIX = "\x00no-document-has-this-prefix/"


def child(store: str, redis_url: str, token: str) -> None:
    """In the worker process: the write pool's prune job, timed; the last stdout line is JSON."""
    import psutil
    from redis import Redis

    from shared.ledger import RedisLedger
    from shared.queues import queue
    from shared.settings import STAGES, Settings
    from workers.context import WorkerContext
    from workers.write import prune_job

    settings = Settings.from_env(store=store, redis_url=redis_url)
    redis = Redis.from_url(redis_url)
    ctx = WorkerContext(
        settings, redis, RedisLedger(redis, settings.keys), {s: queue(redis, s, settings.namespace) for s in STAGES}
    )
    before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    removed = prune_job(ctx, token)
    print(
        json.dumps(
            {"seconds": round(time.perf_counter() - started, 1), "rss_before_mb": before / 2**20, "removed": removed}
        )
    )


def measure(store: str, listing: list[str], how: str, workdir: Path, scope: str = NO_SUCH_PREFIX) -> dict:
    from redis import Redis

    from producer.submit import submit_prune
    from shared.messages import PruneRequest
    from shared.settings import Settings
    from tests.servers import start_redis

    server, port = start_redis(workdir)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        redis, settings = Redis(port=port), Settings.from_env(store=store, redis_url=url)
        empty = redis.info("memory")["used_memory"]
        if how == "claim check":  # what a client before the set sent: the IDs in the request
            token = "older-client"
            request = PruneRequest(listing, scope, settings.prune_max_fraction)
            redis.set(settings.keys.kept_ids(token), request.encode())
        else:
            token = submit_prune(redis, settings, set(listing), scope=scope)
        listing_mb = round((redis.info("memory")["used_memory"] - empty) / 2**20)  # what the listing costs Redis
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", store, url, token]
        out, wall, peak = h.run_measured(cmd, h.clean_env())
        removed = sum(out["removed"].values()) if out["removed"] != {"refused": 1} else -1
        if removed != 0 if scope else removed <= 0:  # scoped away: nothing deleted; unscoped: the 1%
            raise SystemExit(f"{how}: the prune did not run as planned: {out['removed']}")
        return {
            "listing": how,
            "deleted": removed,
            "ids": len(listing),
            "job_s": out["seconds"],
            "rss_before_mb": round(out["rss_before_mb"]),
            "peak_rss_mb": round(peak),
            "redis_mb": listing_mb,
            "wall_s": round(wall, 1),
        }
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="a store a run kept: a postgresql:// URL or a LanceDB path")
    parser.add_argument("--delete", action="store_true", help="then prune the 1%% for real (listing in Redis)")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()

    from shared.store import open_store

    print(f"CPU: {fast.cpu_name()}", flush=True)
    store = open_store(args.store)
    listing = [d for i, d in enumerate(store.doc_ids()) if i % 100]
    store.close()
    print(f"{len(listing):,} IDs listed (every stored document but every 100th)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="embedpipe-prune-") as tmp:
        for how, scope in (("claim check", NO_SUCH_PREFIX), ("redis set", NO_SUCH_PREFIX), ("redis set", "")):
            if not scope and not args.delete:
                continue
            rows.append(measure(args.store, listing, how, Path(tmp), scope))
            r = rows[-1]
            print(
                f"  listing in a {how}, {r['deleted']:,} documents deleted: job {r['job_s']} s; worker RSS "
                f"{r['rss_before_mb']} MB before the job, peak {r['peak_rss_mb']} MB; in Redis {r['redis_mb']} MB",
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps({"cpu": fast.cpu_name(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
