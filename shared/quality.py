"""Retrieval quality on a BEIR-layout eval set: recall@k and nDCG@k with documents ranked by their
best chunk. Used by the quality benchmark and the quality test (and later by the probe)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.embedding import Embedder
from shared.messages import SourceDoc
from shared.store_types import Store


@dataclass(frozen=True)
class EvalSet:
    queries: dict[str, str]  # query id -> text
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}
    corpus_path: Path


def load_beir(directory: Path, split: str = "test") -> EvalSet:
    qrels: dict[str, dict[str, int]] = {}
    with open(directory / "qrels" / f"{split}.tsv", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if int(row["score"]) > 0:
                qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    queries = {}
    with open(directory / "queries.jsonl") as f:
        for line in f:
            q = json.loads(line)
            if q["_id"] in qrels:
                queries[q["_id"]] = q["text"]
    return EvalSet(queries, qrels, directory / "corpus.jsonl")


def corpus_documents(eval_set: EvalSet, ids: set[str] | None = None, title: str = "text") -> Iterator[SourceDoc]:
    """The corpus as documents. title: "text" puts it before the text (title + " " + text, as MTEB embeds
    it), "metadata" keeps it apart as metadata "title" (for EMBEDPIPE_CHUNK_TEMPLATE), "none" drops it."""
    with open(eval_set.corpus_path) as f:
        for line in f:
            d = json.loads(line)
            if ids is None or d["_id"] in ids:
                name = d.get("title", "")
                text = (name + " " + d["text"]).strip() if title == "text" else d["text"]
                yield SourceDoc(id=d["_id"], text=text, metadata={"title": name} if title == "metadata" else {})


def rank_documents(hits: list[tuple[str, float]], k: int) -> list[str]:
    """Documents in order of their best chunk's score, top k."""
    best: dict[str, float] = {}
    for doc_id, score in hits:
        best[doc_id] = max(score, best.get(doc_id, -math.inf))
    return sorted(best, key=lambda d: -best[d])[:k]


def recall_at_k(ranked: list[str], relevant: dict[str, int], k: int = 10) -> float:
    """BEIR's definition: the share of the query's relevant documents found in the top k."""
    return len(set(ranked[:k]) & set(relevant)) / len(relevant)


def ndcg_at_k(ranked: list[str], relevant: dict[str, int], k: int = 10) -> float:
    dcg = sum(relevant.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def evaluate(
    store: Store,
    embedder: Embedder,
    eval_set: EvalSet,
    k: int = 10,
    chunks_per_query: int = 100,
    query_prefix: str = "",
) -> dict[str, float]:
    """Mean recall@k and nDCG@k over the eval set's queries, searching `store` with `embedder`."""
    ids = list(eval_set.queries)
    vectors = np.asarray(embedder.embed([query_prefix + eval_set.queries[q] for q in ids]))
    recalls, ndcgs = [], []
    for qid, vector in zip(ids, vectors, strict=True):
        hits = store.search(vector, chunks_per_query)
        ranked = rank_documents([(h.doc_id, h.score) for h in hits], k)
        recalls.append(recall_at_k(ranked, eval_set.qrels[qid], k))
        ndcgs.append(ndcg_at_k(ranked, eval_set.qrels[qid], k))
    return {f"recall@{k}": float(np.mean(recalls)), f"ndcg@{k}": float(np.mean(ndcgs)), "queries": len(ids)}
