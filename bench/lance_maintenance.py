"""One collection's maintenance, LanceDB's optimize() against ours (shared/lance_maintenance.py), side by
side on copies of one store grown by store_scale.py:

    python bench/store_scale.py --store /tmp/s800 --chunks 800256 --milestone-searches 0
    python bench/lance_maintenance.py --store /tmp/s800 --work /tmp/maint --rounds 9

Each variant starts from a copy of the store. A round upserts --parts parts (512 chunks each, as the writer
does; the maintenance off meanwhile), then runs the maintenance once, timed: LanceDB's `optimize()` (what the
store ran before) or ours (compaction, BTREEs merged, the new rows as a delta of the ANN index). At the end:
search p50/p95 over 50 queries and recall@10 against exact search, and the ANN index's segments.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from store_scale import DIM, PART, SPEC, exact_top10, part, vectors

from shared.lance_maintenance import ANN_INDEX, KEEP_VERSIONS, compact
from shared.settings import Settings
from shared.store import open_store


def run(variant: str, store_dir: Path, work: Path, rounds: int, parts: int) -> None:
    import lance
    import lancedb

    copy = work / variant
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(store_dir, copy)
    store = open_store(str(copy), SPEC, settings=Settings())
    store.optimize = lambda *a, **k: None  # the maintenance runs only where this script says
    uri = str(copy / f"{store.collection}.lance")
    times, steps = [], {}
    for _ in range(rounds):
        first = store.count() // PART
        for p in range(first, first + parts):
            store.upsert(*part(p))
        started = time.perf_counter()
        if variant == "lancedb":
            lancedb.connect(str(copy)).open_table(store.collection).optimize(cleanup_older_than=KEEP_VERSIONS)
        else:
            for label, seconds in compact(uri, store.collection).items():
                steps[label] = steps.get(label, 0.0) + seconds
        times.append(time.perf_counter() - started)
    rows = store.count()
    queries = vectors(10**9, 50) + np.random.default_rng(1).normal(scale=0.01, size=(50, DIM))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    for q in queries[:5]:
        store.search(q, 10)
    latencies, found = [], []
    for q in queries:
        started = time.perf_counter()
        found.append({h.chunk_id for h in store.search(q, 10)})
        latencies.append(time.perf_counter() - started)
    recall = np.mean([len(f & set(e)) / 10 for f, e in zip(found, exact_top10(queries, rows // PART), strict=True)])
    segments = [i["name"] for i in lance.dataset(uri).list_indices()].count(ANN_INDEX)
    print(
        f"| {variant} | {rows:,} | {' / '.join(f'{t:.2f}' for t in times)} | {sum(times):.1f} | {segments}"
        f" | {1000 * np.median(latencies):.1f} | {1000 * np.percentile(latencies, 95):.1f} | {recall:.3f} |",
        flush=True,
    )
    if steps:
        print(f"| ours, by step (s, all rounds) | {', '.join(f'{k} {v:.2f}' for k, v in steps.items())} |")
    shutil.rmtree(copy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, type=Path, help="a store grown by store_scale.py (left unchanged)")
    ap.add_argument("--work", required=True, type=Path, help="where the copies go (one at a time)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--parts", type=int, default=50, help="parts upserted before each maintenance (the writer's 50)")
    args = ap.parse_args()
    columns = ("chunks at the end", "each round (s)", "all (s)", "ANN segments", "search p50 (ms)", "p95", "recall@10")
    print("| maintenance | " + " | ".join(columns) + " |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for variant in ("lancedb", "ours"):
        run(variant, args.store, args.work, args.rounds, args.parts)


if __name__ == "__main__":
    main()
