"""The maintenance of a LanceDB collection, run in a child process that the store's writer starts
(`python -m shared.lance_maintenance STORE COLLECTION ANN_MIN_ROWS`): the ANN index trained when due,
then compaction of the new fragments, which join every index. Through pylance (Lance itself): LanceDB's
optimize() merges every index into one each time, rewriting the whole ANN index, and takes no options."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import lance  # pylance: this module runs only in the maintenance's child process

from shared.store_lance import LanceStore, ann_due, lance_session

log = logging.getLogger(__name__)

ANN_INDEX = "vector_idx"
# Rows per IVF partition at the training. LanceDB's default (8,192) left 31 partitions at 254k chunks, so
# 20 probes scanned 65% of the table; at 4,096 a query scans search_nprobes partitions of 4-8k rows.
ANN_PARTITION_ROWS = 4096
# Each maintenance indexes the new rows as a delta index of its own, for the ANN index and the BTREEs
# alike: merging them into one index rewrote the whole index each time (the ANN's: 8 s at 826k chunks,
# where a delta took 0.3 s; a BTREE's: 1.5-2 s at 4.4M: bench/README.md). A lookup or search probes every
# delta, so past this many they are merged: the BTREE's all into one, the ANN's all but the trained base.
MAX_DELTAS = 8
# Compaction merges the fragments smaller than this into ones of this size (Lance's default, 1,048,576,
# rewrote up to a million rows a round).
COMPACT_TARGET_ROWS = 131_072
# Compacting a fragment that an index covers makes Lance rewrite ("remap") every index segment over it:
# the whole BTREE at each round (2-3 s at 4.4M chunks). So a round compacts only the new, unindexed
# fragments, and leaves the indexed ones (one small fragment a round) until more than this many are
# small; an indexed fragment with deletions to drop (MAX_DELETED of its rows) is compacted at once.
MAX_SMALL_INDEXED = 32
MAX_DELETED = 0.1
# The child yields the CPU to the writer that started it (and to searches): at 4M chunks the maintenance
# runs much of the time, beside a writer on the same cores.
NICE = 10
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
    """Compact the table's new fragments and add them to every index as a delta (see MAX_DELTAS); then
    drop the versions this replaced. Returns the seconds of each step. A compaction can lose the commit
    race to a writer updating rows it rewrote ("Retryable commit conflict"): it is tried once more, then
    left to the next one. (Index builds and compactions never race: one lock.)"""
    took: dict[str, float] = {}
    for attempt in (1, 2):
        try:
            with _timed(took, "files"):
                dataset = lance.dataset(uri)
                dataset.optimize.compact_files(
                    target_rows_per_fragment=COMPACT_TARGET_ROWS, excluded_fragment_ids=_settled(dataset)
                )
            segments = Counter(i["name"] for i in lance.dataset(uri).list_indices())
            for index, count in sorted(segments.items()):
                merge = 0  # a new delta
                if count > MAX_DELTAS:
                    merge = count - 1 if index == ANN_INDEX else count  # the ANN's trained base stays
                with _timed(took, "ANN" if index == ANN_INDEX else "BTREE"):
                    lance.dataset(uri).optimize.optimize_indices(index_names=[index], num_indices_to_merge=merge)
            with _timed(took, "cleanup"):
                lance.dataset(uri).cleanup_old_versions(older_than=KEEP_VERSIONS)
            return took
        except Exception as e:  # pylance raises OSError or RuntimeError for a lost commit race
            if "commit conflict" not in str(e).lower():
                raise
            if attempt == 2:
                log.warning("compaction of %s lost to a concurrent commit; left to the next one: %s", name, e)
    return took


def _settled(dataset: lance.LanceDataset) -> list[int]:
    """The fragments a compaction should leave alone: those an index covers (see MAX_SMALL_INDEXED),
    except the ones with deletions to drop; none once more than MAX_SMALL_INDEXED of them are small."""
    indexed = {f for index in dataset.list_indices() for f in index["fragment_ids"]}
    fragments = [f.metadata for f in dataset.get_fragments() if f.fragment_id in indexed]
    if sum(f.physical_rows < COMPACT_TARGET_ROWS for f in fragments) > MAX_SMALL_INDEXED:
        return []
    return [f.id for f in fragments if f.num_deletions < MAX_DELETED * f.physical_rows]


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
    os.nice(NICE)
    print(maintain(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
