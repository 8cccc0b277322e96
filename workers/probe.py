"""The quality probe: recall@10 and nDCG@10 of the store on a fixed BEIR-layout eval set (queries
and relevance judgements about documents of the user's own corpus). It catches model regressions,
chunking bugs and bad data before users do. The janitor enqueues it on the embed queue (a process
with the model loaded) whenever the pipeline goes idle after new writes; `embedpipe probe` and
`embedpipe run --probe-eval DIR` run it in process.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from shared.embedding import Embedder
from shared.errors import ConfigError
from shared.quality import evaluate, load_beir
from shared.store import Store, open_store
from workers.context import WorkerContext

log = logging.getLogger(__name__)


def run_probe(store: Store, embedder: Embedder, eval_dir: str) -> dict[str, Any]:
    path = Path(eval_dir)
    if not (path / "queries.jsonl").is_file() or not (path / "qrels" / "test.tsv").is_file():
        raise ConfigError(f"{eval_dir} is not a BEIR-layout eval set (queries.jsonl, qrels/test.tsv)")
    started = time.perf_counter()
    scores = evaluate(
        store, embedder.warm_up(), load_beir(path), query_prefix=store.spec.query_prefix if store.spec else ""
    )
    result = {
        "collection": store.collection or "",
        "recall_at_10": round(scores["recall@10"], 4),
        "ndcg_at_10": round(scores["ndcg@10"], 4),
        "queries": scores["queries"],
        "eval": str(path),
        "at": time.time(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info(
        "quality probe: recall@10 %.3f, nDCG@10 %.3f on %d queries",
        result["recall_at_10"],
        result["ndcg_at_10"],
        result["queries"],
    )
    return result


def probe_job(ctx: WorkerContext, eval_dir: str, chunks_written: int) -> dict[str, Any]:
    """rq job (embed queue): probe the store and record the result for the janitor to export."""
    if ctx.resources.store is None:  # the embed pool opens the store for its first probe only
        ctx.resources.store = open_store(ctx.settings.store, ctx.spec, settings=ctx.settings)
    result = run_probe(ctx.store, ctx.embedder, eval_dir) | {"chunks_written": chunks_written}
    ctx.ledger.record_probe(result)
    ctx.store.record_probe(result)
    return result
