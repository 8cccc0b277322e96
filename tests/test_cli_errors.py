"""Every failure a user can cause is one line on stderr and a non-zero exit, never a traceback; an
unreachable Redis or store is said within seconds, and `wait --timeout` holds (issue 17, item 4)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import EMBEDPIPE, EXAMPLES, cli_env

pytestmark = pytest.mark.slow  # each case runs the CLI


@pytest.fixture(scope="module")
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung server, a black-holing proxy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield s.getsockname()[1]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def read_only(path: Path) -> list[str]:
    """A command prefix that runs the command with `path` read-only, for root too (which ignores file
    modes): a read-only bind mount in a mount namespace of its own."""
    if os.geteuid() != 0:
        for p in [path, *path.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        return []
    if shutil.which("unshare") is None:
        pytest.skip("root without unshare: no way to make a directory read-only")
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    return ["unshare", "-rm", "sh", "-c", script, "sh", str(path)]


CASES = {
    "store path is a file": (["run", str(EXAMPLES / "web"), "--store", "{tmp}/a-file"], {}, "is a file"),
    "read-only store": (["run", str(EXAMPLES / "web"), "--store", "{tmp}/ro/store"], {}, "read-only"),
    "new store under a read-only dir": (["run", str(EXAMPLES / "web"), "--store", "{tmp}/ro/new"], {}, "read-only"),
    "cuda on a CPU build": (["run", str(EXAMPLES / "web"), "--store", "{tmp}/s"], {"EMBEDPIPE_DEVICE": "cuda"}, "cuda"),
    "search -k 0": (["search", "-k", "0", "tea", "--store", "{tmp}/s"], {}, "-k"),
    "unknown log level": (["--log-level", "LOUD", "status"], {}, "LOUD"),
    "pgvector refuses": (["search", "tea", "--store", "postgresql://u@127.0.0.1:{closed}/x"], {}, "store"),
    "pgvector never answers": (["search", "tea", "--store", "postgresql://u@127.0.0.1:{silent}/x"], {}, "store"),
    "Redis refuses": (["status", "--redis-url", "redis://127.0.0.1:{closed}/0"], {}, "Redis"),
    "Redis never answers": (["failed", "--redis-url", "redis://127.0.0.1:{silent}/0"], {}, "Redis"),
    "enqueue, Redis refuses": (
        ["enqueue", str(EXAMPLES / "web"), "--redis-url", "redis://127.0.0.1:{closed}/0"],
        {},
        "Redis",
    ),
    "wait --timeout holds": (
        ["wait", "--timeout", "1", "--redis-url", "redis://127.0.0.1:{silent}/0"],
        {},
        "after 1 s",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_line_no_traceback(case: str, tmp_path: Path, silent_port: int) -> None:
    args, extra_env, said = CASES[case]
    if case == "cuda on a CPU build":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    (tmp_path / "a-file").write_text("not a store")
    (tmp_path / "ro" / "store").mkdir(parents=True)
    (tmp_path / "ro" / "store" / "store.json").write_text("{}")
    prefix = read_only(tmp_path / "ro") if "read-only" in case else []
    fill = {"tmp": str(tmp_path), "closed": str(closed_port()), "silent": str(silent_port)}
    command = [*prefix, EMBEDPIPE, *[a.format(**fill) for a in args]]
    result = subprocess.run(
        command, env=cli_env(**extra_env), capture_output=True, text=True, timeout=60, cwd=tmp_path
    )  # the timeout: an unreachable server must not hang the command (it used to take ~35 s)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert said in lines[0], lines[0]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    store = f"postgresql://u@127.0.0.1:{closed_port()}/x"
    result = subprocess.run(
        [EMBEDPIPE, "--debug", "search", "tea", "--store", store], env=cli_env(), capture_output=True, text=True
    )
    assert result.returncode == 1 and "Traceback" in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: cannot use the store")
