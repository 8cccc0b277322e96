"""Millions of documents through the distributed pools: does the pipeline stay flat as the store grows?

    python bench/scale.py [--docs 1000000] [--model DIR] [--pools chunk=2] [--out FILE.json]

--docs documents (default 1,000,000; on 2 shared cores use ~50,000: see bench/README.md), each a few
hundred tokens of SciFact sentences picked by a generator seeded with the document's number (the same
corpus on every machine and run), through a private redis-server, the janitor and one worker per pool
(more with --pools) with a static model (bench/fast.py's: `embedpipe distill` once, or --model DIR).
Reported:

  throughput   documents stored per second in each tenth of the run (from the ledger's counters,
               sampled every 0.5 s), and the last tenth's over the first's: flat means >= 0.8
  memory       Redis's peak used_memory over the run (INFO), what is left in it at the end, each
               process's peak RSS (the process and its children, polled every 0.1 s, and the process
               alone) in all and in each phase (first run, re-run, prune), and each process's largest
               RSS (alone) in each tenth of the first run: does it grow with the store?
  re-run       the same documents enqueued again: every one skipped as unchanged, 0 chunks written and
               0 embed jobs run (those rq's finished-jobs registry of the embed queue holds from the re-run)
  prune        `enqueue --prune` of the documents less every 100th: 1% deleted from the store (its rows
               counted before and after), the other 99% skipped
  search       at the end, once the pools have stopped and the store's maintenance has ended (a quiet
               machine), in a fresh process (a reader, as `embedpipe search` is): SciFact's first 100
               test queries embedded as the collection was, each timed through the store's search
               (k=10: p50, p95), against exact top-10 from one streamed pass over every stored vector
               (recall@10); the reader's peak RSS before that pass and with it. `--search STORE`
               measures only this, on a store a run kept (`--keep`).

The CPU is printed first: name it with every figure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import fast  # noqa: E402  (bench/fast.py: cpu_name, static_model)
import harness as h  # noqa: E402  (bench/harness.py: the pools, clean_env, embedpipe)

SENTENCES_PER_DOC = (8, 16)  # SciFact sentences average ~25 tokens: a few hundred tokens a document


def scifact_sentences(scifact: Path) -> list[str]:
    out = []
    with (scifact / "corpus.jsonl").open() as f:
        for line in f:
            d = json.loads(line)
            out += [s.strip().rstrip(".") + "." for s in f"{d['title']}. {d['text']}".split(". ") if len(s) > 20]
    return out


def write_corpus(n: int, path: Path, scifact: Path) -> dict:
    """n documents of SciFact sentences, document i's chosen by random.Random(i): deterministic."""
    sentences = scifact_sentences(scifact)
    chars = 0
    with path.open("w") as f:
        for i in range(n):
            rng = random.Random(i)
            text = " ".join(rng.choice(sentences) for _ in range(rng.randint(*SENTENCES_PER_DOC)))
            chars += len(text)
            f.write(json.dumps({"id": f"scale-{i:07d}", "text": text}) + "\n")
    return {"documents": n, "mean_chars": round(chars / n), "sentences": len(sentences)}


class Sampler(threading.Thread):
    """Every 0.5 s: the ledger's counters, the dead letters, Redis's used memory and the RSS of each pool's
    process alone (its children left out: a writer's maintenance comes and goes)."""

    def __init__(self, redis, pids: dict[str, int]) -> None:
        import psutil

        super().__init__(daemon=True)
        self.redis, self.samples, self._stop_event = redis, [], threading.Event()
        self.procs = {n: psutil.Process(pid) for n, pid in pids.items()}
        self.start()

    def rss(self) -> dict[str, int]:
        import psutil

        out = {}
        for name, proc in self.procs.items():
            try:
                out[name] = proc.memory_info().rss
            except psutil.Error:
                pass
        return out

    def run(self) -> None:
        from shared import keys

        while not self._stop_event.is_set():
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.DEFAULT.COUNTERS)
                pipe.hlen(keys.DEFAULT.DEAD)
                pipe.info("memory")
                counters, dead, memory = pipe.execute()
            c = {k.decode(): int(v) for k, v in counters.items()}
            self.samples.append((time.perf_counter(), c, int(dead), int(memory["used_memory"]), self.rss()))
            self._stop_event.wait(0.5)

    def stop(self) -> list:
        self._stop_event.set()
        self.join()
        return self.samples


