"""Embedded mode end to end on the sample corpus, in process and through the CLI."""

import json
from collections import Counter

import pytest

from producer.sources import iter_sources, resolve
from shared.ledger import LocalLedger, local_ledger_path
from shared.settings import Settings
from shared.store import open_store
from workers.embedded import run_embedded

from .helpers import EXAMPLES, cli_env, embedpipe

pytestmark = pytest.mark.slow


def run_examples(store, embedder, exclude=("README.md",)):
    settings = Settings.from_env({}, store=str(store))
    items = iter_sources(resolve([str(EXAMPLES)], exclude), settings.max_doc_bytes)
    return run_embedded(settings, items, embedder=embedder)


def test_sample_corpus_is_stored_completely_once_and_searchable(tmp_path, embedder, tokenizer):
    summary = run_examples(tmp_path / "store", embedder)
    store = open_store(str(tmp_path / "store"))
    assert summary.failed == 0 and summary.documents == summary.documents_stored >= 30
    assert store.count() == summary.chunks == summary.chunks_embedded
    rows = store.search(embedder.embed(["how do I fix a flat bicycle tyre"])[0], 5)
    assert rows[0].doc_id == "docs/bicycle-flat-tyre.md"
    # every document is there, none twice, and no chunk over the model's limit
    ids = store.chunk_ids([f"docs/{n}" for n in ("redis-basics.md", "vector-search.md")])
    assert all(len(v) >= 2 for v in ids.values())
    vectors = dict(store.vectors())
    assert len(vectors) == store.count()

    again = run_examples(tmp_path / "store", embedder)  # unchanged: skipped, nothing duplicated
    assert store.count() == summary.chunks and again.unchanged == summary.documents and again.chunks == 0


def test_bad_documents_are_dead_letters_beside_the_store(tmp_path, embedder):
    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "good.md").write_text("# Tea\n\nGreen tea is steeped at about 80 °C for two minutes.")
    (corpus / "empty.txt").write_text("   \n")
    (corpus / "blob.bin").write_bytes(b"\x00\xff" * 500)
    (corpus / "records.jsonl").write_text('{"id": "r1", "text": "Black tea takes boiling water."}\n{broken\n')
    settings = Settings.from_env({}, store=str(tmp_path / "store"))
    summary = run_embedded(settings, iter_sources(resolve([str(corpus)]), 10**6), embedder=embedder)
    assert (summary.documents, summary.documents_stored, summary.failed) == (5, 2, 3)
    ledger = LocalLedger(local_ledger_path(tmp_path / "store"))
    assert {(d.doc_id, d.reason) for d in ledger.dead()} == {
        ("empty.txt", "empty"),
        ("blob.bin", "unsupported_type"),
        ("records.jsonl:2", "decode_error"),
    }
    assert ledger.counters()["documents_done"] == 2


def test_cli_run_search_status_failed(tmp_path, tokenizer):
    env = cli_env(EMBEDPIPE_STORE=str(tmp_path / "store"))
    corpus = tmp_path / "in"
    corpus.mkdir()
    texts = [
        "Pour-over coffee wants a medium-fine grind and water just off the boil.",
        "To fix a flat tyre, find the puncture, patch the tube and reinflate it.",
    ]
    (corpus / "coffee.md").write_text(texts[0])
    (corpus / "bikes.txt").write_text(texts[1])
    (corpus / "empty.txt").write_text("")
    summary = json.loads(embedpipe("run", str(corpus), "--json", env=env).stdout)
    assert {k: summary[k] for k in ("documents", "chunks", "chunks_embedded")} == {
        "documents": 3,
        "chunks": 2,
        "chunks_embedded": 2,
    }
    assert summary["tokens"] == sum(tokenizer.count(texts))  # one chunk each: the whole text
    hits = json.loads(embedpipe("search", "repair a punctured bicycle wheel", "-k", "2", "--json", env=env).stdout)[
        "hits"
    ]
    assert [h["doc_id"] for h in hits] == ["bikes.txt", "coffee.md"]
    assert {"doc_id", "chunk_id", "score", "text"} <= set(hits[0]) and hits[0]["score"] > hits[1]["score"]
    failed = json.loads(embedpipe("failed", "--json", env=env).stdout)["failed"]
    assert [(f["doc_id"], f["stage"], f["reason"]) for f in failed] == [("empty.txt", "load", "empty")]
    status = json.loads(embedpipe("status", "--json", env=env).stdout)
    assert Counter({k: status[k] for k in ("documents_done", "documents_failed", "chunks_stored")}) == Counter(
        {"documents_done": 2, "documents_failed": 1, "chunks_stored": 2}
    )


def test_run_probes_quality_and_eval_compares_configurations(tmp_path, scifact):
    env = cli_env(EMBEDPIPE_STORE=str(tmp_path / "store"))
    summary = json.loads(
        embedpipe("run", str(EXAMPLES), "--json", "--probe-eval", str(EXAMPLES / "eval"), env=env).stdout
    )
    assert summary["failed"] == 0 and summary["probe"]["queries"] == 10
    assert summary["probe"]["recall_at_10"] >= 0.9  # the sample corpus answers its own questions
    probed = json.loads(embedpipe("probe", "--eval", str(EXAMPLES / "eval"), "--json", env=env).stdout)
    assert probed["recall_at_10"] == summary["probe"]["recall_at_10"]
    assert json.loads(embedpipe("status", "--json", env=env).stdout)["probe"]["queries"] == 10

    rows = json.loads(
        embedpipe(
            "eval",
            "--models",
            "all-MiniLM-L6-v2,all-MiniLM-L6-v2@96",
            "--eval",
            str(scifact),
            "--max-docs",
            "400",
            "--json",
            env=env,
        ).stdout
    )["models"]
    full, truncated = rows
    assert (full["dimensions"], truncated["dimensions"]) == (384, 96)
    assert full["documents"] == truncated["documents"] >= 300
    assert full["recall_at_10"] > truncated["recall_at_10"] > 0.3  # truncating an untrained model costs quality
