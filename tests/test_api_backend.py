"""API models (EMBEDPIPE_MODEL=openai:NAME) against tests/openai_server.py, a local server that speaks
OpenAI's embeddings protocol and injects faults (OpenAI itself is unreachable here): packing, order,
retries, 429s, the rate budget, refused inputs, secrets, tokens and cost, offline tiktoken. Worker
processes: tests/test_api_workers.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY
from redis import Redis

from producer.sources import iter_sources, resolve
from shared.errors import ConfigError, EmbedFailures, RateLimited, RetryableError
from shared.messages import Chunk
from shared.ratelimit import Limits, LocalBudget, RedisBudget
from shared.settings import Settings
from shared.spec import chunk_policy
from shared.tokenizer_api import ApiTokenizer
from workers.api_protocol import MAX_RETRY_AFTER_S, duration_s, pack_requests, plan_requests, retry_after_s
from workers.chunk import chunk_batch
from workers.embed_api import ApiEmbedder

from .helpers import EXAMPLES, REPO, SECRET, SMALL, WORDS, assert_windows, cli_env, embedpipe, texts
from .openai_server import serve


def chunks_of(items: list[str]) -> list[Chunk]:
    counts = ApiTokenizer(SMALL).count(items)
    return [Chunk(f"c{i}", f"doc-{i}", 0, t, counts[i], 0, len(t)) for i, t in enumerate(items)]


def embedder(url: str, model: str = SMALL, redis: Redis | None = None, **settings: object) -> ApiEmbedder:
    s = Settings.from_env({}, model=model, openai_base_url=url, **settings)
    return ApiEmbedder(s, redis, backoff_initial_s=0.05, backoff_max_s=0.4).warm_up()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def outcomes(model: str = "text-embedding-3-small") -> dict[str, float]:
    return {
        o: metric("embedpipe_api_requests_total", model=model, outcome=o)
        for o in ("ok", "rate_limited", "retried", "failed")
    }


def expected(server, items: list[str], model: str = "text-embedding-3-small", dims: int | None = None) -> np.ndarray:
    return np.stack([server.expected(t, model, dims) for t in items])


# --- tiktoken, offline ----------------------------------------------------------------------------

NO_NETWORK = """
import json, os, socket, sys
def refuse(*a, **k):
    raise OSError("network disabled in this test")
socket.socket.connect = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from shared.tokenizer_api import ApiTokenizer, load_encoding, write_tiktoken_cache
tok = ApiTokenizer("openai:text-embedding-3-small")
ours = tok.encode("hello world")
empty_cache_after = os.listdir(os.environ["TIKTOKEN_CACHE_DIR"])
# the documented route for plain tiktoken: files under TIKTOKEN_CACHE_DIR, checked by tiktoken's sha256
os.environ["TIKTOKEN_CACHE_DIR"] = sys.argv[1]
write_tiktoken_cache(__import__("pathlib").Path(sys.argv[1]))
import tiktoken
same = {}
for name in ("cl100k_base", "o200k_base"):
    official, mine = tiktoken.get_encoding(name), load_encoding(name)
    same[name] = [official._pat_str == mine._pat_str, official._special_tokens == mine._special_tokens,
                  official._mergeable_ranks == mine._mergeable_ranks]
