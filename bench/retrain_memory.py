"""The IVF index's retraining: its memory, time and search, by index type (IVF_SQ, the maintenance's, or
IVF_RQ) and k-means (Lance's on its whole sample, or streamed: `streaming_sample_rate`), on copies of a
store a scale.py run kept:

    python bench/scale.py --docs 25000 --model .bench/static-minilm --tmp /tmp/s --keep
    python bench/retrain_memory.py --store /tmp/s/embedpipe-scale-XXXX/store --index IVF_SQ --rates 0,16
    python bench/retrain_memory.py --store STORE --index IVF_RQ --rates 0 --partitions 627

For each rate in turn (0: Lance's k-means on its whole sample, `--sample-rates` vectors a partition
(Lance's default 256) held at once, as the store's maintenance trains it: LanceDB's IvfRq and IvfSq run
the same builds with the same defaults; N: at most N vectors a partition at a time, the centroids
trained on a weighted coreset of them), and each sample rate:

  - a copy of the store: hard links, so instant and no room taken (the build writes new files beside
    them; store.json and the lock files are copied);
  - the chunk table's index (cosine; ANN_PARTITION_ROWS rows a partition, or --partitions: 627 over
    4.35M chunks is what the pipeline's training at 2.57M left) trained again in a child process with
    the maintenance's environment (MAINTENANCE_LANCE_ENV) and malloc bounds: its peak RSS (GNU time)
    and its time;
  - then, as a fresh reader, search p50/p95 and recall@10 against exact search (scale.py's
    search_figures: SciFact's first 100 test queries).

The copy is deleted after; the store is left as it was. The CPU is printed first: name it with every figure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import fast  # noqa: E402  (bench/fast.py: cpu_name)
import harness as h  # noqa: E402  (bench/harness.py: SCIFACT)
from scale import search_figures  # noqa: E402

from shared.store_lance import MAINTENANCE_LANCE_ENV  # noqa: E402

# The child bounds glibc's malloc as the maintenance child does (LanceStore's _bound_malloc): without it,
# the same build peaked 1.1 GB instead of 622 MB over 1M chunks (stop 33), so stop 32's figures overstate.
TRAIN = """
import sys
from shared.settings import Settings
from shared.store_lance import _bound_malloc
_bound_malloc(Settings().malloc_arenas)
import lance
from shared.lance_maintenance import ANN_INDEX, ANN_PARTITION_ROWS
uri, kind = sys.argv[1], sys.argv[4]
rows, rate, partitions, sample = (int(sys.argv[i]) for i in (2, 3, 5, 6))
partitions = partitions or max(1, rows // ANN_PARTITION_ROWS)
lance.dataset(uri).create_index(
    "vector", kind, name=ANN_INDEX, metric="cosine", replace=True, num_partitions=partitions,
    streaming_sample_rate=rate or None, sample_rate=sample,
)
print(partitions)
"""


def linked_copy(store: Path, copy: Path) -> None:
    """The store's files hard-linked into copy, but for the files written in place (store.json, locks)."""
    shutil.rmtree(copy, ignore_errors=True)
    subprocess.run(["cp", "-al", str(store), str(copy)], check=True)
    for path in copy.iterdir():
        if path.is_file():  # store.json and the lock files: copied, so the original stays as it was
            path.unlink()
            shutil.copy2(store / path.name, path)


def retrain(copy: Path, rate: int, kind: str, partitions: int, sample: int) -> dict:
    """Train the copy's ANN index again in a child process: its partitions, seconds and peak RSS."""
    import lance

    (collection,) = [p.stem for p in copy.glob("*.lance") if not p.stem.endswith("__docs")]
    uri = str(copy / f"{collection}.lance")
    rows = lance.dataset(uri).count_rows()
    env = MAINTENANCE_LANCE_ENV | dict(os.environ) | {"PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    # GNU time starts the child: a child forked by this process (grown by the searches) would count this
    # process's RSS at the fork in its peak (Linux's maxrss survives the exec)
    train = [sys.executable, "-c", TRAIN, uri, str(rows), str(rate), kind, str(partitions), str(sample)]
    child = subprocess.run(
        ["/usr/bin/time", "-f", "peak_kb %M", *train],
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"the retraining at rate {rate} failed: {child.stderr.strip()[-500:]}")
    peak_kb = int(child.stderr.split("peak_kb ")[-1].split()[0])
    partitions = int(child.stdout.split()[-1])
    return {"rows": rows, "partitions": partitions, "build_s": round(seconds, 1), "peak_rss_mb": round(peak_kb / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="a LanceDB store scale.py kept (left unchanged)")
    parser.add_argument("--work", type=Path, help="where the copy goes (default: beside the store)")
    parser.add_argument("--rates", default="0,16", help="streaming sample rates, in turn; 0: Lance's whole sample")
    parser.add_argument("--index", default="IVF_SQ", choices=("IVF_SQ", "IVF_RQ"), help="the index type")
    parser.add_argument(
        "--partitions", type=int, default=0, help="IVF partitions (default: ANN_PARTITION_ROWS rows each)"
    )
    parser.add_argument(
        "--sample-rates", default="256", help="k-means training vectors a partition (Lance's sample_rate), in turn"
    )
    parser.add_argument("--scifact", type=Path, default=h.SCIFACT, help="BEIR SciFact directory")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    copy = (args.work or args.store.parent) / f"{args.store.name}.retrain-copy"
    print(fast.cpu_name(), flush=True)
    results = []
    try:
        for rate, sample in itertools.product(
            (int(r) for r in args.rates.split(",")), [int(s) for s in args.sample_rates.split(",")]
        ):
            linked_copy(args.store, copy)
            figures = {"index": args.index, "streaming_sample_rate": rate, "sample_rate": sample} | retrain(
                copy, rate, args.index, args.partitions, sample
            )
            search = search_figures(str(copy), args.scifact)
            figures |= {k: search[k] for k in ("p50_ms", "p95_ms", "recall@10", "peak_rss_searching_mb")}
            print(json.dumps(figures), flush=True)
            results.append(figures)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps({"cpu": fast.cpu_name(), "runs": results}, indent=1))


if __name__ == "__main__":
    main()
