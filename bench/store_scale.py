"""The store at scale: direct upserts of parts (512 chunks of 384-d, 8 chunks per document, documents
complete, as the writer does) growing one collection to --chunks, then search against exact search.

    nice -n 5 python bench/store_scale.py --store /tmp/scale --chunks 1000000
    nice -n 5 python bench/store_scale.py --store /tmp/scale --chunks 4000000   # continues that store
    nice -n 5 python bench/store_scale.py --store postgresql://... --chunks 100000
    nice -n 5 python bench/store_scale.py --store /tmp/big --bulk-until 3900096 --chunks 4000256

--bulk-until reaches that size by appending whole parts in groups of ~1M rows (LanceDB only; the parts are
new, so an append is what an upsert would do, without the merge) and one maintenance, which builds the ANN
index, in a child process: the part upserts after it then measure a writer at that size (its latency and
memory, in this process) in minutes rather than 40.

Vectors are deterministic and clustered (4,096 centres, within-cluster cosine ~0.7) so that recall@10
means something; queries are fresh points of the same clusters; exact top-10 is computed by regenerating
every part, never holding the collection. Reports, per milestone (100k, then every doubling, and the
end): part-upsert latency (median and p95 over the last WINDOW parts), search p50/p95 and recall@10, RSS
now and peak (VmHWM) of this process; and the ANN index builds (LanceDB logs them) with their times.
Runs against main's store too (no `settings` argument there): the before/after in one place.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.messages import Chunk
from shared.settings import Settings
from shared.spec import EmbeddingSpec
from shared.store import DocRecord, open_store

DIM, PART, PER_DOC, CENTRES = 384, 512, 8, 4096
WINDOW = 100  # parts in a milestone's upsert figures: two maintenance rounds (one per 50 writes)
BULK_PARTS = 2048  # parts per append of --bulk-until: 1,048,576 rows, Lance's largest file
SPEC = EmbeddingSpec("bench-scale", "rev", "mean", True, 256, 0, "", 254, 25)
CENTRE_VECTORS = np.random.default_rng(0).normal(size=(CENTRES, DIM)).astype(np.float32)


def vectors(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = CENTRE_VECTORS[rng.integers(0, CENTRES, n)] + rng.normal(scale=0.6, size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def part(p: int) -> tuple[list[Chunk], np.ndarray, list[DocRecord]]:
    chunks = [
        Chunk(f"p{p}-c{i}", f"p{p}-d{i // PER_DOC}", i % PER_DOC, f"chunk {i} of part {p}", 40, 0, 200, {"p": p})
        for i in range(PART)
    ]
    docs = [
        DocRecord(f"p{p}-d{j}", f"h{p}-{j}", PER_DOC, f"document {j} of part {p}", {}) for j in range(PART // PER_DOC)
    ]
    return chunks, vectors(p, PART), docs


def bulk_load(uri: str, settings: Settings, first: int, last: int) -> None:
    """Parts first..last-1 appended to both tables in groups of BULK_PARTS, then one maintenance (the ANN
    index's build, compaction, the BTREEs). Run in a child process: its memory is not the writer's."""
    import pyarrow as pa

    from shared.lance_rows import chunk_rows, doc_rows

    BuildLog.install()
    store = open_store(uri, SPEC, settings=settings)
    if first == 0:  # the first part through upsert: it creates the tables, their BTREEs and the manifest
        store.upsert(*part(0))
        first = 1
    started = time.perf_counter()
    for group in range(first, last, BULK_PARTS):
        parts = [part(p) for p in range(group, min(group + BULK_PARTS, last))]
        store._table("").add(pa.concat_tables([chunk_rows(c, v) for c, v, _ in parts]))
        store._table("__docs").add(pa.concat_tables([doc_rows(d) for *_, d in parts]))
        print(f"  appended to {min(group + BULK_PARTS, last) * PART:,} chunks", flush=True)
    store.optimize()
    store.wait_for_index()
    print(f"bulk load and its maintenance took {time.perf_counter() - started:.0f} s", flush=True)


def exact_top10(queries: np.ndarray, parts: int) -> list[list[str]]:
    """Exact cosine top-10 of every query over all parts, one regenerated part at a time."""
    best_s = np.full((len(queries), 10), -2.0, dtype=np.float32)
    best_i = np.full((len(queries), 10), -1, dtype=np.int64)
    for p in range(parts):
        s = queries @ vectors(p, PART).T
        ids = np.arange(p * PART, (p + 1) * PART)[None, :].repeat(len(queries), 0)
        all_s, all_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, ids], 1)
        keep = np.argsort(-all_s, 1)[:, :10]
        best_s, best_i = np.take_along_axis(all_s, keep, 1), np.take_along_axis(all_i, keep, 1)
    return [[f"p{i // PART}-c{i % PART}" for i in row] for row in best_i]


def status_mb(field: str) -> float:
    return int(next(x for x in open("/proc/self/status") if x.startswith(field + ":")).split()[1]) / 1024


def search_figures(store, queries: np.ndarray, parts: int, with_recall: bool) -> dict[str, float]:
    store.search(queries[0], 10)  # warm: the index and the table's metadata
    latencies, found = [], []
    for q in queries:
        started = time.perf_counter()
        hits = store.search(q, 10)
        latencies.append(time.perf_counter() - started)
        found.append([h.chunk_id for h in hits])
    out = {"p50_ms": 1000 * float(np.median(latencies)), "p95_ms": 1000 * float(np.percentile(latencies, 95))}
    if with_recall:
        exact = exact_top10(queries, parts)
        out["recall10"] = float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)]))
    return out


class BuildLog(logging.Handler):
    """Prints the stores' log lines (index builds, maintenance rounds with their steps' times)."""

    def emit(self, record: logging.LogRecord) -> None:
        print("  [index]", time.strftime("%H:%M:%S"), record.getMessage(), flush=True)

    @classmethod
    def install(cls) -> None:
        for name in ("shared.store_lance", "shared.store_pg"):
            logging.getLogger(name).addHandler(cls())
            logging.getLogger(name).setLevel(logging.INFO)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--chunks", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument(
        "--ann-min-rows", type=int, default=Settings().ann_min_rows if hasattr(Settings(), "ann_min_rows") else 0
    )
    ap.add_argument("--milestone-searches", type=int, default=20, help="searches per milestone; 0: a writer's RSS")
    ap.add_argument("--malloc-arenas", type=int, default=Settings().malloc_arenas, help="EMBEDPIPE_MALLOC_ARENAS")
    cache_help = "EMBEDPIPE_INDEX_CACHE_MB; 64: as a write worker"
    ap.add_argument("--index-cache-mb", type=int, default=Settings().index_cache_mb, help=cache_help)
    ap.add_argument("--bulk-until", type=int, default=0, help="reach this many chunks by appends first (LanceDB)")
    args = ap.parse_args()
    BuildLog.install()

    try:
        settings = Settings(
            ann_min_rows=args.ann_min_rows, malloc_arenas=args.malloc_arenas, index_cache_mb=args.index_cache_mb
        )
        store = open_store(args.store, SPEC, settings=settings)
    except TypeError:  # main's store, before this change
        store = open_store(args.store, SPEC)
    start_part = store.count() // PART  # continue a store grown by an earlier run
    if args.bulk_until // PART > start_part:
        loader = multiprocessing.get_context("spawn").Process(
            target=bulk_load, args=(args.store, settings, start_part, args.bulk_until // PART)
        )
        loader.start()
        loader.join()
        if loader.exitcode:
            sys.exit(f"the bulk load failed (exit code {loader.exitcode})")
        start_part = store.count() // PART
    parts = args.chunks // PART
    queries = vectors(10**9, args.queries) + np.random.default_rng(1).normal(scale=0.01, size=(args.queries, DIM))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    sizes = (100_000, 200_000, 400_000, 1_000_000, 2_000_000, 4_000_000, args.ann_min_rows)
    milestones = {m // PART for m in sizes if m} | {parts}
    print(f"store {args.store}: from {start_part * PART} to {parts * PART} chunks", flush=True)
    print("| chunks | part upsert p50 (s) | p95 (s) | search p50 (ms) | p95 (ms) | RSS (MB) | peak RSS (MB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    recent: list[float] = []
    started = time.perf_counter()
    for p in range(start_part, parts):
        chunks, vecs, docs = part(p)
        t0 = time.perf_counter()
        store.upsert(chunks, vecs, docs)
        recent = [*recent[-(WINDOW - 1) :], time.perf_counter() - t0]
        if p + 1 in milestones and p + 1 > start_part:
            if p + 1 == args.ann_min_rows // PART and hasattr(store, "wait_for_index"):
                store.optimize()  # as a writer after a drained load: pgvector builds its index now
                store.wait_for_index()
            s = {"p50_ms": np.nan, "p95_ms": np.nan}
            if args.milestone_searches:
                s = search_figures(store, queries[: args.milestone_searches], p + 1, with_recall=False)
            print(
                f"| {(p + 1) * PART:,} | {np.median(recent):.3f} | {np.percentile(recent, 95):.3f} | {s['p50_ms']:.1f}"
                f" | {s['p95_ms']:.1f} | {status_mb('VmRSS'):.0f} | {status_mb('VmHWM'):.0f} |",
                flush=True,
            )
    print(f"upserts took {time.perf_counter() - started:.0f} s", flush=True)
    if hasattr(store, "wait_for_index"):
        waited = time.perf_counter()
        store.wait_for_index()
        store.optimize()  # what a writer does after a load: the last rows into the index
        store.wait_for_index()
        print(f"waited {time.perf_counter() - waited:.1f} s for the maintenance after the load", flush=True)
    if hasattr(store, "index_stats"):
        print("indexes:", store.index_stats())
    final = search_figures(store, queries, parts, with_recall=True)
    print(
        f"end: {parts * PART:,} chunks, {args.queries} searches: p50 {final['p50_ms']:.1f} ms,"
        f" p95 {final['p95_ms']:.1f} ms, recall@10 {final['recall10']:.3f} against exact;"
        f" RSS {status_mb('VmRSS'):.0f} MB,"
        f" peak {status_mb('VmHWM'):.0f} MB",
        flush=True,
    )
    store.close()


if __name__ == "__main__":
    main()