model = tiktoken.encoding_for_model("text-embedding-3-small").name
print(json.dumps({"ours": ours, "empty_cache_after": empty_cache_after, "same": same, "model": model}))
"""


@pytest.mark.slow
def test_tiktoken_encodings_load_with_no_network(tmp_path):
    """No download can happen: sockets refuse, proxies point nowhere, tiktoken's cache is empty."""
    (tmp_path / "empty").mkdir()
    env = {
        **os.environ,
        "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "PYTHONPATH": str(REPO),
    }
    run = subprocess.run(
        [sys.executable, "-c", NO_NETWORK, str(tmp_path / "cache")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert out["ours"] == [15339, 1917]  # "hello world" in cl100k_base
    assert out["empty_cache_after"] == []  # our loader neither read nor wrote tiktoken's cache
    assert out["same"] == {"cl100k_base": [True, True, True], "o200k_base": [True, True, True]}
    assert out["model"] == "cl100k_base"


def test_api_tokenizer_cuts_chunks_that_fit_and_count_as_tiktoken():
    from workers.load import load_batch

    tok = ApiTokenizer(SMALL)
    assert (tok.info.max_seq_length, tok.info.special_tokens, tok.info.max_content_tokens) == (8192, 0, 8192)
    assert ApiTokenizer("openai:some-local-model", 512).info.max_content_tokens == 512
    sources = [s.to_dict() for s in iter_sources(resolve([str(EXAMPLES / "docs")]), 10**8)]
    docs, _ = load_batch(sources, 10**8)
    chunks = chunk_batch(docs, tok, chunk_policy(Settings(chunk_tokens=200), tok))
    assert len(chunks) > len(docs)  # long documents were cut
    text_of = {d.id: d.text for d in docs}
    for c in chunks:
        assert c.text == text_of[c.doc_id][c.char_start : c.char_end]
        assert c.tokens == len(tok.encoding.encode_ordinary(c.text)) <= 200
        assert not c.text[:1].isspace()
    multibyte = "naïve café 漢字😀 déjà vu " * 40
    spans = tok.offsets(multibyte)
    assert len(spans) == tok.count([multibyte])[0]
    assert all(0 <= a <= b <= len(multibyte) for a, b in spans)


# --- requests: packing, concurrency, order ------------------------------------------------------


def test_requests_are_packed_within_limits_run_concurrently_and_keep_order():
    items = texts(60)
    tokens = ApiTokenizer(SMALL).count(items)
    with serve(latency_s=0.1) as server:
        server.add_faults({"kind": "shuffle"}, {"kind": "shuffle"})  # items in reverse order: `index` rules
        e = embedder(
            server.url, api_max_inputs=5, api_max_input_tokens=50, api_max_request_tokens=90, api_concurrency=3
        )
        vectors = e.embed_chunks(chunks_of(items))
        log = server.requests()
        np.testing.assert_array_equal(vectors, expected(server, items))
        assert vectors.dtype == np.float32 and e.dimension == 1536
        assert all(r["status"] == 200 and r["encoding_format"] == "base64" for r in log)
        assert all(r["inputs"] <= 5 and sum(r["tokens"]) <= 90 for r in log)
        assert sorted(t for r in log for t in r["texts"]) == sorted(items)  # each text sent once
        assert len(log) == len(pack_requests(range(60), tokens, 5, 90))
        assert 1 < server.max_inflight <= 3  # concurrent, under the per-process limit


def test_pack_requests_cuts_in_order_by_count_and_tokens():
    assert pack_requests([0, 1, 2, 3, 4], [5, 5, 5, 5, 5], 2, 100) == [[0, 1], [2, 3], [4]]
    assert pack_requests([0, 1, 2, 3], [6, 5, 4, 7], 10, 11) == [[0, 1], [2, 3]]
    assert pack_requests([], [], 3, 10) == []
    # A large part that fits one request is spread over the concurrent requests (>= 64 inputs each).
    assert [len(r) for r in plan_requests(range(300), [3] * 300, 2048, 10**6, 4)] == [75, 75, 75, 75]
    assert [len(r) for r in plan_requests(range(100), [3] * 100, 2048, 10**6, 4)] == [100]
    assert [len(r) for r in plan_requests(range(10), [3] * 10, 4, 10**6, 4)] == [4, 4, 2]


def test_a_large_part_runs_as_concurrent_requests():
    items = texts(256)
    with serve(latency_s=0.2) as server:
        vectors = embedder(server.url, api_concurrency=4).embed(items)
        log = server.requests()
        np.testing.assert_array_equal(vectors, expected(server, items))
        assert [r["inputs"] for r in log] == [64] * 4 and 1 < server.max_inflight <= 4


# --- retries --------------------------------------------------------------------------------------


def test_transient_faults_are_retried_until_a_valid_response():
    items = texts(12)
    faults = [
        {"kind": "status", "status": 500},
        {"kind": "status", "status": 503},
        {"kind": "drop"},
        {"kind": "sleep", "seconds": 1.5},  # past the client's 1 s timeout
        {"kind": "malformed"},
        {"kind": "count"},
        {"kind": "dimension"},
        {"kind": "nan"},
        {"kind": "status", "status": 429, "retry_after": 1},
    ]
    before, retries_before = outcomes(), metric("embedpipe_retries_total", stage="embed", layer="io")
    with serve() as server:
        server.add_faults(*faults)
        e = embedder(server.url, api_timeout_s=1.0)
        vectors = e.embed(items)
        log = server.requests()
    np.testing.assert_array_equal(vectors, expected(server, items))
    assert [r["fault"] for r in log] == [*faults, None]
    assert [r["status"] for r in log] == [500, 503, "drop", "sleep", 200, 200, 200, 200, 429, 200]
    after = outcomes()
    assert {k: after[k] - before[k] for k in after} == {"ok": 1, "rate_limited": 1, "retried": 8, "failed": 0}
    assert metric("embedpipe_retries_total", stage="embed", layer="io") - retries_before == 9
    assert log[-1]["t"] - log[-2]["t"] >= 1.0  # Retry-After: 1 was honoured
    # Billed: the usage of every response that carried one (4 of them: the malformed one cannot be read).
    assert e.usage.tokens == 4 * sum(log[-1]["tokens"])


def test_a_server_that_keeps_failing_gives_up_at_the_deadline():
    with serve() as server:
        server.add_faults(*[{"kind": "status", "status": 503}] * 200)
        e = embedder(server.url, api_deadline_s=1.5)
        with pytest.raises(RetryableError, match="503"):
            e.embed(texts(3))
        attempts = len(server.requests())
    assert 2 <= attempts < 200


def test_a_429_longer_than_the_deadline_gives_the_job_back_for_later_not_failed():
    with serve() as server:
        server.add_faults({"kind": "status", "status": 429, "retry_after": 100})
        e = embedder(server.url, api_deadline_s=5)
        with pytest.raises(RateLimited, match="429") as first:
            e.embed(texts(2))
        assert 99 <= first.value.retry_in_s <= 111 and not first.value.quota  # when to come back
        with pytest.raises(RateLimited, match=r"no room for (99|10[0-9]) s"):  # the hold covers the next job too
            e.embed(texts(2))
        assert len(server.requests()) == 1


def test_an_exhausted_quota_pauses_every_embedder_instead_of_hammering():
    with serve() as server:
        server.add_faults(
            {"kind": "status", "status": 429, "code": "insufficient_quota", "message": "You exceeded your quota."}
        )
        e = embedder(server.url)
        with pytest.raises(RateLimited, match="no quota left") as caught:
            e.embed(texts(3))
        assert caught.value.quota and caught.value.retry_in_s >= 600
        assert metric("embedpipe_api_quota_exhausted", model="text-embedding-3-small") == 1
        with pytest.raises(RateLimited, match="no room"):  # the shared budget holds: not one more request
            e.embed(texts(1))
        assert len(server.requests()) == 1  # asked once: an exhausted account is not retried in a loop


def test_a_part_rate_limited_midway_keeps_what_was_embedded():
    from shared.cache import LocalVectorCache
    from shared.messages import Chunk
    from shared.spec import spec_for
    from workers.embed import embed_part

    items = texts(8)
    with serve() as server, tempfile.TemporaryDirectory() as tmp:
        e = embedder(server.url, api_max_inputs=2, api_concurrency=1, api_deadline_s=1)
        settings = Settings.from_env({}, model=SMALL, openai_base_url=server.url)
        spec = spec_for(settings)
        cache = LocalVectorCache(Path(tmp) / "cache.sqlite", 1000, 3600)
        chunks = [Chunk(f"c{i}", f"d{i}", 0, t, 10, 0, len(t)) for i, t in enumerate(items)]
        server.add_faults(*([{"kind": "status", "status": 429, "retry_after": 30, "match": items[6]}] * 20))
        with pytest.raises(RateLimited):
            embed_part(chunks, e, spec, cache)
        sent_before = sum(r["inputs"] for r in server.requests() if r["status"] == 200)
        server.reset()
        e2 = embedder(server.url, api_max_inputs=2)
        vectors, failed, embedded_now = embed_part(chunks, e2, spec, cache)
        again = server.requests()
    assert not failed and sent_before == 6 and embedded_now == 2  # only the rate-limited pair is sent again
    assert sum(r["inputs"] for r in again) == 2
    np.testing.assert_array_equal(vectors, expected(server, items))


def test_429s_of_the_server_window_are_waited_out_and_batches_kept():
    items = texts(24)
    before = outcomes()
    with serve(rpm=3, window_s=1.5) as server:
        e = embedder(server.url, api_max_inputs=4, api_concurrency=4)
        vectors = e.embed(items)
        log = server.requests()
    np.testing.assert_array_equal(vectors, expected(server, items))
    limited = [r for r in log if r["status"] == 429]
    assert limited, "the server's window never filled: the test proves nothing"
    assert all(r["inputs"] == 4 for r in log)  # the same batches, retried whole
    for r in limited:  # the same request came back no sooner than the server asked
        again = next(x for x in log if x["t"] > r["t"] and x["texts"] == r["texts"])
        assert again["t"] - r["t"] >= r["retry_after_s"]
    assert outcomes()["rate_limited"] - before["rate_limited"] == len(limited)


def test_retry_after_and_reset_headers_are_parsed():
    # a server asking for forever is asking for an hour: then we ask again (inf raised, 1e12 stalled)
    assert retry_after_s({"retry-after": "inf"}) == retry_after_s({"retry-after": "1e12"}) == MAX_RETRY_AFTER_S
    assert retry_after_s({"retry-after-ms": "1e15"}) == MAX_RETRY_AFTER_S
    assert retry_after_s({"retry-after": "nan"}) is None and retry_after_s({"retry-after": "-5"}) == 0.0
    assert retry_after_s({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"x-ratelimit-reset-requests": "6m0s", "x-ratelimit-reset-tokens": "120ms"}) == 360.0
    assert retry_after_s({}) is None
    assert (
        58
        < retry_after_s({"retry-after": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))})
        <= 61
    )
    assert duration_s("1h2m3s") == 3723 and duration_s("59.432s") == pytest.approx(59.432) and duration_s("x") is None


