"""The model lifecycle: collections per embedding spec, re-embedding, promotion, deletion and sync.

A changed spec (model, weights, dimensions, prefix, chunker) fills a new collection; search keeps
reading the active one until `promote` switches it, which it refuses when the new collection is
incomplete or its quality probe is worse than the active one's by more than the tolerance.

A migration has no gap: the backfill (`reembed`) repeats its pass until a pass finds nothing to embed,
each pass embedding only what the new collection does not hold with its current text (the chunker skips
the rest), so documents edited, added or deleted in the active collection while it ran end in the new
one too; a collection is complete when it holds every document of the active one with the same text
(`progress`), which `promote` checks. `promote` keeps the collection it replaces as the previous one,
which `promote --rollback` makes active again in one step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from shared.embedding import Embedder
from shared.errors import ConfigError
from shared.messages import SourceDoc
from shared.settings import Settings
from shared.store import Store, open_store, slices
from workers.embed import make_embedder
from workers.embedded import Progress, RunSummary, run_embedded
from workers.probe import run_probe

BACKFILL_MAX_PASSES = 5  # a corpus still changing after this many passes: `reembed` again later


def embedder_for(store: Store, settings: Settings) -> Embedder:
    """An embedder that embeds queries as the store's collection was embedded (model, dimensions)."""
    if store.spec is None:
        raise ConfigError("the store has no collection yet: run `embedpipe run PATH` first")
    return make_embedder(store.spec.settings_for(settings))


def stored_sources(store: Store) -> Iterator[SourceDoc]:
    """Every document of a collection as a source again (its clean text), for re-embedding."""
    for record in store.documents():
        yield SourceDoc(id=record.doc_id, text=record.text, metadata=record.metadata)


def progress(location: str) -> dict[str, dict[str, int]]:
    """For each collection but the active one: how many of the active collection's documents it holds
    with the same text (`done`) of how many (`total`), and how many it holds that the active one no
    longer does (`extra`). Reads every document's content hash of each collection, a slice of the active
    one's streamed IDs at a time: memory bounded by the slice, never by the collections."""
    active = open_store(location)
    others: dict[str, Store] = {}
    try:
        if active.collection is None:
            return {}
        for c in active.collections():
            if c["name"] != active.collection:
                others[c["name"]] = open_store(location, collection=c["name"])
        total, done, held_any = 0, dict.fromkeys(others, 0), dict.fromkeys(others, 0)
        for ids in slices(active.doc_ids()):
            total += len(ids)
            current = active.doc_hashes(ids)
            for name, other in others.items():
                held = other.doc_hashes(ids)
                done[name] += sum(held.get(d) == h for d, h in current.items())
                held_any[name] += len(held)
        # extra: what a collection holds beyond the active one's documents (a write meanwhile can make
        # the difference negative for a moment: none then)
        extra = {name: max(0, sum(1 for _ in other.doc_ids()) - held_any[name]) for name, other in others.items()}
        return {name: {"done": done[name], "total": total, "extra": extra[name]} for name in others}
    finally:
        for other in others.values():
            other.close()
        active.close()


def backfill(
    settings: Settings, source: str, embedder: Embedder | None = None, bar: Progress | None = None
) -> list[RunSummary]:
    """Re-embed collection `source` into the collection of `settings`' spec until the two match (see the
    module): one RunSummary per pass. Documents gone from the source are removed from the target."""
    embedder = embedder or make_embedder(settings)
    passes: list[RunSummary] = []
    for _ in range(BACKFILL_MAX_PASSES):
        if bar is not None and passes:  # a catch-up pass: its documents are not known up front
            bar.total, bar.n = 0, 0
            bar.set_description_str("catching up")
        store = open_store(settings.store, collection=source)
        target: Store | None = None
        try:
            passes.append(run_embedded(settings, stored_sources(store), embedder=embedder, progress=bar))
            # the target's documents the source no longer holds, looked up a slice at a time (no ID set)
            target = open_store(settings.store, collection=passes[-1].collection)
            gone = [d for ids in slices(target.doc_ids()) for d in sorted(set(ids) - store.doc_hashes(ids).keys())]
            target.forget_documents(gone)  # in slices too (the store's ID_SLICE)
        finally:
            if target is not None:
                target.close()
            store.close()
        if not passes[-1].documents_stored and not gone:
            break
    return passes


@dataclass
class Decision:
    allowed: bool
    message: str


def promotion(collections: list[dict[str, Any]], target: str, tolerance: float) -> Decision:
    """May `target` become the active collection? Compares completeness and the quality probes."""
    by_name = {c["name"]: c for c in collections}
    if target not in by_name:
        raise ConfigError(f"no collection {target!r}; see `embedpipe collections`")
    active = next((c for c in collections if c["active"]), None)
    new = by_name[target]
    if active is None:
        return Decision(True, f"{target} is the first active collection")
    if active["name"] == target:
        return Decision(True, f"{target} is already the active collection")
    done = new.get("backfill")
    if done and (done["done"] < done["total"] or done["extra"]):
        return Decision(
            False,
            f"{target} holds {done['done']} of the {done['total']} documents of the active {active['name']} "
            f"with their current text (and {done['extra']} it no longer has): the backfill is not complete, "
            "run `embedpipe reembed` again",
        )
    if new["documents"] < active["documents"]:
        return Decision(
            False,
            f"{target} holds {new['documents']} documents, the active {active['name']} {active['documents']}: "
            "the re-embed is not complete",
        )
    old_probe, new_probe = active.get("probe"), new.get("probe")
    if not old_probe or not new_probe:
        missing = target if not new_probe else active["name"]
        return Decision(False, f"no quality probe of {missing}: run `embedpipe promote --probe-eval DIR`")
    if old_probe.get("eval") != new_probe.get("eval"):
        return Decision(False, "the two quality probes used different eval sets: run them again with --probe-eval DIR")
    old, now = old_probe["recall_at_10"], new_probe["recall_at_10"]
    if now < old - tolerance:
        return Decision(
            False,
            f"recall@10 of {target} is {now:.3f}, of the active {active['name']} {old:.3f}: "
            f"a drop of {old - now:.3f} > tolerance {tolerance:.3f}",
        )
    return Decision(True, f"recall@10 {old:.3f} -> {now:.3f} (tolerance {tolerance:.3f})")


def probe_collection(location: str, name: str, eval_dir: str, settings: Settings) -> dict[str, Any]:
    """Run the quality probe on one collection, with the model that embedded it; record it there."""
    store = open_store(location, collection=name)
    try:
        result = run_probe(store, embedder_for(store, settings), eval_dir)
        store.record_probe(result)
        return result
    finally:
        store.close()
