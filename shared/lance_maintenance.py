"""The maintenance of a LanceDB collection, run in a child process that the store's writer starts
(`python -m shared.lance_maintenance STORE COLLECTION ANN_MIN_ROWS`): the ANN index trained when due,
then compaction of the new fragments, which join every index. Through pylance (Lance itself): LanceDB's
optimize() merges every index into one each time, rewriting the whole ANN index, and takes no options."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import lance  # pylance: this module runs only in the maintenance's child process

from shared.store_lance import LanceStore, ann_due, lance_session

log = logging.getLogger(__name__)

ANN_INDEX = "vector_idx"
# Rows per IVF partition at the training. LanceDB's default (8,192) left 31 partitions at 254k chunks, so
# 20 probes scanned 65% of the table; at 4,096 a query scans 20 partitions of 4-8k rows whatever the size.
ANN_PARTITION_ROWS = 4096
# Each maintenance indexes the new rows as a delta index of its own: merging them into one index rewrote
# the whole index each time (8 s at 826k chunks, where a delta took 0.3 s: bench/README.md). Search probes
# every delta, so past this many the deltas (never the big trained base) are merged into one.
ANN_MAX_DELTAS = 8
# Cleanup removes the versions a compaction or index update replaced; they stayed on disk for LanceDB's
# default 7 days (at 800k chunks: 7.4 GB on disk for 1.3 GB of data). A reader of a version older than
# this (a whole-table stream running longer) fails.
KEEP_VERSIONS = timedelta(minutes=10)


@contextmanager
def _timed(took: dict[str, float], label: str) -> Iterator[None]:
    """Add the seconds the block takes to took[label]."""
    started = time.monotonic()
    try:
        yield
    finally:
        took[label] = took.get(label, 0.0) + time.monotonic() - started


def compact(uri: str, name: str) -> dict[str, float]:
    """Compact the table's new fragments and add them to every index: the BTREEs merged into one (cheap),
    the ANN index's new rows as a delta (see ANN_MAX_DELTAS); then drop the versions this replaced.
    Returns the seconds of each step. A compaction can lose the commit race to a writer updating rows it
    rewrote ("Retryable commit conflict"): it is tried once more, then left to the next one. (Index
    builds and compactions never race: one lock.)"""
    took: dict[str, float] = {}
    for attempt in (1, 2):
        try:
            with _timed(took, "files"):
                lance.dataset(uri).optimize.compact_files()
            indexes = [i["name"] for i in lance.dataset(uri).list_indices()]
            scalar = sorted({i for i in indexes if i != ANN_INDEX})
            if scalar:
                with _timed(took, "BTREE"):
                    lance.dataset(uri).optimize.optimize_indices(index_names=scalar)
            deltas = indexes.count(ANN_INDEX)
            if deltas:
                merge = deltas - 1 if deltas > ANN_MAX_DELTAS else 0  # all but the base, or a new delta
                with _timed(took, "ANN"):
                    lance.dataset(uri).optimize.optimize_indices(index_names=[ANN_INDEX], num_indices_to_merge=merge)
            with _timed(took, "cleanup"):
                lance.dataset(uri).cleanup_old_versions(older_than=KEEP_VERSIONS)
            return took
        except Exception as e:  # pylance raises OSError or RuntimeError for a lost commit race
            if "commit conflict" not in str(e).lower():
                raise
            if attempt == 2:
                log.warning("compaction of %s lost to a concurrent commit; left to the next one: %s", name, e)
    return took


def maintain(path: Path, name: str, ann_min_rows: int) -> str:
    """The maintenance of one collection, in the child process optimize() starts, under the collection's
    index lock (a file lock: one at a time across processes): the ANN index built (or trained again,
    replacing the old one) when due, then both tables compacted, their new fragments into every index."""
    import fcntl

    import lancedb
    from lancedb.index import IvfSq

    handle = LanceStore(path, collection=name)
    db = lancedb.connect(str(path), session=lance_session())
    with open(path / f".{name}.index.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "another process maintains it"
        done = []
        table = db.open_table(name)
        rows = table.count_rows()
        if ann_due(rows, handle._trained_rows(), ann_min_rows):
            started = time.monotonic()
            partitions = max(1, rows // ANN_PARTITION_ROWS)
            config = IvfSq(distance_type="cosine", num_partitions=partitions)
            table.create_index("vector", config=config, name=ANN_INDEX, replace=True)
            handle._update_manifest(lambda data: data["collections"][name].update(ann_rows=rows))
            took = time.monotonic() - started
            done.append(f"ANN index built over {rows} chunks ({partitions} partitions) in {took:.1f} s")
        started = time.monotonic()
        steps: dict[str, float] = {}
        for kind in ("", "__docs"):
            if name + kind in db.list_tables().tables:
                for label, seconds in compact(str(path / f"{name}{kind}.lance"), name + kind).items():
                    steps[label] = steps.get(label, 0.0) + seconds
        each = ", ".join(f"{label} {seconds:.1f}" for label, seconds in steps.items())
        done.append(f"compacted in {time.monotonic() - started:.1f} s ({each})")
        return ", ".join(done)


if __name__ == "__main__":  # python -m shared.lance_maintenance STORE COLLECTION ANN_MIN_ROWS: optimize()'s child
    print(maintain(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