# --- the rate budget ------------------------------------------------------------------------------

TOKEN_PATTERN = [450, 5, 5, 450, 5, 300, 5, 5, 5, 450, 120, 5, 60, 450, 5]  # large and small, mixed


def test_shared_budget_never_exceeds_its_bound_in_any_window(redis_url):
    limits = Limits.from_settings(rpm=120, tpm=6000, max_input_tokens=500)
    for limit in (limits.requests, limits.tokens):  # the per-minute guarantee: C + 60 r == L
        assert limit.bound(60) == pytest.approx(limit.per_minute)
    redis = Redis.from_url(redis_url)
    a, b = (
        RedisBudget(redis, "embedpipe:ratelimit:test", limits),
        RedisBudget(redis, "embedpipe:ratelimit:test", limits),
    )
    sends = []
    for i in range(200):  # two embedders reserving in turn; send times run ~5 minutes ahead
        tokens = TOKEN_PATTERN[i % len(TOKEN_PATTERN)]
        _, send = (a if i % 2 else b).reserve_at(tokens)
        sends.append((send, tokens, i))
    assert_windows(sends, limits, (0.25, 1.0, 5.0, 60.0))
    span = max(s for s, _, _ in sends) - min(s for s, _, _ in sends)
    assert span >= (sum(n for _, n, _ in sends) - limits.tokens.capacity) / limits.tokens.rate - 1e-3
    # A 429 pauses every embedder sharing the budget.
    fresh = RedisBudget(redis, "embedpipe:ratelimit:other", limits)
    fresh.hold(2.5)
    assert fresh.reserve(10) >= 2.5 - 0.05
    redis.close()


