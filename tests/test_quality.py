"""Retrieval quality end to end on a real evaluation set (BEIR SciFact), through the embedded mode.

The full corpus takes ~10 minutes here, so the test uses a fixed subset (tests/helpers.py): the first SUBSET_QUERIES
test queries, all their relevant documents, and the first DISTRACTORS other documents of the corpus.
`bench/quality.py` runs the full set (recall@10 must reach 0.753, 0.03 below the published 0.783).
With only 300 distractors the subset is easier than the full corpus, so its bar is its own: the
recall@10 this very subset measured (MEASURED, `python bench/quality.py --subset`) less the same 0.03
margin the full run gets below the published figure. The pipeline is deterministic on one machine
(same chunks, same model), so a drop of 0.03 (3 of 100 queries losing their document) means that
loading, chunking, embedding, storing or search changed.
"""

from __future__ import annotations

import pytest

from shared.quality import corpus_documents, evaluate, load_beir
from shared.settings import Settings
from shared.store import open_store
from workers.embedded import run_embedded

from .helpers import SUBSET_QUERIES, scifact_subset

pytestmark = pytest.mark.slow

MEASURED = 0.96  # recall@10 of this subset (nDCG@10 0.890), bench/quality.py --subset, 2026-11-29
THRESHOLD = MEASURED - 0.03


def test_recall_at_10_on_a_scifact_subset(scifact, tmp_path, embedder):
    eval_set, ids = scifact_subset(load_beir(scifact))
    settings = Settings.from_env({}, store=str(tmp_path / "store"))
    summary = run_embedded(settings, corpus_documents(eval_set, ids), embedder=embedder)
    assert summary.failed == 0 and summary.documents_stored == len(ids)
    scores = evaluate(open_store(settings.store), embedder, eval_set)
    assert scores["queries"] == SUBSET_QUERIES
    assert scores["recall@10"] >= THRESHOLD, scores
