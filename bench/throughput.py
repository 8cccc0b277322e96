"""Throughput of embedpipe against the limit (the model's own `encode`) and against the pipelines users
would otherwise pick: every row in one run, side by side.

    python bench/throughput.py [--docs N] [--backend torch-bf16] [--quality] [--only ROW ...] [--out FILE.json]
    python bench/throughput.py --device cuda --only bare embedded distributed distributed-4 ...  (bench/gpu.sh)

Corpus: the first N (default 500) SciFact abstracts (title + " " + text), real documents of mixed
lengths (past SciFact's 5,183 they repeat under new IDs). Every row runs in processes of its own, one
after the other, so its peak RSS and CPU time are its own. The rows (bench/README.md says exactly
what each clock covers):

  bare           the limit: the pipeline's own chunk texts through SentenceTransformer.encode in ONE
                 call (it sorts by length), batch 16, 32 and 64, the best kept. Only encode is timed.
  bare-fast      the same for the fast backend (--backend; default torch-bf16 on CPUs with native
                 bf16, else onnx-int8): torch-bf16 as bare, ONNX its runtime over all chunk texts
                 sorted by length; batches of 16, 32, 64, the best kept.
  embedded-cli   `embedpipe run FILE --json`: the whole process (imports, model load, exit).
  embedded       steady state: a warm Embedder, then run_embedded(..., items) timed (load, chunk,
                 embed, write to LanceDB), torch; embedded-fast: the same with --backend.
  distributed    a private redis-server, the janitor and one worker per pool, ready before the clock;
                 timed from `embedpipe enqueue` until `embedpipe wait` returns. distributed-2: two
                 embedders (OMP_NUM_THREADS=1 each on a CPU), distributed-4: four. distributed-fast:
                 --backend. --pools adds workers to the other pools (a GPU machine's many cores).
  textbook       load all, chunk all, encode in fixed batches of 100 (batch_size=100), store (LanceDB).
  llamaindex     LlamaIndex IngestionPipeline: SentenceSplitter (the model's tokenizer, 254 tokens, 25
                 overlap) + HuggingFaceEmbedding on the same local model, in its own virtualenv
                 (.bench/venv-llamaindex, see bench/README.md); skipped with a message if missing.

The ratio column is bare encode's seconds / the row's seconds for the same corpus (for rows with the
same chunks, exactly chunks/s over bare's chunks/s). The machine is shared and noisy: compare ratios
from one run, not absolute seconds across runs. `--quality` adds SciFact recall@10 on the test suite's
subset for torch and the fast backend (the same figure as bench/quality.py --subset).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness as h  # bench/harness.py: the processes, their environment and memory, the corpus
from harness import ROOT, SCIFACT, clean_env, cpu_seconds, embedpipe, run_measured, start_pools, stop_pools

LLAMA_PY = ROOT / ".bench" / "venv-llamaindex" / "bin" / "python"
ROWS = (
    "bare",
    "bare-fast",
    "embedded-cli",
    "embedded",
    "embedded-fast",
    "distributed",
    "distributed-2",
    "distributed-4",
    "distributed-fast",
    "textbook",
    "llamaindex",
)


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


# --- child processes (this script again, with --child) ------------------------------------------


def pipeline_chunks(docs_file: Path) -> list:
    """The documents loaded and chunked exactly as the pipeline does it."""
    from shared.messages import SourceDoc
    from shared.models import ModelTokenizer
    from shared.settings import Settings
    from shared.spec import chunk_policy
    from workers.chunk import chunk_batch
    from workers.load import load_batch

    raw = [SourceDoc(**json.loads(line)).to_dict() for line in docs_file.open()]
    docs, _ = load_batch(raw, Settings().max_doc_bytes)
    tok = ModelTokenizer(h.MODEL)
    return chunk_batch(docs, tok, chunk_policy(Settings(), tok))


def child_bare(docs_file: str, backend: str) -> dict:
    import torch

    from workers.embedder import LocalEmbedder

    chunks = pipeline_chunks(Path(docs_file))
    texts = [c.text for c in chunks]
    embedder = LocalEmbedder(h.MODEL, h.DEVICE, backend=backend).warm_up()
    model = embedder._model
    if backend.startswith("torch"):

        def encode(b: int) -> None:
            with embedder._precision():  # bf16 autocast for torch-bf16 on the CPU
                model.encode(texts, batch_size=b, normalize_embeddings=True, show_progress_bar=False)

    else:  # the runtime itself, over all texts sorted by length (what encode() does for torch)
        ordered = sorted(texts, key=len, reverse=True)

        def encode(b: int) -> None:
            for i in range(0, len(ordered), b):
                model.encode(ordered[i : i + b])

    model.encode(texts[:4], batch_size=4)  # one-off first-call costs, outside the clock
    seconds, cpu = {}, {}
    for b in (16, 32, 64) if h.DEVICE == "cpu" else (64, 128, 256, 512):
        started, cpu0 = time.perf_counter(), time.process_time()
        encode(b)
        seconds[b], cpu[b] = time.perf_counter() - started, time.process_time() - cpu0
    return {
        "chunks": len(chunks),
        "tokens": sum(c.tokens for c in chunks),
        "seconds_by_batch": seconds,
        "cpu_by_batch": cpu,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if h.DEVICE.startswith("cuda") else "cpu",
    }


def child_embedded(docs_file: str, store: str, backend: str) -> dict:
    from producer.sources import iter_sources, resolve
    from shared.settings import Settings
    from shared.spec import spec_for
    from workers.embed import make_embedder
    from workers.embedded import run_embedded

    settings = Settings.from_env({}, store=store, backend=backend)
    warm = make_embedder(settings).warm_up()
    warm.embed(["warm up", "the model once"])  # as bare encode does
    spec_for(settings)  # hashes the weights once per process (cached): outside the clock
    items = iter_sources(resolve([docs_file]), settings.max_doc_bytes)
    started, cpu0 = time.perf_counter(), time.process_time()
    # reads, loads, chunks, embeds, writes: the steady state (and opens the store, loads the tokenizer: ~0.1 s)
    summary = run_embedded(settings, items, embedder=warm)
    return {
        **summary.to_dict(),
        "timed_seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu0,
    }


def child_textbook(docs_file: str, store: str) -> dict:
    """What a tutorial does: load everything, chunk everything, embed in fixed batches of 100 in
    document order, store everything (LanceDB). The model is warm before the clock starts."""
    import lancedb
    import pyarrow as pa

    from shared.messages import SourceDoc
    from shared.models import ModelTokenizer
    from shared.settings import Settings
    from shared.spec import chunk_policy
    from workers.chunk import chunk_batch
    from workers.embedder import LocalEmbedder
    from workers.load import load_batch

    model = LocalEmbedder(h.MODEL, h.DEVICE).warm_up()._model
    model.encode(["warm up", "the model once"])
    tok = ModelTokenizer(h.MODEL)
    started = time.perf_counter()
    raw = [SourceDoc(**json.loads(line)).to_dict() for line in Path(docs_file).open()]
    docs, _ = load_batch(raw, Settings().max_doc_bytes)
    chunks = chunk_batch(docs, tok, chunk_policy(Settings(), tok))
    vectors = []
    for i in range(0, len(chunks), 100):
        batch = [c.text for c in chunks[i : i + 100]]
        vectors.extend(model.encode(batch, batch_size=100, normalize_embeddings=True, show_progress_bar=False))
    table = pa.table(
        {
            "id": [c.chunk_id for c in chunks],
            "text": [c.text for c in chunks],
            "vector": pa.array([v.tolist() for v in vectors], type=pa.list_(pa.float32(), len(vectors[0]))),
        }
    )
    lancedb.connect(store).create_table("chunks", table)
    return {
        "chunks": len(chunks),
        "tokens": sum(c.tokens for c in chunks),
        "timed_seconds": time.perf_counter() - started,
    }


def child_llamaindex(docs_file: str, model_path: str) -> dict:
    """Runs in .bench/venv-llamaindex: LlamaIndex's own defaults except the model and the splitter's
    tokenizer (the model's, so chunks fit it as ours do). No vector store: nodes come back embedded."""
    from llama_index.core import Document
    from llama_index.core.ingestion import IngestionPipeline
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    embed = HuggingFaceEmbedding(model_name=model_path, device="cpu")
    embed.get_text_embedding("warm up the model once")
    started = time.perf_counter()
    docs = [Document(text=d["text"], id_=d["id"]) for d in map(json.loads, Path(docs_file).open())]
    splitter = SentenceSplitter(
        chunk_size=254, chunk_overlap=25, tokenizer=lambda t: tok.encode(t, add_special_tokens=False)
    )
    nodes = IngestionPipeline(transformations=[splitter, embed]).run(documents=docs)
    seconds = time.perf_counter() - started
    texts = [n.get_content() for n in nodes]
    return {
        "chunks": len(nodes),
        "tokens": sum(len(tok.encode(t, add_special_tokens=False)) for t in texts),
        "timed_seconds": seconds,
        "embedded": sum(1 for n in nodes if n.embedding),
        "embed_batch_size": embed.embed_batch_size,
    }


def child_quality(backend: str) -> dict:
    """SciFact recall@10 on the test suite's subset (bench/quality.py --subset) with this backend."""
    from shared.quality import corpus_documents, evaluate, load_beir
    from shared.settings import Settings
    from shared.spec import spec_for
    from shared.store import open_store
    from tests.helpers import scifact_subset as subset
    from workers.embed import make_embedder
    from workers.embedded import run_embedded

    eval_set, ids = subset(load_beir(SCIFACT))
    with tempfile.TemporaryDirectory() as store:
        settings = Settings.from_env({}, store=store, backend=backend)
        embedder = make_embedder(settings).warm_up()
        summary = run_embedded(settings, corpus_documents(eval_set, ids), embedder=embedder, progress=None)
        scores = evaluate(open_store(store, spec_for(settings)), embedder, eval_set)
    return {"backend": backend, "chunks": summary.chunks, **scores}


# --- the rows ------------------------------------------------------------------------------------------


def me(*args: str) -> list[str]:
    return [sys.executable, __file__, "--child", *args]


def bench_bare(docs_file: Path, backend: str) -> dict:
    r, _, rss = run_measured(me("bare", str(docs_file), backend), clean_env())
    best = min(r["seconds_by_batch"], key=r["seconds_by_batch"].get)
    name = f"bare encode B={best}" + ("" if backend == "torch" else f" ({backend})")
    result = row(
        name, r["chunks"], r["tokens"], r["seconds_by_batch"][best], rss, detail=r, cpu_s=r["cpu_by_batch"][best]
    )
    return result


def bench_embedded_cli(docs_file: Path, tmp: Path) -> dict:
    cmd = [h.EMBEDPIPE, "run", str(docs_file), "--json", "--no-progress", "--store", str(tmp / "cli")]
    s, wall, rss = run_measured(cmd, clean_env())
    return row("embedded: whole process", s["chunks"], s["tokens"], wall, rss, summary=s)


def bench_embedded(docs_file: Path, tmp: Path, backend: str) -> dict:
    store = tmp / f"embedded-{backend}"
    d, _, rss = run_measured(me("embedded", str(docs_file), str(store), backend), clean_env())
    name = "embedded" + ("" if backend == "torch" else f" ({backend})")
    return row(name, d["chunks"], d["tokens"], d["timed_seconds"], rss, summary=d, cpu_s=d["cpu_seconds"])


def bench_textbook(docs_file: Path, tmp: Path) -> dict:
    d, _, rss = run_measured(me("textbook", str(docs_file), str(tmp / "textbook")), clean_env())
    return row("textbook (fixed 100s)", d["chunks"], d["tokens"], d["timed_seconds"], rss)


def bench_llamaindex(docs_file: Path) -> dict | None:
    if not LLAMA_PY.exists():
        print(f"llamaindex: skipped, no virtualenv at {LLAMA_PY} (see bench/README.md)", flush=True)
        return None
    from shared.models import resolve_model_path

    cmd = [str(LLAMA_PY), __file__, "--child", "llamaindex", str(docs_file), str(resolve_model_path(h.MODEL))]
    d, _, rss = run_measured(cmd, clean_env())
    return row("LlamaIndex IngestionPipeline", d["chunks"], d["tokens"], d["timed_seconds"], rss, detail=d)


def bench_distributed(docs_file: Path, tmp: Path, backend: str, embedders: int, pools: dict[str, int]) -> dict:
    """One worker per pool (`embedders` embed workers), a private Redis; CPU seconds of every process
    over the timed span, so the pipeline's own cost (everything but the embedders) can be read."""
    from tests.servers import start_redis

    name = f"distributed-{backend}-{embedders}"
    (tmp / name).mkdir()
    redis, port = start_redis(tmp / name)
    env = clean_env(
        EMBEDPIPE_REDIS_URL=f"redis://127.0.0.1:{port}/0",
        EMBEDPIPE_STORE=str(tmp / name / "store"),
        EMBEDPIPE_BACKEND=backend,
        EMBEDPIPE_LOG_LEVEL="INFO",  # one line per job: the chunks each embedder did
    )
    # On a CPU, several embedders share its cores: one thread each (torch and ONNX Runtime follow
    # OMP_NUM_THREADS; two cores here). On a GPU they share the GPU and keep torch's defaults.
    embed_env = {**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // embedders))} if embedders > 1 else env
    if h.DEVICE != "cpu":
        embed_env = env
    procs: dict[str, subprocess.Popen] = {}
    try:
        monitors = start_pools(tmp / name, env, embed_env, embedders, pools, procs)
        pids = {**{n: p.pid for n, p in procs.items()}, "redis": redis.pid}
        cpu0 = {n: cpu_seconds(pid) for n, pid in pids.items()}
        started, wall0 = time.perf_counter(), time.time()
        embedpipe(env, "enqueue", str(docs_file), "--no-progress")
        embedpipe(env, "wait", "--timeout", "3600", timeout=3700)
        seconds = time.perf_counter() - started
        cpu = {n: round(cpu_seconds(pid) - cpu0[n], 2) for n, pid in pids.items()}
        status = json.loads(embedpipe(env, "status", "--json"))
    finally:
        stop_pools(procs)
        redis.terminate()
        redis.wait(timeout=30)
    rss = {n: m.stop() for n, m in monitors.items()}
    # How evenly the embedders shared the work (chunks per embedder), and when the first embed job
    # started and the last one ended (seconds after the clock started), from their line per job.
    shares, first, last, busy_s = {}, [], [], 0.0
    for proc_name in procs:
        if proc_name.startswith("embed"):
            jobs = re.findall(
                r"^(\S+ \S+) INFO \S+: embed \S+: chunks=(\d+) .*?in ([\d.]+) s$",
                (tmp / name / f"{proc_name}.log").read_text(),
                re.M,
            )
            shares[proc_name] = sum(int(n) for _, n, _ in jobs)
            busy_s += sum(float(s) for _, _, s in jobs)
            ends = [
                time.mktime(time.strptime(t.split(",")[0], "%Y-%m-%d %H:%M:%S")) + int(t.split(",")[1]) / 1000
                for t, _, _ in jobs
            ]
            first += [e - float(s) for e, (_, _, s) in zip(ends, jobs, strict=True)]
            last += ends
    busy = (
        {
            "first_embed_start_s": round(min(first) - wall0, 2),
            "last_embed_end_s": round(max(last) - wall0, 2),
            "embed_job_s": round(busy_s, 2),
        }
        if first
        else {}
    )
    import lancedb

    db = lancedb.connect(str(tmp / name / "store"))
    tables = [t for t in db.list_tables().tables] if hasattr(db.list_tables(), "tables") else list(db.table_names())
    stored = tokens = 0
    for t in tables:
        arrow = db.open_table(t).to_arrow()
        if "tokens" in arrow.column_names:
            stored += arrow.num_rows
            tokens += sum(arrow["tokens"].to_pylist())
    label = f"distributed, {embedders} embedder{'s' if embedders > 1 else ''}"
    label += "".join(f", {k} {v}" for k, v in pools.items())
    label += "" if backend == "torch" else f" ({backend})"
    return row(
        label, stored, tokens, seconds, rss, cpu_by_process=cpu, chunks_by_embedder=shares, **busy, status=status
    )


# --- main --------------------------------------------------------------------------------------------


def print_table(rows: list[dict], bare: dict) -> None:
    head = f"{'row':<36}{'chunks':>7}{'tokens':>8}{'seconds':>9}{'chunks/s':>9}{'tokens/s':>9}{'ratio':>7}  peak RSS MB"
    print(head)
    print("-" * len(head))
    for r in rows:
        rss = r["peak_rss_mb"]
        rss = ", ".join(f"{k} {v:.0f}" for k, v in rss.items()) if isinstance(rss, dict) else f"{rss:.0f}"
        print(
            f"{r['mode']:<36}{r['chunks']:>7}{r['tokens']:>8}{r['seconds']:>9.1f}{r['chunks_per_s']:>9.2f}"
            f"{r['tokens_per_s']:>9.0f}{bare['seconds'] / r['seconds']:>7.2f}  {rss}"
        )


def outside_cost(rows: dict[str, dict], bare: dict, bare_fast: dict | None) -> list[str]:
    """CPU seconds per 1,000 chunks spent outside the embedder: distributed, every process but the
    embedders (janitor, load, chunk, write, Redis); embedded, the process's CPU time less the CPU time
    bare encode of the same chunks took (an estimate: one process, threads cannot be told apart)."""
    lines = []
    for key, r in rows.items():
        per_k = 1000 / max(r["chunks"], 1)
        if "cpu_by_process" in r:
            parts = {n: s for n, s in r["cpu_by_process"].items() if not n.startswith("embed")}
            embed = sum(s for n, s in r["cpu_by_process"].items() if n.startswith("embed"))
            detail = ", ".join(f"{n} {s * per_k:.2f}" for n, s in parts.items())
            lines.append(
                f"{r['mode']}: {sum(parts.values()) * per_k:.2f} CPU s per 1,000 chunks outside the embedder"
                f" ({detail}); embedders {embed * per_k:.1f}"
            )
            if len(r.get("chunks_by_embedder", {})) > 1:
                lines.append(f"  chunks per embedder: {r['chunks_by_embedder']}")
            if "first_embed_start_s" in r:
                lines.append(
                    f"  first embed job started at {r['first_embed_start_s']:.1f} s, the last ended at"
                    f" {r['last_embed_end_s']:.1f} s of {r['seconds']:.1f} s (start-up and drain: the rest);"
                    f" embed jobs took {r['embed_job_s']:.1f} s in all"
                )
        elif key.startswith("embedded") and key != "embedded-cli" and "cpu_s" in r:
            ref = bare_fast if key == "embedded-fast" else bare
            if ref is None:
                continue
            outside = r["cpu_s"] - ref["cpu_s"] * r["chunks"] / max(ref["chunks"], 1)
            figures = f"process {r['cpu_s'] * per_k:.1f} CPU s per 1,000 chunks, bare encode {ref['cpu_s'] * per_k:.1f}"
            if outside < 0:  # its micro-batches pad less than encode()'s fixed batches: no estimate
                lines.append(f"{r['mode']}: less CPU than bare encode in all ({figures}): not measurable this way")
            else:
                lines.append(
                    f"{r['mode']}: ~{outside * per_k:.2f} CPU s per 1,000 chunks outside the embedder ({figures})"
                )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=500, help="how many SciFact abstracts (default 500)")
    parser.add_argument(
        "--backend", help="the fast backend's rows (default torch-bf16 where the CPU has native bf16, else onnx-int8)"
    )
    parser.add_argument("--only", nargs="+", choices=ROWS, help="run only these rows (bare always runs)")
    parser.add_argument("--rounds", type=int, default=2, help="run every row this many times, keep the fastest")
    parser.add_argument("--quality", action="store_true", help="also SciFact recall@10 (subset): torch vs --backend")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: bare encode and the workers")
    parser.add_argument("--model", default=h.MODEL, help="model name or local directory (default the bundled one)")
    parser.add_argument("--scifact", type=Path, default=SCIFACT, help="BEIR SciFact directory")
    parser.add_argument("--set", action="append", default=[], metavar="EMBEDPIPE_X=V", help="a setting for all rows")
    parser.add_argument("--pools", default="", help="workers of the other pools, e.g. load=2,chunk=4,write=4")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # internal: a measured subprocess
    args = parser.parse_args()
    if args.child:
        fn = {
            "bare": child_bare,
            "embedded": child_embedded,
            "textbook": child_textbook,
            "llamaindex": child_llamaindex,
            "quality": child_quality,
        }[args.child[0]]
        print(json.dumps(fn(*args.child[1:])))
        return
    h.MODEL, h.DEVICE = args.model, args.device
    h.SETTINGS.update(kv.split("=", 1) for kv in args.set)
    pools = {k: int(v) for k, v in (p.split("=") for p in args.pools.split(",") if p)}
    wanted = set(args.only or [r for r in ROWS if r != "distributed-4"]) | {"bare"}
    if args.backend is None:
        from workers.model_load import native_bf16

        args.backend = "torch-bf16" if native_bf16() else "onnx-int8"
    fast = args.backend
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-") as tmp_name:
        tmp = Path(tmp_name)
        docs_file = tmp / "docs.jsonl"
        n = h.write_docs(args.docs, docs_file, args.scifact)
        print(f"{n} SciFact documents; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}", flush=True)
        rounds: dict[str, list[dict]] = {}
        for r in range(args.rounds):
            work = tmp / f"round{r + 1}"
            work.mkdir()
            steps = {
                "bare": lambda w: bench_bare(docs_file, "torch"),
                "bare-fast": lambda w: bench_bare(docs_file, fast),
                "embedded-cli": lambda w: bench_embedded_cli(docs_file, w),
                "embedded": lambda w: bench_embedded(docs_file, w, "torch"),
                "embedded-fast": lambda w: bench_embedded(docs_file, w, fast),
                "distributed": lambda w: bench_distributed(docs_file, w, "torch", 1, pools),
                "distributed-2": lambda w: bench_distributed(docs_file, w, "torch", 2, pools),
                "distributed-4": lambda w: bench_distributed(docs_file, w, "torch", 4, pools),
                "distributed-fast": lambda w: bench_distributed(docs_file, w, fast, 1, pools),
                "textbook": lambda w: bench_textbook(docs_file, w),
                "llamaindex": lambda w: bench_llamaindex(docs_file),
            }
            for key, step in steps.items():
                if key in wanted:
                    result = step(work)
                    if result is not None:
                        rounds.setdefault(key, []).append(result)
                        print(f"  round {r + 1}, {key}: {result['seconds']:.1f} s", flush=True)
                    if key == "bare" and r == 0:
                        info = result["detail"]
                        print(
                            f"torch {info['torch']} on {info['device']}, {info['torch_threads']} threads; "
                            "bare encode s by batch: "
                            + ", ".join(f"{b}: {s:.1f}" for b, s in info["seconds_by_batch"].items()),
                            flush=True,
                        )
        # Other work on the machine only ever slows a row down: keep each row's fastest round.
        rows = {
            k: min(v, key=lambda x: x["seconds"]) | {"rounds_s": [x["seconds"] for x in v]} for k, v in rounds.items()
        }
        bare = rows["bare"]
        quality = []
        if args.quality:
            for backend in ("torch", fast):
                q, _, _ = run_measured(me("quality", backend), clean_env())
                quality.append(q)
    print()
    print_table(list(rows.values()), bare)
    if args.rounds > 1:
        print("\nseconds per round (the table keeps the fastest):")
        for r in rows.values():
            print(f"  {r['mode']}: " + ", ".join(f"{x:.1f}" for x in r["rounds_s"]))
    for r in rows.values():
        r["ratio"] = round(bare["seconds"] / r["seconds"], 3)
    mismatched = [r["mode"] for k, r in rows.items() if r["chunks"] != bare["chunks"] and k != "llamaindex"]
    if mismatched:
        print(f"\nWARNING: chunk counts differ from bare encode ({bare['chunks']}): {mismatched}")
    print()
    for line in outside_cost(rows, bare, rows.get("bare-fast")):
        print(line)
    if "llamaindex" in rows:
        li = rows["llamaindex"]["seconds"]
        print()
        for key in ("embedded", "embedded-fast", "distributed", "distributed-fast"):
            if key in rows:
                print(f"{rows[key]['mode']}: {li / rows[key]['seconds']:.2f}x the LlamaIndex pipeline")
    for q in quality:
        print(f"SciFact subset, {q['backend']}: recall@10 {q['recall@10']:.3f}, nDCG@10 {q['ndcg@10']:.3f}")
    if len(quality) == 2:
        print(f"recall@10 delta ({fast} - torch): {quality[1]['recall@10'] - quality[0]['recall@10']:+.3f}")
    if args.out:
        results = {"documents": n, "cpus": os.cpu_count(), "rows": rows, "quality": quality}
        args.out.write_text(json.dumps(results, indent=2))
        print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