def test_local_budget_has_the_same_bound():
    now = [1000.0]
    limits = Limits.from_settings(rpm=120, tpm=6000, max_input_tokens=500)
    budget = LocalBudget(limits, clock=lambda: now[0])
    sends = []
    for i in range(200):
        now[0] += 0.01 * (i % 3)  # requests arrive faster than the budget allows
        tokens = TOKEN_PATTERN[i % len(TOKEN_PATTERN)]
        sends.append((budget.reserve_at(tokens)[1], tokens, i))
    assert_windows(sends, limits, (0.25, 1.0, 5.0, 60.0))
    budget.hold(1000)
    assert budget.reserve(1) >= 999


def test_unlimited_budget_never_waits_and_too_small_a_limit_is_refused():
    budget = LocalBudget(Limits.from_settings(0, 0, 8192))
    assert all(budget.reserve(10**6) == 0 for _ in range(100))
    with pytest.raises(ConfigError, match="too small"):
        Limits.from_settings(rpm=0, tpm=10_000, max_input_tokens=8192)


# --- permanent errors, secrets ------------------------------------------------------------------


def test_inputs_the_api_refuses_become_failures_the_rest_is_embedded():
    items = texts(30)
    long_ones = {7: " ".join(WORDS * 3), 19: " ".join(WORDS * 4)}  # 60-80 tokens: the server refuses them
    too_long = {25: " ".join(WORDS * 8)}  # ~160 tokens: over our own limit, never sent
    for row, text in (long_ones | too_long).items():
        items[row] = text
    counts = ApiTokenizer(SMALL).count(items)
    assert all(40 < counts[r] <= 100 for r in long_ones) and counts[25] > 100
    before = outcomes()
    with serve(max_input_tokens=40) as server:
        e = embedder(server.url, api_max_input_tokens=100, api_max_inputs=16)
        with pytest.raises(EmbedFailures) as caught:
            e.embed_chunks(chunks_of(items))
        log = server.requests()
    failed = caught.value.failed
    assert set(failed) == {7, 19, 25}
    assert all("maximum context length is 40 tokens" in failed[r] for r in long_ones)
    assert "over the limit of 100" in failed[25] and "not sent" in failed[25]
    vectors = caught.value.vectors
    good = [r for r in range(30) if r not in failed]
    np.testing.assert_array_equal(vectors[good], expected(server, [items[r] for r in good]))
    assert not vectors[list(failed)].any()
    assert all(max(r["tokens"]) <= 100 for r in log)  # the too-long input never reached the API
    assert {t for r in log if r["status"] == 200 for t in r["texts"]} == {items[r] for r in good}
    assert outcomes()["failed"] - before["failed"] == sum(r["status"] == 400 for r in log)


