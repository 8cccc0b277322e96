"""Incremental processing and Matryoshka truncation, measured on BEIR SciFact.

    python bench/incremental.py [--eval DIR] [--docs N]

1. First run vs unchanged re-run: `embedpipe run corpus.jsonl` twice, as whole processes (imports,
   model load and all), on the SciFact corpus (title + " " + text per document).
2. The edit case: the sample corpus's Markdown guides as one ~60-chunk document; edit one paragraph,
   run again; chunks re-embedded / chunks in the document. Then, with the chunker alone, the same for
   an edit of every paragraph in turn (the worst case and the distribution).
3. Matryoshka: recall@10 and nDCG@10 on SciFact's test queries with the first 384, 256 and 128
   dimensions of the stored vectors (and of the query vectors), re-normalised: exactly what
   EMBEDPIPE_DIMENSIONS does (tests/test_incremental.py checks the pipeline's vectors equal this).
Takes ~12 minutes on 2 cores for the full corpus (the first run embeds ~10k chunks).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.messages import Document, content_hash  # noqa: E402
from shared.models import ModelTokenizer  # noqa: E402
from shared.quality import corpus_documents, evaluate, load_beir  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.spec import chunk_policy  # noqa: E402
from shared.store import Hit, open_store  # noqa: E402
from workers.chunk import chunk_document  # noqa: E402
from workers.load import clean_text  # noqa: E402

DEFAULT_EVAL = ROOT.parent / "shared" / "data" / "scifact"
EMBEDPIPE = str(Path(sys.executable).parent / "embedpipe")


def run(store: Path, *args: str) -> tuple[float, dict]:
    started = time.perf_counter()
    out = subprocess.run(
        [EMBEDPIPE, "run", *args, "--store", str(store), "--json", "--no-progress"],
        capture_output=True,
        text=True,
        check=True,
    )
    return time.perf_counter() - started, json.loads(out.stdout)


def first_and_unchanged(eval_dir: Path, docs: int, tmp: Path) -> dict:
    eval_set = load_beir(eval_dir)
    corpus = tmp / "corpus.jsonl"
    with corpus.open("w") as f:
        for i, doc in enumerate(corpus_documents(eval_set)):
            if docs and i >= docs:
                break
            f.write(json.dumps({"id": doc.id, "text": doc.text}) + "\n")
    store = tmp / "scifact"
    first_s, first = run(store, str(corpus))
    again_s, again = run(store, str(corpus))
    return {
        "documents": first["documents"],
        "chunks": first["chunks"],
        "first_run_s": round(first_s, 1),
        "unchanged_run_s": round(again_s, 2),
        "speed-up": round(first_s / again_s, 1),
        "unchanged_run_chunks_embedded": again["chunks_embedded"],
        "unchanged_run_model_load_s": again["model_load_seconds"],
        "store": str(store),
    }


def edit_case(tmp: Path) -> dict:
    text = clean_text("\n\n".join(p.read_text() for p in sorted((ROOT / "examples" / "docs").glob("*.md"))))
    folder = tmp / "guide"
    folder.mkdir()
    (folder / "guide.md").write_text(text)
    store = tmp / "guide-store"
    _, first = run(store, str(folder))
    paragraphs = text.split("\n\n")
    middle = max(range(len(paragraphs) // 3, 2 * len(paragraphs) // 3), key=lambda i: len(paragraphs[i]))
    paragraphs[middle] = paragraphs[middle].replace(" ", " quite ", 1) + " An added closing sentence."
    (folder / "guide.md").write_text("\n\n".join(paragraphs))
    _, again = run(store, str(folder))

    # The chunker alone: edit each paragraph in turn; how many chunk texts are new?
    tokenizer = ModelTokenizer("all-MiniLM-L6-v2")
    policy = chunk_policy(Settings(), tokenizer)
    before = {c.text for c in chunk_document(Document("d", text, content_hash(text)), tokenizer, policy)}
    new_chunks: Counter[int] = Counter()
    paragraphs = text.split("\n\n")
    for k, paragraph in enumerate(paragraphs):
        if len(paragraph) < 80:  # headings and list items: edits there are too small to say much
            continue
        edited = "\n\n".join([*paragraphs[:k], paragraph.replace(" ", " quite ", 1), *paragraphs[k + 1 :]])
        after = chunk_document(Document("d", edited, content_hash(edited)), tokenizer, policy)
        new_chunks[sum(c.text not in before for c in after)] += 1
    return {
        "document_chunks": first["chunks"],
        "edit_chunks_re_embedded": again["chunks_embedded"],
        "edit_chunks_from_cache": again["chunks_cached"],
        "every_paragraph_edited": {"edits": sum(new_chunks.values()), "new_chunks_histogram": dict(new_chunks)},
    }


class Truncated:
    """The store's vectors and the query vectors cut to `dims` and re-normalised, searched exactly."""

    def __init__(self, store: object, embedder: object, dims: int) -> None:
        vectors = dict(store.vectors())  # type: ignore[attr-defined]
        self.ids = list(vectors)
        self.docs = {cid: did for did, cids in store.chunk_ids(sorted(store.doc_ids())).items() for cid in cids}  # type: ignore[attr-defined]
        self.matrix = self._cut(np.stack([vectors[i] for i in self.ids]), dims)
        self.embedder, self.dims = embedder, dims

    @staticmethod
    def _cut(m: np.ndarray, dims: int) -> np.ndarray:
        m = m[:, :dims]
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    def embed(self, texts: list[str]) -> np.ndarray:
        return self._cut(self.embedder.embed(texts), self.dims)  # type: ignore[attr-defined]

    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        scores = self.matrix @ vector
        top = np.argsort(-scores)[:k]
        return [Hit(self.docs[self.ids[i]], self.ids[i], 0, float(scores[i]), "", {}) for i in top]


def matryoshka(eval_dir: Path, store_path: str) -> list[dict]:
    from workers.embedder import LocalEmbedder

    eval_set = load_beir(eval_dir)
    embedder = LocalEmbedder("all-MiniLM-L6-v2").warm_up()
    store = open_store(store_path)
    rows = []
    for dims in (384, 256, 128):
        view = Truncated(store, embedder, dims)
        scores = evaluate(view, view, eval_set)
        rows.append(
            {"dimensions": dims, "recall@10": round(scores["recall@10"], 4), "ndcg@10": round(scores["ndcg@10"], 4)}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval", type=Path, default=DEFAULT_EVAL, help="BEIR-layout directory")
    parser.add_argument("--docs", type=int, default=0, help="only the first N documents (0: all)")
    args = parser.parse_args()
    if not (args.eval / "corpus.jsonl").is_file():
        sys.exit(f"no BEIR eval set at {args.eval}")
    with tempfile.TemporaryDirectory() as tmp:
        result = {"first_vs_unchanged": first_and_unchanged(args.eval, args.docs, Path(tmp))}
        print(json.dumps(result, indent=2), flush=True)
        result["edit"] = edit_case(Path(tmp))
        print(json.dumps(result["edit"], indent=2), flush=True)
        if not args.docs:
            result["matryoshka"] = matryoshka(args.eval, result["first_vs_unchanged"]["store"])
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