def tenths(samples: list, started: float, n: int) -> list[float]:
    """Documents per second in each tenth of the run: when the stored (or failed) documents passed each
    tenth of n, interpolated between the samples around it."""
    return [round((n / 10) / max(b - a, 1e-9)) for a, b in itertools.pairwise(tenth_ends(samples, started, n))]


def rss_by_tenth(samples: list, started: float, n: int) -> dict[str, list[float]]:
    """Each process's largest sampled RSS (MB, the process alone) in each tenth of the run."""
    ends = tenth_ends(samples, started, n)
    out: dict[str, list[float]] = {}
    for a, b in itertools.pairwise(ends):
        inside = [rss for at, *_, rss in samples if a <= at <= b]
        for name in {k for r in inside for k in r}:
            out.setdefault(name, []).append(round(max(r.get(name, 0) for r in inside) / 2**20))
    return out


def tenth_ends(samples: list, started: float, n: int) -> list[float]:
    """The start, and when the stored (or failed) documents passed each tenth of n, interpolated between
    the samples around it."""
    points = [(started, 0)] + [(at, c.get("documents_done", 0) + dead) for at, c, dead, *_ in samples]
    crossings = [started]
    for k in range(1, 11):
        target = k * n / 10
        for (t0, d0), (t1, d1) in itertools.pairwise(points):
            if d1 >= target > d0 or (d1 >= target and d0 == d1):
                crossings.append(t0 + (t1 - t0) * (target - d0) / max(d1 - d0, 1))
                break
    return crossings


def store_rows(store: str) -> dict[str, int]:
    """Each collection's chunks, and its documents (under NAME__docs), from the store's own listing."""
    from shared.store import open_store

    handle = open_store(store)
    try:
        listed = handle.collections()
    finally:
        handle.close()
    return {k: v for c in listed for k, v in ((c["name"], c["chunks"]), (c["name"] + "__docs", c["documents"]))}


def embed_jobs_since(redis, since: float) -> int:
    """Embed jobs finished since `since` (epoch s): rq's finished registry scores each job by its finish
    time plus its result TTL. (Counting the registry's entries went negative at 1M documents: the first
    run's entries expire during the re-run.)"""
    from shared.queues import RESULT_TTL_S

    return int(redis.zcount("rq:finished:embed", since + RESULT_TTL_S, "+inf"))


def wait_for_maintenance(store: str) -> None:
    """Until no LanceDB maintenance child (compaction, an index build) runs on the store: each holds its
    collection's index lock (shared/lance_maintenance.py), and one started by the prune's writes outlives
    the writer. Search is measured on a quiet store, not beside a compaction."""
    import fcntl

    if store.startswith("postgresql"):
        return  # pgvector: an index build runs in the server, started by a writer; not waited for here
    for lock_path in Path(store).glob(".*.index.lock"):
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while a child holds it


def counters_of(redis) -> dict[str, int]:
    from shared import keys

    return {k.decode(): int(v) for k, v in redis.hgetall(keys.DEFAULT.COUNTERS).items()}


def exact_top10(store, queries: np.ndarray, rows_per_pass: int = 65536) -> list[list[str]]:
    """Each query's 10 nearest stored chunks by cosine, from one streamed pass over every vector: the
    truth the index's answers are measured against (no index, no whole table in memory)."""
    best_ids = [[] for _ in queries]
    best = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    stream = store.vectors()
    while part := list(itertools.islice(stream, rows_per_pass)):
        ids = [chunk_id for chunk_id, _ in part]
        vectors = np.stack([v for _, v in part])
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        scores = np.concatenate([best, queries @ vectors.T], axis=1)
        top = np.argsort(-scores, axis=1)[:, :10]
        kept = best.shape[1]  # columns 0..kept-1 of scores were the best so far, the rest this pass's
        best_ids = [
            [old[j] if j < kept else ids[j - kept] for j in row] for old, row in zip(best_ids, top, strict=True)
        ]
        best = np.take_along_axis(scores, top, axis=1)
    return best_ids