def test_a_bad_key_fails_the_job_without_showing_the_key(caplog):
    caplog.set_level("DEBUG")
    with serve(api_key="the-right-key") as server:
        e = embedder(server.url, openai_api_key=SECRET)
        with pytest.raises(ConfigError) as caught:
            e.embed(texts(2))
        assert "401" in str(caught.value) and "EMBEDPIPE_OPENAI_API_KEY" in str(caught.value)
        assert server.requests()[0]["status"] == 401  # the server did quote the key back
        # 404 (unknown model) whose message repeats the key: redacted
        server.config["api_key"] = None
        server.add_faults({"kind": "status", "status": 404, "message": f"model not found for key {SECRET}"})
        with pytest.raises(ConfigError) as caught_404:
            e.embed(texts(2))
    for error in (caught.value, caught_404.value):
        shown = "".join(traceback.format_exception(error))
        assert SECRET not in shown and SECRET[:12] not in shown
    assert "404" in str(caught_404.value)
    assert SECRET not in caplog.text and SECRET[:12] not in caplog.text


def test_a_key_is_required_for_openai_itself():
    with pytest.raises(ConfigError, match="EMBEDPIPE_OPENAI_API_KEY_FILE"):
        ApiEmbedder(Settings.from_env({}, model=SMALL)).warm_up()
    assert ApiEmbedder(Settings.from_env({}, model=SMALL, openai_api_key=SECRET)).warm_up().ready


# --- dimensions, tokens and cost ----------------------------------------------------------------


