"""Throughput of embedpipe's modes against the limit: the model's own `encode`, side by side in one run.

    python bench/throughput.py [--docs N] [--out FILE.json]

Corpus: the first N (default 200) SciFact abstracts (title + " " + text), real documents of mixed
lengths, chunked exactly as the pipeline chunks them. Every mode runs in a process of its own, so
its peak RSS (the process and its children, polled every 0.1 s) is its own.

  bare encode   the limit: the chunks' texts through SentenceTransformer.encode in ONE call
                (it sorts by length, so padding is minimal), batch 16 and 32, the best kept.
                Only the encode call is timed: no imports, model load, chunking or storage.
  embedded      `embedpipe run FILE --json`: the whole process (imports, model load, exit), its
                own summary (its clock starts before the model loads), and the steady state: a
                driver that warms the Embedder first and times only EmbeddedRun(...).run(items).
  distributed   one worker per pool on a private redis-server; from `embedpipe enqueue` until
                `embedpipe wait` returns (queues, claim checks in Redis, the janitor's batching).

The model dominates everything, and the machine is shared and noisy: absolute seconds move from
run to run, so read the "ratio" column (chunks/s of the mode / chunks/s of bare encode, measured in
the same run) as the figure of merit: it tells how much of the model's speed the pipeline keeps.
Both bare encode and the steady-state driver run one short encode before their clocks start, so
neither pays the first call's one-off costs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.servers import start_redis  # noqa: E402

BIN = Path(sys.executable).parent
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
MODEL = "all-MiniLM-L6-v2"


class PeakRss(threading.Thread):
    """Polls the RSS of a process and all its children every 0.1 s; keeps the maximum (bytes)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self._stop_event = pid, 0, threading.Event()
        self.start()

    def run(self) -> None:
        try:
            proc = psutil.Process(self.pid)
            while not self._stop_event.is_set():
                total = 0
                for p in [proc, *proc.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
                time.sleep(0.1)
        except psutil.Error:
            pass  # the process is gone

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return round(self.peak / 2**20, 1)


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any EMBEDPIPE_* setting, offline, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPIPE_")}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def run_measured(cmd: list[str], env: dict[str, str], timeout: float = 3600) -> tuple[dict | str, float, float]:
    """Run cmd to the end: (its last stdout line as JSON, or its stdout), wall seconds, peak RSS in MB."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = PeakRss(proc.pid)
    out, err = proc.communicate(timeout=timeout)
    wall = time.perf_counter() - started
    peak = rss.stop()
    if proc.returncode != 0:
        sys.exit(f"FAILED ({proc.returncode}): {' '.join(cmd)}\n{err[-4000:]}")
    lines = out.strip().splitlines()
    try:
        return json.loads(lines[-1]), wall, peak
    except (IndexError, json.JSONDecodeError):
        return out, wall, peak


def row(mode: str, chunks: int, tokens: int, seconds: float, rss: object, **extra: object) -> dict:
    return {
        "mode": mode,
        "chunks": chunks,
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "chunks_per_s": round(chunks / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "peak_rss_mb": rss,
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        **extra,
    }


# --- child processes (this script, run again with --child) ---------------------------------------


def child_bare(docs_file: Path) -> dict:
    from shared.messages import SourceDoc
    from shared.models import ModelTokenizer
    from shared.settings import Settings
    from workers.chunk import ChunkPolicy, chunk_batch
    from workers.embed import Embedder
    from workers.load import load_batch

    raw = [SourceDoc(**json.loads(line)).to_dict() for line in docs_file.open()]
    docs, dead = load_batch(raw, Settings().max_doc_bytes)
    tok = ModelTokenizer(MODEL)
    chunks = chunk_batch(docs, tok, ChunkPolicy.for_model(tok.info.max_content_tokens, 0, 0.1))
    texts = [c.text for c in chunks]
    model = Embedder(MODEL, "cpu").warm_up()._model
    model.encode(texts[:4], batch_size=4)  # one-off first-call costs, outside the clock
    import torch

    seconds = {}
    for b in (16, 32):
        started = time.perf_counter()
        model.encode(texts, batch_size=b, normalize_embeddings=True, show_progress_bar=False)
        seconds[b] = time.perf_counter() - started
    return {
        "chunks": len(chunks),
        "tokens": sum(c.tokens for c in chunks),
        "documents": len(docs),
        "dead": len(dead),
        "seconds_by_batch": seconds,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def child_embedded(docs_file: Path, store: Path) -> dict:
    from producer.sources import iter_sources, resolve
    from shared.settings import Settings
    from workers.embed import Embedder
    from workers.embedded import EmbeddedRun

    settings = Settings.from_env({}, store=str(store))
    warm = Embedder(settings.model, settings.device, settings.batch_size).warm_up()
    warm.embed(["warm up", "the model once"])  # as bare encode does
    items = iter_sources(resolve([str(docs_file)]), settings.max_doc_bytes)
    started = time.perf_counter()
    pipeline = EmbeddedRun(settings, embedder=warm, progress=None)  # opens the store, loads the tokenizer
    init_seconds = time.perf_counter() - started
    summary = pipeline.run(items)  # reads, loads, chunks, embeds, writes: the steady state
    return {
        **summary.to_dict(),
        "timed_seconds": time.perf_counter() - started - init_seconds,
        "init_seconds": init_seconds,
    }


# --- the modes ---------------------------------------------------------------------------------------


def bench_bare(docs_file: Path) -> tuple[dict, dict]:
    r, wall, rss = run_measured([sys.executable, __file__, "--child", "bare", str(docs_file)], clean_env())
    best = min(r["seconds_by_batch"], key=r["seconds_by_batch"].get)
    return row(
        f"bare encode (B={best})",
        r["chunks"],
        r["tokens"],
        r["seconds_by_batch"][best],
        rss,
        seconds_by_batch=r["seconds_by_batch"],
        process_wall_s=round(wall, 1),
    ), r


def bench_embedded(docs_file: Path, tmp: Path) -> list[dict]:
    cmd = [str(BIN / "embedpipe"), "run", str(docs_file), "--json", "--no-progress", "--store", str(tmp / "run")]
    s, wall, rss = run_measured(cmd, clean_env())
    whole = row("embedded: whole process", s["chunks"], s["tokens"], wall, rss, summary=s)
    own = row("embedded: its summary", s["chunks_embedded"], s["tokens"], s["seconds"], rss)
    cmd = [sys.executable, __file__, "--child", "embedded", str(docs_file), str(tmp / "steady")]
    d, _, rss = run_measured(cmd, clean_env())
    steady = row("embedded: steady state", d["chunks_embedded"], d["tokens"], d["timed_seconds"], rss, summary=d)
    return [whole, own, steady]


def embedpipe(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    done = subprocess.run(
        [str(BIN / "embedpipe"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"embedpipe {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def bench_distributed(docs_file: Path, tmp: Path) -> dict:
    redis, port = start_redis(tmp)
    env = clean_env(EMBEDPIPE_REDIS_URL=f"redis://127.0.0.1:{port}/0", EMBEDPIPE_STORE=str(tmp / "dist"))
    procs: dict[str, subprocess.Popen] = {}
    try:
        ping = ["redis-cli", "-p", str(port), "ping"]
        while subprocess.run(ping, capture_output=True, text=True).stdout.strip() != "PONG":
            time.sleep(0.1)
        commands = {"janitor": ["janitor"], **{s: ["worker", s] for s in ("load", "chunk", "embed", "write")}}
        for name, args in commands.items():
            with open(tmp / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
                procs[name] = subprocess.Popen(
                    [str(BIN / "embedpipe"), *args], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
                )
        monitors = {name: PeakRss(p.pid) for name, p in procs.items()}
        deadline = time.monotonic() + 300
        while True:  # a worker registers with rq only after it has loaded its model/tokenizer/store
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(
                    f"{dead} exited while starting: see {tmp}/{dead[0]}.log:\n"
                    + (tmp / f"{dead[0]}.log").read_text()[-4000:]
                )
            stages = json.loads(embedpipe(env, "status", "--json"))["stages"]
            if all(s["workers"] >= 1 for s in stages.values()):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not ready after 300 s: {stages}")
            time.sleep(1)
        started = time.perf_counter()
        embedpipe(env, "enqueue", str(docs_file), "--no-progress")
        embedpipe(env, "wait", "--timeout", "3600", timeout=3700)
        seconds = time.perf_counter() - started
        status = json.loads(embedpipe(env, "status", "--json"))
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        redis.terminate()
        redis.wait(timeout=30)
    rss = {name: m.stop() for name, m in monitors.items()}
    import lancedb

    from shared.store import TABLE, open_store

    stored = open_store(str(tmp / "dist"), MODEL).count()
    tokens = sum(lancedb.connect(str(tmp / "dist")).open_table(TABLE).to_arrow()["tokens"].to_pylist())
    return row("distributed: 1 worker/pool", stored, tokens, seconds, rss, status=status)


# --- main -------------------------------------------------------------------------------------------


def write_docs(n: int, path: Path) -> int:
    if not (SCIFACT / "corpus.jsonl").is_file():
        sys.exit(f"no SciFact corpus at {SCIFACT}/corpus.jsonl: the benchmark needs the shared data set")
    from shared.quality import corpus_documents, load_beir

    docs = list(itertools.islice(corpus_documents(load_beir(SCIFACT)), n))
    with path.open("w") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "text": d.text}) + "\n")
    return len(docs)


def print_table(rows: list[dict], bare_cps: float) -> None:
    head = (
        f"{'mode':<28}{'chunks':>7}{'tokens':>8}{'seconds':>9}{'chunks/s':>10}{'tokens/s':>10}{'ratio':>7}  peak RSS MB"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        rss = r["peak_rss_mb"]
        rss = ", ".join(f"{k} {v:.0f}" for k, v in rss.items()) if isinstance(rss, dict) else f"{rss:.0f}"
        print(
            f"{r['mode']:<28}{r['chunks']:>7}{r['tokens']:>8}{r['seconds']:>9.1f}{r['chunks_per_s']:>10.2f}"
            f"{r['tokens_per_s']:>10.0f}{r['chunks_per_s'] / bare_cps:>7.2f}  {rss}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=200, help="how many SciFact abstracts (default 200)")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # internal: a measured subprocess
    args = parser.parse_args()
    if args.child:
        fn = {"bare": child_bare, "embedded": child_embedded}[args.child[0]]
        print(json.dumps(fn(*map(Path, args.child[1:]))))
        return
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-") as tmp_name:
        tmp = Path(tmp_name)
        docs_file = tmp / "docs.jsonl"
        n = write_docs(args.docs, docs_file)
        print(f"{n} SciFact documents; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}", flush=True)
        bare, info = bench_bare(docs_file)
        print(
            f"torch {info['torch']}, torch.get_num_threads() = {info['torch_threads']}; bare encode s by batch: "
            + ", ".join(f"{b}: {s:.1f}" for b, s in info["seconds_by_batch"].items()),
            flush=True,
        )
        rows = [bare, *bench_embedded(docs_file, tmp), bench_distributed(docs_file, tmp)]
    bare_cps = bare["chunks_per_s"]
    for r in rows:
        r["ratio"] = round(r["chunks_per_s"] / bare_cps, 3)
    print()
    print_table(rows, bare_cps)
    mismatched = [r["mode"] for r in rows if r["chunks"] != bare["chunks"]]
    if mismatched:
        print(f"\nWARNING: chunk counts differ from bare encode ({bare['chunks']}): {mismatched}")
    if args.out:
        results = {"documents": n, "cpus": os.cpu_count(), "torch_threads": info["torch_threads"], "rows": rows}
        args.out.write_text(json.dumps(results, indent=2))
        print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
