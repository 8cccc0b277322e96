"""What the benchmarks share: the embedpipe processes they start (a worker pool, a measured child), the
environment those get, their peak memory and CPU time, and the SciFact corpus they read.

`MODEL`, `DEVICE` and `SETTINGS` are the run's: a script sets them once from its flags
(`harness.MODEL = ...`) and every child started through `clean_env()` gets them. Only the standard
library at import time: bench/throughput.py's LlamaIndex row imports this from another virtualenv.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent
EMBEDPIPE = str(BIN / "embedpipe") if (BIN / "embedpipe").exists() else shutil.which("embedpipe") or "embedpipe"
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
MODEL = os.environ.get("EMBEDPIPE_MODEL", "all-MiniLM-L6-v2")  # children get both from clean_env()
DEVICE = os.environ.get("EMBEDPIPE_DEVICE", "cpu")
SETTINGS: dict[str, str] = {}  # --set EMBEDPIPE_X=V, for every child


class PeakRss(threading.Thread):
    """Polls the RSS of a process and all its children every 0.1 s; keeps the maximum (bytes) of the sum
    (`peak`) and of the process alone (`own`: a writer's children are its maintenance, which comes and goes)."""

    def __init__(self, pid: int) -> None:
        import psutil

        super().__init__(daemon=True)
        self.proc, self.peak, self.own, self._stop_event = psutil.Process(pid), 0, 0, threading.Event()
        self.start()

    def run(self) -> None:
        import psutil

        try:
            while not self._stop_event.is_set():
                own = self.proc.memory_info().rss
                total = own
                for p in self.proc.children(recursive=True):
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak, self.own = max(self.peak, total), max(self.own, own)
                time.sleep(0.1)
        except psutil.Error:
            pass  # the process is gone

    def stop(self) -> float:
        """The peak of the process and its children, in MB."""
        self._stop_event.set()
        self.join()
        return round(self.peak / 2**20, 1)

    def own_mb(self) -> float:
        """The peak of the process alone, in MB (after stop())."""
        return round(self.own / 2**20, 1)


def cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any EMBEDPIPE_* setting, offline, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPIPE_")}
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path})
    env.update({"EMBEDPIPE_MODEL": MODEL, "EMBEDPIPE_DEVICE": DEVICE, **SETTINGS})  # the run's model, device, --set
    return {**env, **extra}


def run_measured(cmd: list[str], env: dict[str, str], timeout: float = 3600) -> tuple[dict, float, float]:
    """Run cmd to the end: (its last stdout line as JSON), wall seconds, peak RSS in MB."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = PeakRss(proc.pid)
    out, err = proc.communicate(timeout=timeout)
    wall = time.perf_counter() - started
    peak = rss.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"FAILED ({proc.returncode}): {' '.join(cmd)}\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1]), wall, peak


def embedpipe(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    done = subprocess.run([EMBEDPIPE, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"embedpipe {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def start_pools(
    workdir: Path,
    env: dict[str, str],
    embed_env: dict[str, str],
    embedders: int,
    pools: dict[str, int],
    procs: dict[str, subprocess.Popen],
) -> dict[str, PeakRss]:
    """The janitor, `embedders` embed workers and one worker per other pool (`pools` adds more), each
    logging to workdir/NAME.log, added to `procs` as they start (the caller stops them, see stop_pools);
    returns once every worker has registered with rq, with a peak-RSS monitor per process."""
    counts = {"load": pools.get("load", 1), "chunk": pools.get("chunk", 1), "write": pools.get("write", 1)}
    commands = {"janitor": ["janitor"]}
    for stage in ("load", "chunk", "embed", "write"):
        n = embedders if stage == "embed" else counts[stage]
        commands.update(
            {f"{stage}{i + 1}" if n > 1 or stage == "embed" else stage: ["worker", stage] for i in range(n)}
        )
    for proc_name, args in commands.items():
        with open(workdir / f"{proc_name}.log", "w") as log:  # the child keeps its own descriptor
            procs[proc_name] = subprocess.Popen(
                [EMBEDPIPE, *args],
                env=embed_env if proc_name.startswith("embed") else env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    monitors = {n: PeakRss(p.pid) for n, p in procs.items()}
    deadline = time.monotonic() + 300
    while True:  # a worker registers with rq only after it has loaded its model/tokenizer/store
        dead = [n for n, p in procs.items() if p.poll() is not None]
        if dead:
            log_text = (workdir / f"{dead[0]}.log").read_text()[-4000:]
            raise RuntimeError(f"{dead} exited while starting:\n{log_text}")
        stages = json.loads(embedpipe(env, "status", "--json"))["stages"]
        if all(stages[s]["workers"] >= n for s, n in {**counts, "embed": embedders}.items()):
            return monitors
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers not ready after 300 s: {stages}")
        time.sleep(1)


def stop_pools(procs: dict[str, subprocess.Popen]) -> None:
    """SIGTERM to every process (each finishes its job), then wait; kill what does not end in 60 s."""
    for p in procs.values():
        p.send_signal(signal.SIGTERM)
    for p in procs.values():
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()


def write_docs(n: int, path: Path, scifact: Path) -> int:
    """The first n SciFact abstracts; past the corpus's end it starts again under new IDs (id#2, ...)."""
    if not (scifact / "corpus.jsonl").is_file():
        sys.exit(f"no SciFact corpus at {scifact}/corpus.jsonl: the benchmark needs the shared data set")
    from shared.quality import corpus_documents, load_beir

    corpus = list(corpus_documents(load_beir(scifact)))
    with path.open("w") as f:
        for i in range(n):
            d, lap = corpus[i % len(corpus)], i // len(corpus)
            f.write(json.dumps({"id": d.id + (f"#{lap + 1}" if lap else ""), "text": d.text}) + "\n")
    return n