def recall_at_10(found: list, exact: list[list[str]]) -> float:
    """The share of each query's exact top-10 that the search found, averaged over the queries."""
    return round(float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])), 3)


def embed_queries(store, settings, scifact: Path, n_queries: int) -> np.ndarray:
    """SciFact's first n test queries, embedded as the store's collection was."""
    from producer.lifecycle import embedder_for
    from shared.quality import load_beir

    embedder = embedder_for(store, settings).warm_up()
    texts = [store.spec.query_prefix + t for _, t in sorted(load_beir(scifact).queries.items())[:n_queries]]
    return np.asarray(embedder.embed(texts), dtype=np.float32)


def search_figures(location: str, scifact: Path, n_queries: int = 100) -> dict:
    """Search latency and recall@10 on a store a run left, as a fresh reader (see the module's doc)."""
    from shared.settings import Settings
    from shared.store import open_store

    settings = Settings.from_env(store=location)
    store = open_store(settings.store, settings=settings)
    try:
        queries = embed_queries(store, settings, scifact, n_queries)
        store.search(queries[0], 10)  # warm: the index and the table's metadata
        latencies, found = [], []
        for q in queries:
            started = time.perf_counter()
            found.append([hit.chunk_id for hit in store.search(q, 10)])
            latencies.append(time.perf_counter() - started)
        searching_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # a reader's: before the exact pass
        started = time.perf_counter()
        exact = exact_top10(store, queries)
        exact_s = time.perf_counter() - started
        return {
            "chunks": store.count(),
            "queries": len(queries),
            "p50_ms": round(1000 * float(np.median(latencies)), 1),
            "p95_ms": round(1000 * float(np.percentile(latencies, 95)), 1),
            "recall@10": recall_at_10(found, exact),
            "exact_pass_s": round(exact_s, 1),
            "peak_rss_searching_mb": round(searching_mb),
            "indexes": store.index_stats() if hasattr(store, "index_stats") else {"hnsw": store.has_index()},
        }
    finally:
        store.close()


