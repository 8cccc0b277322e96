"""`embedpipe eval`: compare models, or configurations of one, on the user's own eval set.

Public leaderboards are no substitute for your data: each model spec embeds the eval corpus into a
throwaway store through the embedded pipeline, then the eval queries are run against it.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from shared.quality import EvalSet, corpus_documents, load_beir
from shared.settings import Settings, parse_model
from shared.spec import spec_for
from shared.store import open_store
from workers.embed import make_embedder
from workers.embedded import run_embedded
from workers.probe import run_probe


def subset(eval_set: EvalSet, max_docs: int) -> set[str] | None:
    """The relevant documents of every query, plus the first other documents up to max_docs."""
    if not max_docs:
        return None
    ids = {d for rel in eval_set.qrels.values() for d in rel}
    for doc in corpus_documents(eval_set):
        if len(ids) >= max_docs:
            break
        ids.add(doc.id)
    return ids


def compare(specs: list[str], eval_dir: str, max_docs: int, settings: Settings) -> list[dict[str, Any]]:
    eval_set = load_beir(Path(eval_dir))
    ids = subset(eval_set, max_docs)
    rows = []
    for spec in specs:
        name, dims = parse_model(spec)
        embedder = make_embedder(replace(settings, model=name, dimensions=dims, models="")).warm_up()
        with tempfile.TemporaryDirectory(prefix="embedpipe-eval-") as store:
            configured = replace(settings, model=name, dimensions=dims, models="", store=store)
            summary = run_embedded(configured, corpus_documents(eval_set, ids), embedder=embedder)
            probe = run_probe(open_store(store, spec_for(configured)), embedder, eval_dir)
        rows.append(
            {
                "model": spec,
                "dimensions": embedder.dimension,
                "recall_at_10": probe["recall_at_10"],
                "ndcg_at_10": probe["ndcg_at_10"],
                "documents": summary.documents_stored,
                "chunks_per_s": summary.chunks_per_s,
                "tokens": summary.tokens,
                "cost_usd": 0.0,  # local models; API models (a later issue) price their tokens
            }
        )
    return rows
