"""pgvector's HNSW index on a large collection: build time, size and recall for each graph.

    python bench/pg_index.py --store postgresql://... [--graphs 16:128,16:128:halfvec] [--ef 100,200,400,800,1000]
                             [--memory-mb 512,4096] [--latency-only] [--out FILE.json]

On the active collection of a store a run kept (e.g. `bench/scale.py --docs 200000 --store URL --keep
--set EMBEDPIPE_ANN_MIN_ROWS=0`: loaded, no index), first the exact top-10 of SciFact's first 100 test
queries (one streamed pass over every vector), then for each graph (m:ef_construction, :halfvec for a
graph of half-precision vectors, EMBEDPIPE_HNSW_TYPE) and build memory:
the index dropped and built again by the store's own code (`optimize()`, as a writer does after a load:
CREATE INDEX CONCURRENTLY with EMBEDPIPE_HNSW_M, EMBEDPIPE_HNSW_EF_CONSTRUCTION and
EMBEDPIPE_HNSW_BUILD_MEMORY_MB), its build time and size, and for each ef_search recall@10 and p50/p95 of
the store's search (k=10; the second round of the queries, the first warms). The last graph's index is
left in place. `--graphs existing` measures the index in place without building one, and `--latency-only`
skips the exact pass and recall (the same index timed again after the server restarts with another
shared_buffers, say). The CPU is printed first: name it with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import fast  # noqa: E402  (bench/fast.py: cpu_name)
import harness as h  # noqa: E402
import scale  # noqa: E402  (bench/scale.py: embed_queries, exact_top10, recall_at_10)


def build(store, settings, m: int, ef_construction: int, kind: str, memory_mb: int) -> dict:
    """Drop the collection's index and build it again with this graph; its build time and size."""
    store.settings = dataclasses.replace(
        settings,
        hnsw_m=m,
        hnsw_ef_construction=ef_construction,
        hnsw_type=kind,
        hnsw_build_memory_mb=memory_mb,
        ann_min_rows=1,
    )
    with store._pool.connection() as conn:
        conn.execute(f"DROP INDEX IF EXISTS {store.table}_hnsw")
    started = time.perf_counter()
    store.optimize()
    store.wait_for_index()
    seconds = time.perf_counter() - started
    if not store.has_index():
        raise SystemExit(f"the build of m={m}, ef_construction={ef_construction} failed: see the log above")
    return {"build_s": round(seconds, 1), "index_mb": index_mb(store)}


def index_mb(store) -> int:
    with store._pool.connection() as conn:
        size = conn.execute("SELECT pg_relation_size(%s)", (f"{store.table}_hnsw",)).fetchone()[0]
    return round(size / 2**20)


def sweep(store, queries: np.ndarray, exact: list[list[str]] | None, efs: list[int]) -> list[dict]:
    rows = []
    for ef in efs:
        store.settings = dataclasses.replace(store.settings, ef_search=ef)
        for _ in range(2):  # the second round is measured: the first brings the index's pages in
            latencies, found = [], []
            for q in queries:
                started = time.perf_counter()
                found.append([hit.chunk_id for hit in store.search(q, 10)])
                latencies.append(time.perf_counter() - started)
        rows.append(
            {
                "ef_search": ef,
                "recall@10": scale.recall_at_10(found, exact) if exact else None,
                "p50_ms": round(1000 * float(np.median(latencies)), 1),
                "p95_ms": round(1000 * float(np.percentile(latencies, 95)), 1),
            }
        )
        recall = f"recall@10 {rows[-1]['recall@10']:.3f}, " if exact else ""
        print(f"    ef_search {ef:5d}: {recall}p50 {rows[-1]['p50_ms']} ms", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="a postgresql:// URL of a store a run kept")
    parser.add_argument(
        "--graphs",
        default="16:128",
        help="m:ef_construction[:vector or :halfvec; the store's type if none], or `existing` (the index in place, "
        "not rebuilt), comma-separated",
    )
    parser.add_argument("--ef", default="100,200,400,800,1000", help="ef_search values to measure recall at")
    parser.add_argument(
        "--memory-mb",
        default="2048",
        help="EMBEDPIPE_HNSW_BUILD_MEMORY_MB values, comma-separated (the most a build asks for)",
    )
    parser.add_argument(
        "--latency-only", action="store_true", help="no exact pass, no recall: the same index timed again"
    )
    parser.add_argument("--scifact", type=Path, default=h.SCIFACT, help="BEIR SciFact directory")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from shared.settings import Settings
    from shared.store import open_store

    print(f"CPU: {fast.cpu_name()}", flush=True)
    settings = Settings.from_env(store=args.store)
    store = open_store(settings.store, settings=settings)
    try:
        queries = scale.embed_queries(store, settings, args.scifact, 100)
        started = time.perf_counter()
        exact = None if args.latency_only else scale.exact_top10(store, queries)
        result = {
            "cpu": fast.cpu_name(),
            "chunks": store.count(),
            "exact_pass_s": round(time.perf_counter() - started, 1),
        }
        with store._pool.connection() as conn:
            for name in ("max_parallel_maintenance_workers", "shared_buffers"):
                result[name] = conn.execute(f"SHOW {name}").fetchone()[0]
        exact_pass = f"exact top-10 in {result['exact_pass_s']} s" if exact else "no exact pass"
        print(f"{result['chunks']:,} chunks; {exact_pass}; shared_buffers {result['shared_buffers']}", flush=True)
        result["builds"] = []
        for graph in args.graphs.split(","):
            if graph == "existing":  # the index in place, as a run or an earlier build left it
                if not store.has_index():
                    raise SystemExit("--graphs existing: the collection has no valid HNSW index")
                row = {"graph": "existing", "type": store._indexed, "index_mb": index_mb(store)}
                print(f"the index in place ({row['type']}, {row['index_mb']} MB):", flush=True)
                row["search"] = sweep(store, queries, exact, [int(x) for x in args.ef.split(",")])
                result["builds"].append(row)
                continue
            m, ef_construction, kind = f"{graph}:{settings.hnsw_type}".split(":")[:3]  # the store's type unless named
            for memory_mb in (int(x) for x in args.memory_mb.split(",")):
                print(f"m {m}, ef_construction {ef_construction}, {kind}, build memory {memory_mb} MB:", flush=True)
                row = {"m": int(m), "ef_construction": int(ef_construction), "type": kind, "memory_mb": memory_mb}
                row |= build(store, settings, int(m), int(ef_construction), kind, memory_mb)
                print(f"    built in {row['build_s']} s, {row['index_mb']} MB", flush=True)
                row["search"] = sweep(store, queries, exact, [int(x) for x in args.ef.split(",")])
                result["builds"].append(row)
                if args.out:
                    args.out.write_text(json.dumps(result, indent=2))
    finally:
        store.close()


if __name__ == "__main__":
    main()
