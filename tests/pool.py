"""Real worker processes for the integration tests: start, SIGKILL, restart and stop them."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from redis import Redis
from rq import Worker

from shared.settings import STAGES
from workers.runtime import queue

from .conftest import EMBEDPIPE, free_port


class Pool:
    """The janitor and `workers[stage]` workers per stage, each a separate `embedpipe` process."""

    def __init__(
        self, env: dict[str, str], logs: Path, workers: dict[str, int] | None = None, metrics: bool = False
    ) -> None:
        self.env, self.logs = env, logs
        logs.mkdir(exist_ok=True)
        self.commands = {"janitor": ["janitor"]}
        for stage, n in (workers or dict.fromkeys(STAGES, 1)).items():
            self.commands |= {f"{stage}-{i}": ["worker", stage] for i in range(n)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.kills = 0
        # with metrics, each process serves /metrics on a port of its own
        self.metrics_ports = {name: free_port() for name in self.commands} if metrics else {}

    def start(self, name: str) -> None:
        with open(self.logs / f"{name}.log", "a") as log:
            env = self.env | ({"EMBEDPIPE_METRICS_PORT": str(self.metrics_ports[name])} if self.metrics_ports else {})
            self.procs[name] = subprocess.Popen(
                [EMBEDPIPE, *self.commands[name]], env=env, stdout=subprocess.DEVNULL, stderr=log
            )

    def start_all(self, redis: Redis, timeout_s: float = 240) -> None:
        for name in self.commands:
            self.start(name)
        self.wait_ready(redis, timeout_s)

    def wait_ready(self, redis: Redis, timeout_s: float = 240) -> None:
        wanted = {s: sum(1 for n in self.commands if n.startswith(s + "-")) for s in STAGES}
        deadline = time.monotonic() + timeout_s
        while any(Worker.count(queue=queue(redis, s)) < n for s, n in wanted.items()):
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            assert not dead, f"processes exited early: {dead}; see {self.logs}"
            assert time.monotonic() < deadline, f"workers did not start in {timeout_s} s; see {self.logs}"
            time.sleep(0.5)

    def kill(self, name: str) -> None:
        """SIGKILL: no clean-up of any kind, as when a node dies or the OOM killer strikes."""
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait()
        self.kills += 1

    def restart_exited(self) -> dict[str, int]:
        """Start again every process that exited, as the platform's restart policy would; their exit codes."""
        exited = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        for name in exited:
            self.start(name)
        return exited

    def alive(self) -> dict[str, bool]:
        return {n: p.poll() is None for n, p in self.procs.items()}

    def stop(self) -> dict[str, int | str]:
        """SIGTERM (warm shutdown), then SIGKILL whatever did not exit within a minute."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes: dict[str, int | str] = {}
        for name, p in self.procs.items():
            try:
                codes[name] = p.wait(60)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGUSR1)  # the process prints every thread's stack to its log
                time.sleep(1)
                p.kill()
                p.wait()
                codes[name] = "killed after 60 s"
        return codes
