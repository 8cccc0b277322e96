"""Incremental processing and the model lifecycle, on the real model and real stores: unchanged
documents cost nothing, an edit re-embeds only the chunks around it, deletions and syncs remove
documents, and a new embedding spec fills its own collection until it is promoted."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY
from redis import Redis

from shared.ledger import LocalLedger, local_ledger_path
from shared.messages import Chunk, Document, SourceDoc, content_hash
from shared.settings import Settings
from shared.spec import chunk_policy
from shared.store import open_store
from workers.chunk import chunk_document
from workers.embedded import run_embedded
from workers.load import clean_text

from .helpers import EXAMPLES, cli_env, embedpipe, scrape, worker_pool

pytestmark = pytest.mark.slow

WRITES = ("upsert", "delete", "documents")


def counted() -> dict[str, float]:
    """Model work and store writes so far in this process (the metrics module's counters)."""
    sample = REGISTRY.get_sample_value
    out = {"model_tokens": sample("embedpipe_embed_tokens_total") or 0.0}
    out |= {op: sample("embedpipe_store_writes_total", {"op": op}) or 0.0 for op in WRITES}
    return out


def long_document() -> str:
    """The sample corpus's Markdown guides as one ~60-chunk document with headings and paragraphs."""
    return clean_text("\n\n".join(p.read_text() for p in sorted((EXAMPLES / "docs").glob("*.md"))))


def test_unchanged_documents_cost_no_model_call_and_no_store_write(tmp_path, embedder):
    settings = Settings.from_env({}, store=str(tmp_path / "store"))
    sources = [SourceDoc(f"doc-{i}", text=f"Document {i}. " + f"A sentence about topic {i}. " * 20) for i in range(8)]
    first = run_embedded(settings, sources, embedder=embedder)
    assert first.documents_stored == 8 and first.chunks_embedded == first.chunks > 0

    before = counted()
    again = run_embedded(settings, sources, embedder=embedder)
    assert counted() == before, "an unchanged resubmission called the model or wrote to the store"
    assert (again.unchanged, again.chunks, again.chunks_embedded, again.documents_stored) == (8, 0, 0, 0)
    # the ledger counts as the distributed mode does: stored once, then skipped (tests/test_batch.py)
    counters = LocalLedger(local_ledger_path(settings.store_path)).counters()
    assert counters == {"documents_done": 8, "chunks_written": first.chunks, "documents_skipped": 8}

    # The unchanged path does not even import torch or sentence-transformers (a fresh process).
    script = f"""
import json, sys
from shared.messages import SourceDoc
from shared.settings import Settings
from workers.embedded import run_embedded
sources = [SourceDoc(f"doc-{{i}}", text=f"Document {{i}}. " + f"A sentence about topic {{i}}. " * 20)
           for i in range(8)]
summary = run_embedded(Settings.from_env({{}}, store={str(tmp_path / "store")!r}), sources)
print(json.dumps({{"unchanged": summary.unchanged, "torch": "torch" in sys.modules,
                  "st": "sentence_transformers" in sys.modules}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=cli_env(), check=True)
    assert json.loads(out.stdout) == {"unchanged": 8, "torch": False, "st": False}


def test_editing_one_paragraph_re_embeds_only_the_chunks_around_it(tmp_path, embedder, tokenizer):
    settings = Settings.from_env({}, store=str(tmp_path / "store"))
    text = long_document()
    first = run_embedded(settings, [SourceDoc("guide", text=text)], embedder=embedder)
    assert 45 <= first.chunks <= 80, first.chunks

    paragraphs = text.split("\n\n")
    middle = max(range(len(paragraphs) // 3, 2 * len(paragraphs) // 3), key=lambda i: len(paragraphs[i]))
    paragraphs[middle] = paragraphs[middle].replace(" ", " quite ", 1) + " An added closing sentence."
    edited = "\n\n".join(paragraphs)
    again = run_embedded(settings, [SourceDoc("guide", text=edited)], embedder=embedder)
    assert again.chunks == again.chunks_embedded + again.chunks_cached
    assert 1 <= again.chunks_embedded <= 3, f"{again.chunks_embedded} of {again.chunks} chunks re-embedded"

    policy = chunk_policy(Settings(), tokenizer)
    expected = {c.chunk_id for c in chunk_document(Document("guide", edited, content_hash(edited)), tokenizer, policy)}
    store = open_store(settings.store)
    assert store.chunk_ids(["guide"]) == {"guide": expected}, "stale chunks left behind, or new ones missing"
    assert store.doc_hashes(["guide"]) == {"guide": content_hash(edited, {"source": "guide"})}  # text and metadata


def test_the_cache_serves_boilerplate_shared_by_documents(tmp_path, embedder):
    settings = Settings.from_env({}, store=str(tmp_path / "store"))
    footer = "This page is maintained by the documentation team. Report mistakes to the issue tracker."
    run_embedded(settings, [SourceDoc("a", text=footer)], embedder=embedder)
    summary = run_embedded(settings, [SourceDoc("b", text=footer)], embedder=embedder)
    assert (summary.chunks_cached, summary.chunks_embedded, summary.documents_stored) == (1, 0, 1)
    vectors = dict(open_store(settings.store).vectors())
    assert len(vectors) == 2
    a, b = vectors.values()
    np.testing.assert_array_equal(a, b)


def test_a_document_written_whole_replaces_its_old_chunks_in_the_same_write(tmp_path):
    from shared.spec import EmbeddingSpec
    from shared.store import DocRecord

    store = open_store(str(tmp_path / "store"), EmbeddingSpec("m", "rev", "mean", True, 256, 0, "", 254, 25))
    rng = np.random.default_rng(0)

    def version(tag: str, n: int) -> list:
        return [Chunk(f"{tag}-{i}", "doc", i, f"{tag} {i}", 2, 0, 3, {}) for i in range(n)]

    store.upsert(version("old", 3), rng.normal(size=(3, 8)).astype(np.float32), [DocRecord("doc", "h1", 3, "", {})])
    store.upsert(version("x", 1), rng.normal(size=(1, 8)).astype(np.float32))  # another write, not whole
    store.upsert(version("new", 2), rng.normal(size=(2, 8)).astype(np.float32), [DocRecord("doc", "h2", 2, "", {})])
    assert store.chunk_ids(["doc"]) == {"doc": {"new-0", "new-1"}}
    assert store.doc_hashes(["doc"]) == {"doc": "h2"}


def test_delete_and_prune_remove_documents_from_every_collection(tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(EXAMPLES / "docs", corpus)
    store = tmp_path / "store"
    env = cli_env(EMBEDPIPE_STORE=str(store))
    embedpipe("run", str(corpus), env=env)
    embedpipe("run", str(corpus), "--dimensions", "64", env=env)  # a second collection
    ids = sorted(p.name for p in corpus.iterdir())

    (corpus / ids[0]).unlink()
    summary = json.loads(embedpipe("run", str(corpus), "--prune", "--json", env=env).stdout)
    assert summary["unchanged"] == len(ids) - 1 and summary["chunks"] == 0
    out = embedpipe("delete", ids[1], "no-such-document", env=env).stdout
    assert "deleted 1 of 2 documents" in out
    for collection in json.loads(embedpipe("collections", "--json", env=env).stdout)["collections"]:
        handle = open_store(str(store), collection=collection["name"])
        assert set(handle.doc_ids()) == set(ids[2:]), collection["name"]
        assert handle.chunk_ids(ids[:2]) == {ids[0]: set(), ids[1]: set()}


def test_a_new_spec_fills_its_own_collection_and_promote_guards_quality(tmp_path):
    """Changing the dimensions never mixes vectors: the new spec writes its own collection, search
    stays on the old one until `promote`, which refuses a collection whose recall@10 dropped."""
    store = tmp_path / "store"
    env = cli_env(EMBEDPIPE_STORE=str(store))
    eval_dir = str(EXAMPLES / "eval")
    embedpipe("run", str(EXAMPLES), "--probe-eval", eval_dir, env=env)
    embedpipe("run", str(EXAMPLES), "--dimensions", "128", env=env)
    rows = {
        c["spec"]["dimensions"]: c
        for c in json.loads(embedpipe("collections", "--json", env=env).stdout)["collections"]
    }
    full, small = rows[0], rows[128]
    assert full["active"] and not small["active"] and full["chunks"] == small["chunks"] > 0

    by_id = {
        name: dict(open_store(str(store), collection=c["name"]).vectors())
        for name, c in (("full", full), ("small", small))
    }
    assert {len(v) for v in by_id["full"].values()} == {384} and {len(v) for v in by_id["small"].values()} == {128}
    for chunk_id, vector in by_id["small"].items():  # truncated and re-normalised, not mixed
        head = by_id["full"][chunk_id][:128]
        np.testing.assert_allclose(vector, head / np.linalg.norm(head), atol=2e-3)
    assert open_store(str(store)).collection == full["name"], "search moved before promotion"

    # 4 dimensions lose recall on the sample eval set: refused; --force overrides.
    embedpipe("run", str(EXAMPLES), "--dimensions", "4", env=env)
    refused = embedpipe("promote", "--dimensions", "4", "--probe-eval", eval_dir, env=env, check=False)
    assert refused.returncode == 1 and "promotion refused" in refused.stderr and "drop" in refused.stderr
    assert open_store(str(store)).collection == full["name"]
    # 128 dimensions keep recall within the tolerance: allowed.
    promoted = embedpipe("promote", small["name"], "--probe-eval", eval_dir, env=env)
    assert "is now the active collection" in promoted.stdout
    assert open_store(str(store)).collection == small["name"]
    hits = json.loads(embedpipe("search", "how do I fix a flat bicycle tyre", "--json", env=env).stdout)["hits"]
    assert hits[0]["doc_id"] == "docs/bicycle-flat-tyre.md"
    forced = embedpipe("promote", "--dimensions", "4", "--force", env=env)
    assert "(forced)" in forced.stdout


def test_reembed_takes_the_text_from_the_store(tmp_path):
    store = tmp_path / "store"
    env = cli_env(EMBEDPIPE_STORE=str(store))
    corpus = tmp_path / "corpus"
    shutil.copytree(EXAMPLES / "docs", corpus)
    embedpipe("run", str(corpus), env=env)
    shutil.rmtree(corpus)  # the sources are gone: the store keeps each document's text
    plan = embedpipe("reembed", "--dimensions", "256", "--dry-run", env=env).stdout
    documents = len(list((EXAMPLES / "docs").iterdir()))
    assert f"{documents} documents" in plan and "local model: no API cost" in plan
    # The dry run plans as `estimate` does (one planner): the document prefix goes with every chunk.
    prefixed = embedpipe("reembed", "--doc-prefix", "passage: ", "--dry-run", env=env).stdout
    estimate = embedpipe("estimate", str(EXAMPLES / "docs"), "--doc-prefix", "passage: ", "--json", env=env).stdout
    tokens = {
        name: int(re.search(r"(\d+) tokens", out).group(1)) for name, out in (("plain", plan), ("prefix", prefixed))
    }
    assert tokens["prefix"] == json.loads(estimate)["tokens"] > tokens["plain"]
    embedpipe("reembed", "--dimensions", "256", env=env)
    rows = {
        c["spec"]["dimensions"]: c
        for c in json.loads(embedpipe("collections", "--json", env=env).stdout)["collections"]
    }
    assert rows[256]["documents"] == rows[0]["documents"] == documents
    assert rows[256]["chunks"] == rows[0]["chunks"]
    assert Path(store / "store.json").is_file()


def test_distributed_pools_skip_unchanged_documents_and_sync_deletions(redis_url, tmp_path, tokenizer):
    corpus = tmp_path / "corpus"
    shutil.copytree(EXAMPLES / "docs", corpus)
    store = str(tmp_path / "store")
    env = cli_env(EMBEDPIPE_REDIS_URL=redis_url, EMBEDPIPE_STORE=store, EMBEDPIPE_INBOX_WAIT_S="0.2")
    redis = Redis.from_url(redis_url)
    ids = sorted(p.name for p in corpus.iterdir())
    with worker_pool(env, tmp_path / "logs", redis, metrics=True) as pool:
        embedpipe("enqueue", str(corpus), env=env)
        embedpipe("wait", "--timeout", "600", env=env, timeout=660)
        tokens = ("embedpipe_embed_tokens_total", ())
        writes = [("embedpipe_store_writes_total", (("op", op),)) for op in WRITES]
        skipped = ("embedpipe_documents_total", (("outcome", "skipped"), ("stage", "chunk")))
        embed0, write0 = scrape(pool.metrics_ports["embed-0"]), scrape(pool.metrics_ports["write-0"])
        assert embed0[tokens] > 0 and write0[writes[0]] > 0

        embedpipe("enqueue", str(corpus), env=env)  # unchanged
        embedpipe("wait", "--timeout", "600", env=env, timeout=660)
        assert scrape(pool.metrics_ports["embed-0"])[tokens] == embed0[tokens], "the model ran again"
        write1 = scrape(pool.metrics_ports["write-0"])
        assert [write1.get(w, 0) for w in writes] == [write0.get(w, 0) for w in writes], "the store was written"
        assert scrape(pool.metrics_ports["chunk-0"])[skipped] == len(ids)

        # Edit one paragraph of one file, delete another, and sync.
        edited = corpus / ids[0]
        text = edited.read_text()
        edited.write_text(text.replace("\n\n", "\n\nA new first sentence for this paragraph. ", 1))
        (corpus / ids[1]).unlink()
        out = embedpipe("enqueue", str(corpus), "--prune", env=env).stdout
        assert "prune enqueued" in out
        embedpipe("wait", "--timeout", "600", env=env, timeout=660)
        embed2 = scrape(pool.metrics_ports["embed-0"])
    pool.assert_clean_exit()
    handle = open_store(store)
    assert ids[1] not in set(handle.doc_ids()) and handle.chunk_ids([ids[1]]) == {ids[1]: set()}
    assert set(handle.doc_ids()) == set(ids) - {ids[1]}
    new_text = clean_text(edited.read_text())
    policy = chunk_policy(Settings(), tokenizer)
    chunks = chunk_document(Document(ids[0], new_text, content_hash(new_text)), tokenizer, policy)
    assert handle.chunk_ids([ids[0]]) == {ids[0]: {c.chunk_id for c in chunks}}
    cache = {r: ("embedpipe_embed_cache_total", (("result", r),)) for r in ("hit", "miss")}
    missed = embed2[cache["miss"]] - embed0[cache["miss"]]
    assert 1 <= missed <= 3 and embed2[cache["hit"]] - embed0[cache["hit"]] == len(chunks) - missed
