"""What the tests and the benchmarks share: where things are, the CLI as a user runs it, waiting for a
condition, what a run must have stored, and pools of real worker processes. Tests import this (and
tests/servers.py, tests/openai_server.py), never conftest.py or another test module."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from redis import Redis
from rq import Worker
from rq.executions import Execution

from shared.lanes import lanes
from shared.messages import SourceDoc
from shared.quality import EvalSet, corpus_documents
from shared.queues import queue
from shared.ratelimit import Limits
from shared.settings import STAGES, Settings
from shared.spec import chunk_policy
from shared.store import open_store
from shared.tokenizers import Tokenizer, load_tokenizer
from workers.chunk import chunk_batch
from workers.load import load_batch

from .servers import free_port

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
SCIFACT = REPO.parent / "shared" / "data" / "scifact"
EMBEDPIPE = str(Path(sys.executable).with_name("embedpipe"))
# The compose services and Kubernetes deployments that scale, and the longest job they may be running
# when stopped (the default embed timeout of a full part: shared/settings.py): tests/test_deploy.py
# and tests/test_kubernetes.py.
SCALED = ("loader", "chunker", "embedder", "writer")
LONGEST_JOB_S = 60 + 131072 // 100

T = TypeVar("T")


# --- the CLI, as a user runs it ---------------------------------------------------------------------


def cli_env(**extra: str) -> dict[str, str]:
    """This process's environment without any EMBEDPIPE_* setting, plus `extra`; offline."""
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