def test_dimensions_go_to_models_that_take_them_others_are_cut_here():
    items = texts(5)
    with serve(default_dim=48) as server:
        e = embedder(server.url, dimensions=256)
        np.testing.assert_array_equal(e.embed(items), expected(server, items, dims=256))
        assert e.dimension == 256 and server.requests()[-1]["dimensions"] == 256

        other = embedder(server.url, model="openai:my-local-model", dimensions=16)
        assert other.dimension == 0  # unknown until the server answers
        vectors = other.embed(items)
        assert server.requests()[-1]["dimensions"] is None and other.dimension == 16
        full = expected(server, items, model="my-local-model")
        cut = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
        np.testing.assert_allclose(vectors, cut, atol=1e-6)
        assert embedder(server.url, model="openai:my-local-model").embed(items[:1]).shape == (1, 48)


def test_tokens_and_cost_are_counted_exactly():
    items = texts(40)
    ours = sum(ApiTokenizer(SMALL).count(items))
    model = "text-embedding-3-small"
    tokens_before, cost_before = (
        metric("embedpipe_api_tokens_total", model=model),
        metric("embedpipe_api_cost_usd_total", model=model),
    )
    with serve() as server:
        e = embedder(server.url, api_max_inputs=7)
        e.embed(items)
        billed = sum(sum(r["tokens"]) for r in server.requests())
        pricey = embedder(server.url, api_prices="text-embedding-3-small=1.5,other-model=3")
        pricey.embed(items)
        server.add_faults({"kind": "no_usage"})  # then our own count is what we record
        e.embed(items[:1])
    assert billed == ours == e.usage.tokens - sum(ApiTokenizer(SMALL).count(items[:1])) == pricey.usage.tokens
    assert e.usage.cost_usd == pytest.approx((billed + ApiTokenizer(SMALL).count(items[:1])[0]) * 0.02 / 1e6)
    assert pricey.usage.cost_usd == pytest.approx(billed * 1.5 / 1e6)
    assert metric("embedpipe_api_tokens_total", model=model) - tokens_before == e.usage.tokens + pricey.usage.tokens
    assert metric("embedpipe_api_cost_usd_total", model=model) - cost_before == pytest.approx(
        e.usage.cost_usd + pricey.usage.cost_usd, rel=1e-9
    )


@pytest.mark.slow
def test_estimate_prints_what_the_api_then_bills(tmp_path):
    from shared.messages import SourceDoc
    from workers.load import load_batch

    env = cli_env(EMBEDPIPE_MODEL=SMALL)
    est = json.loads(embedpipe("estimate", str(EXAMPLES), "--json", env=env, timeout=120).stdout)
    assert est["documents"] == 38 and est["unreadable"] == 0 and est["api"] is True
    assert est["cost_usd"] == pytest.approx(est["tokens"] * 0.02 / 1e6)
    text = embedpipe(
        "estimate",
        str(EXAMPLES),
        env=cli_env(EMBEDPIPE_MODEL=SMALL, EMBEDPIPE_API_PRICES="text-embedding-3-small=1"),
        timeout=120,
    ).stdout
    assert f"{est['tokens']:,} tokens" in text and f"${est['tokens'] / 1e6:.6f}" in text
    assert "local model: no API cost" in embedpipe("estimate", str(EXAMPLES), env=cli_env(), timeout=120).stdout
    # The same chunks, embedded through the server: what it bills is what estimate said.
    sources = [s.to_dict() for s in iter_sources(resolve([str(EXAMPLES)]), 10**8) if isinstance(s, SourceDoc)]
    docs, _ = load_batch(sources, 10**8)
    tok = ApiTokenizer(SMALL)
    chunks = chunk_batch(docs, tok, chunk_policy(Settings(), tok))
    with serve() as server:
        e = embedder(server.url)
        e.embed_chunks(chunks)
        billed = sum(sum(r["tokens"]) for r in server.requests())
    assert (len(chunks), billed) == (est["chunks"], est["tokens"])
    assert e.usage.cost_usd == pytest.approx(est["cost_usd"])
