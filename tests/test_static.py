"""Static embedding models and token IDs end to end: `embedpipe distill` makes a model that both
runtimes take; chunks carry the model's token IDs and the embed stage feeds them to the model as they
are, with the same vectors as embedding the text; bad model directories and foreign token IDs fail
loudly. Real model, real Redis, real worker processes."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from redis import Redis

from producer.sources import iter_sources, resolve
from shared.errors import ConfigError, DecodeError
from shared.messages import SourceDoc
from shared.models import STATIC_CHUNK_TOKENS, ModelTokenizer
from shared.settings import Settings
from shared.spec import chunk_policy, spec_for
from shared.store import open_store
from shared.vectors import pack_token_ids, unpack_token_ids
from workers.chunk import chunk_batch
from workers.embedder import LocalEmbedder
from workers.load import load_batch

from .helpers import EXAMPLES, cli_env, embedpipe, worker_pool

pytestmark = pytest.mark.slow


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def example_chunks(model: str, n: int = 40):
    """Real chunks of the sample corpus, cut for `model`."""
    sources = [s.to_dict() for s in iter_sources(resolve([str(EXAMPLES)]), 10**7) if isinstance(s, SourceDoc)]
    docs, _ = load_batch(sources[:n], 10**7)
    tokenizer = ModelTokenizer(model)
    return chunk_batch(docs, tokenizer, chunk_policy(Settings(), tokenizer))


@pytest.mark.parametrize("which", ["default", "static"])
def test_token_id_embedding_equals_text_embedding(which, static_model, embedder):
    model = "all-MiniLM-L6-v2" if which == "default" else str(static_model)
    e = embedder if which == "default" else LocalEmbedder(model, "cpu").warm_up()
    chunks = example_chunks(model)
    assert all(len(unpack_token_ids(c)) == c.tokens > 0 for c in chunks)
    for prefix in ("", "passage: "):
        from_ids = e.embed_chunks(chunks, prefix)
        from_text = e.embed_chunks([replace(c, token_ids=b"") for c in chunks], prefix)  # tokenised here
        cosine = (from_ids * from_text).sum(axis=1)
        assert cosine.min() >= 0.9999, (which, prefix, float(cosine.min()))
    assert from_ids.shape == (len(chunks), 384 if which == "default" else 256)


def test_distill_makes_a_static_model_with_its_own_spec_and_chunk_size(static_model):
    files = {p.name for p in static_model.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "modules.json", "config.json"} <= files
    assert not [p for p in static_model.parent.iterdir() if p.name.startswith(".")]  # no staging left
    static = spec_for(Settings.from_env({}, model=str(static_model)))
    default = spec_for(Settings.from_env({}))
    assert static.pooling == "static" and static.max_seq_length == 0
    assert static.chunk_tokens == STATIC_CHUNK_TOKENS and static.collection != default.collection
    assert static.revision != default.revision
    # a chunk size of its own is honoured, and is part of the spec
    longer = spec_for(Settings.from_env({}, model=str(static_model), chunk_tokens=512))
    assert longer.chunk_tokens == 512 and longer.fingerprint != static.fingerprint
    # distilling again into the same place is refused without --force
    again = embedpipe("distill", "--out", str(static_model), env=cli_env(), check=False)
    assert again.returncode == 1 and "exists" in again.stderr and "Traceback" not in again.stderr


def test_incomplete_or_foreign_model_directories_are_one_line_errors(static_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(static_model, broken)
    (broken / "model.safetensors").unlink()
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "modules.json").write_text("this is not json")
    for directory, complaint in ((broken, "no weights"), (stranger, "modules.json")):
        with pytest.raises(ConfigError, match=complaint):
            ModelTokenizer(str(directory))
        for args in (["run", str(EXAMPLES / "docs")], ["worker", "embed", "--burst"]):
            env = cli_env(EMBEDPIPE_MODEL=str(directory), EMBEDPIPE_STORE=str(tmp_path / "store"))
            done = embedpipe(*args, env=env, check=False, timeout=120)
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 1 and len(lines) == 1 and complaint in lines[0], (args, done.stderr[-800:])


def test_token_ids_of_another_vocabulary_fail_instead_of_embedding_garbage(static_model):
    static = LocalEmbedder(str(static_model), "cpu").warm_up()
    minilm = ModelTokenizer("all-MiniLM-L6-v2")
    vocab = static._tokenizer.vocab_size
    assert vocab < minilm.vocab_size  # distilling dropped MiniLM's unused tokens: other IDs
    # a whole word whose MiniLM ID lies past the end of the static vocabulary ("thyroid": 29610)
    rare = next(
        w for i in range(minilm.vocab_size - 1, vocab, -1) if not (w := minilm._tok.id_to_token(i)).startswith("#")
    )
    docs, _ = load_batch([{"id": "d", "text": f"Tea and {rare} together."}], 10**6)
    [chunk] = chunk_batch(docs, minilm, chunk_policy(Settings(), minilm))
    assert int(unpack_token_ids(chunk).max()) >= vocab
    with pytest.raises(DecodeError, match="vocabulary"):
        static.embed_chunks([chunk])
    with pytest.raises(DecodeError, match="token IDs"):  # IDs that do not match the chunk's token count
        static.embed_chunks([replace(chunk, token_ids=pack_token_ids([1, 2]))])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_both_runtimes_embed_with_the_static_model_into_its_own_collection(dtype, static_model, redis_url, tmp_path):
    settings = {"EMBEDPIPE_MODEL": str(static_model), "EMBEDPIPE_VECTOR_DTYPE": dtype}
    env = cli_env(**settings, EMBEDPIPE_STORE=str(tmp_path / "embedded"))
    summary = json.loads(embedpipe("run", str(EXAMPLES), "--json", "--no-progress", env=env).stdout)
    assert summary["failed"] == 0 and summary["chunks"] == summary["chunks_embedded"] > 50
    spec = spec_for(Settings.from_env(settings))
    assert summary["collection"] == spec.collection
    hits = json.loads(embedpipe("search", "how do I fix a flat bicycle tyre", "--json", env=env).stdout)["hits"]
    assert hits[0]["doc_id"] == "docs/bicycle-flat-tyre.md"

    denv = cli_env(
        **settings,
        EMBEDPIPE_STORE=str(tmp_path / "distributed"),
        EMBEDPIPE_REDIS_URL=redis_url,
        EMBEDPIPE_INBOX_WAIT_S="0.2",
    )
    redis = Redis.from_url(redis_url)
    with worker_pool(denv, tmp_path / "logs", redis):
        embedpipe("enqueue", str(EXAMPLES), "--no-progress", env=denv)
        embedpipe("wait", "--timeout", "300", env=denv, timeout=330)
    embedded = dict(open_store(str(tmp_path / "embedded"), spec).vectors())
    distributed = dict(open_store(str(tmp_path / "distributed"), spec).vectors())
    assert embedded.keys() == distributed.keys() and len(embedded) == summary["chunks"]
    cosine = np.array([cos(embedded[k], distributed[k]) for k in embedded])
    assert cosine.min() >= (0.9999 if dtype == "float32" else 0.999)  # the same chunks, the same vectors
    if dtype == "float16":  # its own collection, its vectors half precision in both runtimes, near float32's
        full = spec_for(Settings.from_env({}, model=str(static_model)))
        assert full.collection != spec.collection
        for vectors in (embedded, distributed):
            v = np.stack(list(vectors.values()))
            np.testing.assert_array_equal(v, v.astype(np.float16).astype(np.float32))
        e = LocalEmbedder(str(static_model), "cpu").warm_up()
        chunks = example_chunks(str(static_model), 200)
        reference = dict(zip([c.chunk_id for c in chunks], e.embed_chunks(chunks), strict=True))
        assert min(cos(embedded[k], reference[k]) for k in embedded if k in reference) >= 0.999