def wait_until(condition: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    """Poll `condition` until it returns something truthy (returned); AssertionError naming `what` if
    `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(interval_s)


# --- what a run must have stored --------------------------------------------------------------------


def expected_chunks(
    settings: Settings, sources: Iterable[SourceDoc], tokenizer: Tokenizer | None = None
) -> dict[str, set[str]]:
    """Each document's chunk IDs as a run with these settings cuts them (its model, chunk size and
    overlap: `Settings.from_env(env)` of the processes' environment)."""
    docs, dead = load_batch([s.to_dict() for s in sources], settings.max_doc_bytes)
    assert not dead, [d.message for d in dead]
    tokenizer = tokenizer or load_tokenizer(settings.model, settings.api_max_input_tokens)
    expected: dict[str, set[str]] = {d.id: set() for d in docs}
    for c in chunk_batch(docs, tokenizer, chunk_policy(settings, tokenizer)):
        expected[c.doc_id].add(c.chunk_id)
    return expected


def assert_nothing_lost(env: dict[str, str], expected: dict[str, set[str]]) -> dict[str, int]:
    """Each document is either stored with exactly its chunks, or a dead letter: never both, never neither."""
    store = open_store(env["EMBEDPIPE_STORE"])
    stored = store.chunk_ids(list(expected))
    dead = {d["doc_id"] for d in json.loads(embedpipe("failed", "--json", "--limit", "0", env=env).stdout)["failed"]}
    complete = {d for d, ids in stored.items() if ids == expected[d]}
    partial = {d for d, ids in stored.items() if ids and ids != expected[d]}
    lost = set(expected) - complete - dead
    assert not partial, f"partly stored: {sorted(partial)[:10]}"
    assert not (complete & dead), f"stored and dead: {sorted(complete & dead)[:10]}"
    assert not lost, f"lost: {len(lost)} documents, e.g. {sorted(lost)[:10]}"
    assert store.count() == sum(len(expected[d]) for d in complete), "duplicate or foreign chunks"
    return {"stored": len(complete), "dead": len(dead & set(expected))}


# Small parts, so that kills land mid-job in every pool, and short job timeouts (settings, not
# test-only code paths). A job of a SIGKILLed worker is recovered once its lease (EMBEDPIPE_JOB_LEASE_S,
# 20 s) runs out; the timeouts guard jobs that hang in a live worker.
FAST_RECOVERY = {
    "EMBEDPIPE_BATCH_DOCS": "20",
    "EMBEDPIPE_PART_MAX_CHUNKS": "10",
    "EMBEDPIPE_LOAD_TIMEOUT_S": "15",
    "EMBEDPIPE_CHUNK_TIMEOUT_S": "15",
    "EMBEDPIPE_EMBED_TIMEOUT_S": "20",
    "EMBEDPIPE_WRITE_TIMEOUT_S": "20",
    "EMBEDPIPE_JOB_RETRIES": "6",
    "EMBEDPIPE_INBOX_WAIT_S": "0.2",
    "EMBEDPIPE_LOG_LEVEL": "INFO",
}
TOPICS = ["coffee", "bicycles", "sourdough", "compost", "telescopes", "tea", "ferns", "kites", "maps", "bees"]


def short_documents(n: int) -> list[dict[str, str]]:
    rng = random.Random(7)
    return [
        {
            "id": f"doc-{i:05d}",
            "text": f"Note {i} about {rng.choice(TOPICS)}: "
            + " ".join(rng.choice(TOPICS) for _ in range(rng.randint(5, 40)))
            + ".",
        }
        for i in range(n)
    ]


# --- SciFact (../shared/data/scifact) ---------------------------------------------------------------

SUBSET_QUERIES = 100
DISTRACTORS = 300


def scifact_subset(eval_set: EvalSet) -> tuple[EvalSet, set[str]]:
    """The first SUBSET_QUERIES queries, and the documents to embed for them: every relevant one plus
    DISTRACTORS others (the quality test, bench/quality.py --subset, bench/fast.py)."""
    queries = dict(list(eval_set.queries.items())[:SUBSET_QUERIES])
    qrels = {q: eval_set.qrels[q] for q in queries}
    relevant = {d for rel in qrels.values() for d in rel}
    distractors: set[str] = set()
    for doc in corpus_documents(eval_set):
        if len(distractors) >= DISTRACTORS:
            break
        if doc.id not in relevant:
            distractors.add(doc.id)
    return EvalSet(queries, qrels, eval_set.corpus_path), relevant | distractors


# --- real worker processes ----------------------------------------------------------------------------


class Pool:
    """The janitor and `workers[pool]` workers per pool, each a separate `embedpipe` process. A pool is a
    stage, or `embed@LANE`: the embed pool of one model of EMBEDPIPE_MODELS (`worker embed --model M`)."""

    def __init__(
        self, env: dict[str, str], logs: Path, workers: dict[str, int] | None = None, metrics: bool = False
    ) -> None:
        self.env, self.logs = env, logs
        logs.mkdir(exist_ok=True)
        self.commands = {"janitor": ["janitor"]}
        self.workers = workers or dict.fromkeys(STAGES, 1)
        entries = {lane.name: lane.entry for lane in lanes(Settings.from_env(env))}
        for pool, n in self.workers.items():
            stage, _, lane = pool.partition("@")
            command = ["worker", stage, *(["--model", entries[lane]] if lane else [])]
            self.commands |= {f"{pool}-{i}": command for i in range(n)}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.exit_codes: dict[str, int | str] = {}  # set when the pool stops
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
        wanted = self.workers
        namespace = self.env.get("EMBEDPIPE_NAMESPACE", "")

        def ready() -> bool:
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            assert not dead, f"processes exited early: {dead}; see {self.logs}"
            return all(Worker.count(queue=queue(redis, s, namespace)) >= n for s, n in wanted.items())

        wait_until(ready, timeout_s, f"the workers started; see {self.logs}", interval_s=0.5)

    def kill(self, name: str) -> int:
        """SIGKILL, as when a node dies or the OOM killer strikes: no clean-up of any kind. Returns the
        exit code, -SIGKILL unless the process had already exited (a crash the test should see)."""
        self.procs[name].send_signal(signal.SIGKILL)
        return self.procs[name].wait()

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
        self.exit_codes = codes
        return codes

    def assert_clean_exit(self, *but: str) -> None:
        """Every process (but those named) shut down cleanly: exit code 0 on SIGTERM."""
        codes = {n: c for n, c in self.exit_codes.items() if n not in but}
        assert codes and codes == dict.fromkeys(codes, 0), f"unclean shutdown: {self.exit_codes}; see {self.logs}"


@contextmanager
def worker_pool(
    env: dict[str, str],
    logs: Path,
    redis: Redis,
    workers: dict[str, int] | None = None,
    metrics: bool = False,
    start: bool = True,
) -> Iterator[Pool]:
    """A pool of real `embedpipe` processes, all started and registered (with `start`), stopped with
    SIGTERM when the block ends, however it ends; `pool.exit_codes` tells how they exited."""
    pool = Pool(env, logs, workers, metrics)
    try:
        if start:
            pool.start_all(redis)
        yield pool
    finally:
        pool.stop()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One process's /metrics, as {(sample name, sorted labels): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def running_job(redis: Redis, stage: str, timeout_s: float = 240) -> tuple[str, str]:
    """The first job of `stage` seen running, and the name of the rq worker running it."""

    def seen() -> tuple[str, str] | None:
        for job_id, execution_id in queue(redis, stage, "").started_job_registry.get_job_and_execution_ids(
            cleanup=False
        ):
            try:
                return job_id, Execution.fetch(execution_id, job_id, redis).worker_name
            except ValueError:  # it ended meanwhile
                continue
        return None

    return wait_until(seen, timeout_s, f"a {stage} job running")


def process_of(pool: Pool, redis: Redis, worker_name: str) -> str:
    """The pool's name (embed-0, ...) of the process that runs rq worker `worker_name`."""
    pid = Worker.find_by_key(Worker.redis_worker_namespace_prefix + worker_name, connection=redis).pid
    return next(name for name, p in pool.procs.items() if p.pid == pid)


# --- API models (tests/openai_server.py is the stand-in server) ---------------------------------------

SMALL = "openai:text-embedding-3-small"
SECRET = "sk-test-DO-NOT-LEAK-5f3a9c1e7b"
WORDS = (
    "tea kettle river granite orbit lantern copper meadow violin harbor pepper glacier walnut signal "
    "marble comet saddle thunder orchid beacon"
).split()


def texts(n: int, start: int = 0, words: int = 6) -> list[str]:
    """Distinct texts of varied lengths: `words` to 3*`words` words."""
    return [
        f"Note {i}: " + " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words + (i * 5) % (2 * words)))
        for i in range(start, start + n)
    ]


def assert_windows(sends: list[tuple[float, int, int]], limits: Limits, windows: tuple[float, ...]) -> None:
    """In every window [s, s + W] starting at a send, the requests and tokens sent stay within the
    budget's bound C + r*W (a hair of slack for the scripts' microsecond rounding)."""
    sends = sorted(sends)
    for w in windows:
        for i, (start, _, _) in enumerate(sends):
            inside = [s for s in sends[i:] if s[0] <= start + w + 1e-4]
            assert len(inside) <= limits.requests.bound(w + 2e-4) + 1e-6, (w, start, len(inside))
            assert sum(n for _, n, _ in inside) <= limits.tokens.bound(w + 2e-4) + 1e-3, (w, start)


def tool(name: str) -> str:
    """A command-line tool the tests use (kubectl, hadolint...), on PATH or beside the venv's embedpipe."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(EMBEDPIPE).parent))
    if path is None:
        pytest.fail(f"{name} is not installed: run `make test`, which installs it")
    return path
