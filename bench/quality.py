"""Retrieval quality of the whole pipeline on BEIR SciFact (5,183 abstracts, 300 test queries).

    python bench/quality.py [--eval DIR] [--subset] [--model M] [--title text|metadata|none] [--template T]

Embeds the corpus (title + " " + text) with the embedded mode into a throwaway store, runs the test
queries, ranks documents by their best chunk and prints recall@10 and nDCG@10 next to the published
figures for all-MiniLM-L6-v2 (0.783 / 0.645). The spine's bar: recall@10 >= 0.753.
--subset runs the fixed subset the test suite uses (tests/test_quality.py), to derive its threshold.
--title metadata --template '{title}\\n{chunk}' measures EMBEDPIPE_CHUNK_TEMPLATE: the title before every
chunk rather than once before the text (--title text, the default) or not at all (--title none).
Takes ~10 minutes on 2 cores for the full corpus.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.quality import corpus_documents, evaluate, load_beir
from shared.settings import Settings
from shared.store import open_store
from workers.embedded import run_embedded
from workers.embedder import LocalEmbedder

DEFAULT_EVAL = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "scifact"
PUBLISHED = {"recall@10": 0.783, "ndcg@10": 0.645}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval", type=Path, default=DEFAULT_EVAL, help="BEIR-layout directory")
    parser.add_argument("--subset", action="store_true", help="the test suite's fixed subset")
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="model name or directory (a static model)")
    parser.add_argument("--backend", default="torch", help="EMBEDPIPE_BACKEND")
    parser.add_argument("--title", choices=("text", "metadata", "none"), default="text", help="where the title goes")
    parser.add_argument("--template", default="", help="EMBEDPIPE_CHUNK_TEMPLATE, e.g. '{title}\\n{chunk}'")
    args = parser.parse_args()
    if not (args.eval / "corpus.jsonl").is_file():
        sys.exit(f"no BEIR eval set at {args.eval}")
    eval_set, ids = load_beir(args.eval), None
    if args.subset:
        from tests.helpers import scifact_subset as subset

        eval_set, ids = subset(eval_set)
    embedder = LocalEmbedder(args.model, backend=args.backend).warm_up()
    with tempfile.TemporaryDirectory() as store:
        settings = Settings.from_env(
            {}, store=store, model=args.model, backend=args.backend, chunk_template=args.template
        )
        from tqdm import tqdm

        with tqdm(total=0, unit="chunk", desc="embedding") as bar:
            summary = run_embedded(
                settings, corpus_documents(eval_set, ids, args.title), embedder=embedder, progress=bar
            )
        started = time.perf_counter()
        scores = evaluate(open_store(store), embedder, eval_set)
        scores["query_seconds"] = round(time.perf_counter() - started, 1)
    config = {"model": args.model, "backend": args.backend, "title": args.title, "template": args.template}
    result = {"summary": summary.to_dict(), "scores": scores, "published": PUBLISHED, "subset": args.subset, **config}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