def run(args: argparse.Namespace, tmp: Path) -> dict:
    from redis import Redis

    from tests.servers import start_redis

    corpus, kept = tmp / "corpus.jsonl", tmp / "kept.jsonl"
    started = time.perf_counter()
    result: dict = {"corpus": write_corpus(args.docs, corpus, args.scifact)}
    with corpus.open() as src, kept.open("w") as out:
        out.writelines(line for i, line in enumerate(src) if i % 100 != 99)  # every 100th goes
    print(f"corpus: {result['corpus']} written in {time.perf_counter() - started:.1f} s", flush=True)

    memory = ("--maxmemory", args.redis_maxmemory, "--maxmemory-policy", "noeviction") if args.redis_maxmemory else ()
    redis_proc, port = start_redis(tmp, *memory)
    redis = Redis(port=port)
    store = args.store or str(tmp / "store")
    log_level = h.SETTINGS.get("EMBEDPIPE_LOG_LEVEL", "WARNING")
    env = h.clean_env(
        EMBEDPIPE_REDIS_URL=f"redis://127.0.0.1:{port}/0", EMBEDPIPE_STORE=store, EMBEDPIPE_LOG_LEVEL=log_level
    )
    procs: dict = {}
    monitors: dict = {}
    long_s = 7 * 86400
    try:
        monitors = h.start_pools(tmp, env, env, 1, args.pools, procs)
        phase = {n: h.PeakRss(p.pid) for n, p in procs.items()}  # each phase's peak RSS apart
        sampler = Sampler(redis, {n: p.pid for n, p in procs.items()})
        started = time.perf_counter()
        h.embedpipe(env, "enqueue", str(corpus), "--no-progress", timeout=long_s)
        enqueued_s = time.perf_counter() - started
        h.embedpipe(env, "wait", timeout=long_s)
        seconds = time.perf_counter() - started
        samples = sampler.stop()
        first = counters_of(redis)
        memory = redis.info("memory")
        rows = store_rows(store)
        per_tenth = tenths(samples, started, args.docs)
        result["first_run"] = {
            "seconds": round(seconds, 1),
            "enqueue_s": round(enqueued_s, 1),
            "documents_per_s": round(args.docs / seconds),
            "chunks_per_s": round(first.get("chunks_written", 0) / seconds),
            "documents_per_s_by_tenth": per_tenth,
            "last_over_first_tenth": round(per_tenth[-1] / per_tenth[0], 2) if len(per_tenth) == 10 else None,
            "counters": first,
            "dead_letters": int(redis.hlen("embedpipe:dead")),
            "store_rows": rows,
            "redis_peak_mb": round(int(memory["used_memory_peak"]) / 2**20, 1),
            "redis_peak_sampled_mb": round(max(s[3] for s in samples) / 2**20, 1) if samples else None,
            "rss_mb_by_tenth": rss_by_tenth(samples, started, args.docs),
            "redis_after_mb": round(int(memory["used_memory"]) / 2**20, 1),
            "redis_keys_after": int(redis.dbsize()),
            "peak_rss_mb": {n: m.stop() for n, m in phase.items()},
            "peak_rss_own_mb": {n: m.own_mb() for n, m in phase.items()},
        }
        print(f"first run: {json.dumps(result['first_run'])}", flush=True)

        rerun_since = time.time()
        phase = {n: h.PeakRss(p.pid) for n, p in procs.items()}
        started = time.perf_counter()
        h.embedpipe(env, "enqueue", str(corpus), "--no-progress", timeout=long_s)
        h.embedpipe(env, "wait", timeout=long_s)
        again = counters_of(redis)
        result["rerun"] = {
            "seconds": round(time.perf_counter() - started, 1),
            "documents_skipped": again.get("documents_skipped", 0) - first.get("documents_skipped", 0),
            "chunks_written": again.get("chunks_written", 0) - first.get("chunks_written", 0),
            "embed_jobs": embed_jobs_since(redis, rerun_since),
            "peak_rss_mb": {n: m.stop() for n, m in phase.items()},
        }
        print(f"unchanged re-run: {json.dumps(result['rerun'])}", flush=True)

        phase = {n: h.PeakRss(p.pid) for n, p in procs.items()}
        started = time.perf_counter()
        h.embedpipe(env, "enqueue", str(kept), "--prune", "--no-progress", timeout=long_s)
        h.embedpipe(env, "wait", timeout=long_s)
        pruned = counters_of(redis)
        after = store_rows(store)
        result["prune"] = {
            "seconds": round(time.perf_counter() - started, 1),
            "documents_kept": args.docs - args.docs // 100,
            "documents_skipped": pruned.get("documents_skipped", 0) - again.get("documents_skipped", 0),
            "store_rows_before": rows,
            "store_rows_after": after,
            "peak_rss_mb": {n: m.stop() for n, m in phase.items()},
        }
        print(f"prune of 1%: {json.dumps(result['prune'])}", flush=True)

        result["redis_peak_mb"] = round(int(redis.info("memory")["used_memory_peak"]) / 2**20, 1)
        h.stop_pools(procs)  # search alone on the machine, as a reader would be after a run
        wait_for_maintenance(store)
        me = [sys.executable, __file__, "--search", store, "--scifact", str(args.scifact)]
        figures, _, reader_peak = h.run_measured(me, env, timeout=long_s)
        result["search"] = figures | {"reader_peak_rss_mb": reader_peak}
        print(f"search: {json.dumps(result['search'])}", flush=True)
    finally:
        h.stop_pools(procs)
        redis_proc.terminate()
        redis_proc.wait(timeout=30)
    result["peak_rss_mb"] = {n: m.stop() for n, m in monitors.items()}
    result["peak_rss_own_mb"] = {n: m.own_mb() for n, m in monitors.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=1_000_000, help="documents (default 1,000,000)")
    parser.add_argument("--model", type=Path, help="a static model directory (default: distil one, once)")
    parser.add_argument("--pools", default="", help="workers of the other pools, e.g. load=2,chunk=2,write=2")
    parser.add_argument("--scifact", type=Path, default=h.SCIFACT, help="BEIR SciFact directory")
    parser.add_argument("--tmp", type=Path, help="where the corpus, Redis and the store go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the corpus and the store (in --tmp)")
    parser.add_argument("--store", help="a postgresql:// URL (an empty database) instead of LanceDB in --tmp")
    parser.add_argument(
        "--set", action="append", default=[], metavar="EMBEDPIPE_X=V", help="a setting for every process"
    )
    parser.add_argument(
        "--redis-maxmemory",
        metavar="SIZE",
        help="Redis's maxmemory, with noeviction as deployed (e.g. 3gb; default none)",
    )
    parser.add_argument("--search", metavar="STORE", help="only measure search on a store a run kept")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    if args.search:  # EMBEDPIPE_MODEL: the store's collection names its model (a static one's directory)
        figures = search_figures(args.search, args.scifact)
        print(
            f"{fast.cpu_name()}; {args.search}: {figures['chunks']:,} chunks, search p50 {figures['p50_ms']} ms, "
            f"p95 {figures['p95_ms']} ms, recall@10 {figures['recall@10']} against exact",
            file=sys.stderr,
        )
        print(json.dumps(figures))  # the last line: what run() reads from its child
        return
    args.pools = {k: int(v) for k, v in (p.split("=") for p in args.pools.split(",") if p)}
    h.SETTINGS.update(kv.split("=", 1) for kv in args.set)
    h.MODEL = str(fast.static_model(args.model))
    results = {"cpu": fast.cpu_name(), "model": h.MODEL, "documents": args.docs, "pools": args.pools}
    print(f"{results['cpu']}; model {h.MODEL}; load average {os.getloadavg()[0]:.2f}", flush=True)
    if args.tmp:
        args.tmp.mkdir(parents=True, exist_ok=True)
    if args.keep:
        kept = Path(tempfile.mkdtemp(prefix="embedpipe-scale-", dir=args.tmp))
        results |= run(args, kept)
        print(f"kept: {kept} (corpus.jsonl, store/)", flush=True)
    else:
        with tempfile.TemporaryDirectory(prefix="embedpipe-scale-", dir=args.tmp) as tmp:
            results |= run(args, Path(tmp))
    r = results["first_run"]
    print(
        f"{args.docs:,} documents in {r['seconds']} s: {r['documents_per_s']:,} documents/s, {r['chunks_per_s']:,} "
        f"chunks/s; by tenth {r['documents_per_s_by_tenth']} (last/first {r['last_over_first_tenth']}); Redis peak "
        f"{results['redis_peak_mb']} MB; peak RSS MB with children (alone) "
        + ", ".join(f"{n} {v:.0f} ({results['peak_rss_own_mb'][n]:.0f})" for n, v in results["peak_rss_mb"].items())
        + f"; RSS MB by tenth {r['rss_mb_by_tenth']}",
        flush=True,
    )
    q = results["search"]
    print(
        f"search at the end, {q['chunks']:,} chunks: p50 {q['p50_ms']} ms, p95 {q['p95_ms']} ms, recall@10 "
        f"{q['recall@10']} against exact ({q['queries']} SciFact queries); the reader's peak RSS "
        f"{q['peak_rss_searching_mb']} MB ({q['reader_peak_rss_mb']:.0f} MB with the exact pass)",
        flush=True,
    )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
        print(f"results: {args.out}")


if __name__ == "__main__":
    main()
