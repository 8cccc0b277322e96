"""Model migrations without a gap: a re-embed that documents are edited, added and deleted under ends
with the new collection holding exactly the active one's current documents; `collections` shows it
backfilling, then complete; `promote` keeps the previous collection, `promote --rollback` returns to it.
The real model, real LanceDB."""

from __future__ import annotations

import json

import pytest

from producer.lifecycle import Decision, backfill, progress, promotion
from shared.messages import SourceDoc
from shared.settings import Settings
from shared.store import open_store
from workers.embedded import run_embedded

from .helpers import cli_env, embedpipe, short_documents


class EditsMidBackfill:
    """A progress bar (what `reembed` passes to the run) whose first update, once a part of the backfill
    is written, edits, adds and deletes documents in the active collection, as a concurrent `run` would."""

    total: float | None = 0
    n: float = 0

    def __init__(self, old: Settings, embedder, location: str) -> None:
        self.old, self.embedder, self.location = old, embedder, location
        self.seen: dict[str, dict[str, int]] = {}

    def refresh(self) -> None:
        pass

    def set_description_str(self, desc: str | None = None, refresh: bool = True) -> None:
        pass

    def update(self, n: float = 1) -> bool | None:
        if not self.seen:
            self.seen = progress(self.location)  # mid-backfill: what `collections` shows now
            edits = [
                SourceDoc("doc-00003", text="An edited note: kites fly best in a steady sea breeze."),
                SourceDoc("added-1", text="A note added during the backfill, about bees and tea."),
            ]
            run_embedded(self.old, edits, embedder=self.embedder)
            open_store(self.location).forget_documents(["doc-00005"])  # a sync removed it from the active one
        return None


@pytest.mark.slow
def test_a_reembed_catches_edits_made_during_it_and_promote_can_roll_back(tmp_path, embedder):
    location = str(tmp_path / "store")
    old = Settings.from_env({}, store=location, batch_docs=8)
    new = Settings.from_env({}, store=location, batch_docs=8, dimensions=128)
    docs = [SourceDoc(d["id"], text=d["text"]) for d in short_documents(40)]
    run_embedded(old, docs, embedder=embedder)
    first = open_store(location).collection

    bar = EditsMidBackfill(old, embedder, location)
    passes = backfill(new, first, bar=bar)
    second = passes[0].collection
    assert bar.seen[second]["done"] < bar.seen[second]["total"] == 40, "the edits did not land mid-backfill"
    assert len(passes) >= 2 and passes[-1].documents_stored == 0

    active, target = open_store(location, collection=first), open_store(location, collection=second)
    ids = sorted(active.doc_ids())
    assert "added-1" in ids and "doc-00005" not in ids and len(ids) == 40
    assert set(target.doc_ids()) == set(ids) and target.doc_hashes(ids) == active.doc_hashes(ids)
    assert "sea breeze" in next(r.text for r in target.documents() if r.doc_id == "doc-00003")
    assert progress(location) == {second: {"done": 40, "total": 40, "extra": 0}}

    env = cli_env(EMBEDPIPE_STORE=location)

    def states() -> dict[str, str]:
        return {
            c["name"]: c["state"] for c in json.loads(embedpipe("collections", "--json", env=env).stdout)["collections"]
        }

    assert states() == {first: "active", second: "complete"}
    embedpipe("promote", second, "--force", env=env)  # (no quality probe here: --force)
    assert states() == {first: "previous", second: "active"}
    out = embedpipe("promote", "--rollback", env=env).stdout
    assert f"{first} is the active collection again" in out and states() == {first: "active", second: "previous"}
    embedpipe("promote", second, "--force", env=env)
    assert states() == {first: "previous", second: "active"} and open_store(location).collection == second


def test_promotion_refuses_a_collection_short_of_the_active_ones_current_documents():
    rows = [
        {"name": "a", "active": True, "documents": 10},
        {"name": "b", "active": False, "documents": 10, "backfill": {"done": 9, "total": 10, "extra": 0}},
    ]
    decision = promotion(rows, "b", 0.02)
    assert decision == Decision(False, decision.message) and "holds 9 of the 10 documents" in decision.message
    rows[1]["backfill"] = {"done": 10, "total": 10, "extra": 1}  # one the active collection no longer has
    assert not promotion(rows, "b", 0.02).allowed
