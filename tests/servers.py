"""Private service processes for tests and benchmarks: never the shared Redis on 6379."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from redis import Redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_redis(client: Redis, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def redis_command(port: int, workdir: Path, *extra: str) -> list[str]:
    """A loopback redis-server keeping nothing on disk unless `extra` says so (e.g. AOF)."""
    return [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(workdir),
        "--save",
        "",
        "--appendonly",
        "no",
        *extra,
    ]


def start_redis(workdir: Path, *extra: str, port: int | None = None) -> tuple[subprocess.Popen, int]:
    port = port or free_port()
    proc = subprocess.Popen(redis_command(port, workdir, *extra), stdout=subprocess.DEVNULL)
    try:
        wait_for_redis(Redis(port=port, password=_password(extra)))
    except Exception:
        proc.kill()
        raise
    return proc, port


def _password(extra: tuple[str, ...]) -> str | None:
    return extra[extra.index("--requirepass") + 1] if "--requirepass" in extra else None
