"""Feeding a fast embedder: how much of a static model's speed does the distributed pipeline keep, and
what does everything around the embedder cost per chunk?

    python bench/fast.py [--docs 10000] [--model DIR] [--embedders 1] [--pools chunk=2] [--quality]
                         [--recovery] [--device cpu] [--set EMBEDPIPE_X=V ...] [--out FILE.json]

The fast embedder is a static model (model2vec) distilled from the default model: --model DIR, or one
distilled once into .bench/static-minilm (`embedpipe distill`, ~40 s). The corpus: the first --docs
SciFact abstracts (past 5,183 they repeat under new IDs), as bench/harness.py writes it. Rows, each
in processes of its own, one after the other:

  chunker      the chunk stage's batch function (chunk_batch) against the model's raw tokenizer
               (encode_batch) on the same texts, CPU seconds, in one process: the chunker's overhead.
               With --baseline REV, also REV's chunker (workers/chunk.py and shared/models.py read
               from git) beside this one, with --reference's tokenizer (older code reads no static model).
  bare         the limit: the pipeline's own chunks through SentenceTransformer.encode(texts) in one
               call (batch 256, 1024, 4096; the best kept), and through the embedder with the chunks'
               token IDs (what the embed stage does: no tokenising). Only the encoding is timed. Then
               the same for the source model (--reference, default all-MiniLM-L6-v2) on the first
               --reference-docs documents (its bare encode at batch 16, 32, 64 on a CPU), for tokens/s
               side by side.
  distributed  a private redis-server, the janitor, --embedders embed workers and one worker per other
               pool (--pools adds more), ready before the clock; timed from `embedpipe enqueue` until
               `embedpipe wait` returns (bench/throughput.py's row). Reported: end-to-end chunks/s and
               its ratio to bare encode, the support cost (CPU ms per chunk written of the janitor,
               loader, chunker, writer and Redis, each and summed), the embedders' CPU, each process's
               peak RSS.
  quality      (--quality) SciFact recall@10 and nDCG@10 (documents ranked by their best chunk), the
               static model on the whole corpus (--quality-chunk-tokens 64 128 256: one run per chunk
               size), and both models on the test suite's subset (tests/test_quality.py: 100
               queries, 401 documents), in the embedded mode.
  recovery     (--recovery) bench/recovery.py: the job of an embed worker SIGKILLed mid-job, with an
               hour's job timeout, redone by the other embedder (the default model: its jobs last
               seconds, a static model's milliseconds).

Name the CPU with every figure (printed first): machines differ between sessions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import harness as h  # noqa: E402  (bench/harness.py: the run's model and device, clean_env, the corpus)
import throughput as tp  # noqa: E402  (bench/throughput.py: the distributed row, the pipeline's chunks)

STATIC_DIR = ROOT / ".bench" / "static-minilm"
SUPPORT = ("janitor", "load", "chunk", "write", "redis")


def cpu_name() -> str:
    """The CPU model and the flags that decide which backend is fastest."""
    flags, model = set(), "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and model == "unknown CPU":
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    has = [f for f in ("avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni") if f in flags]
    return f"{model}, {os.cpu_count()} CPUs, " + (", ".join(has) if has else "no AVX512_BF16/AMX/VNNI")


def static_model(path: Path | None) -> Path:
    if path is not None:
        return path
    if not (STATIC_DIR / "model.safetensors").is_file():
        print(f"distilling a static model into {STATIC_DIR} (once)", flush=True)
        subprocess.run([h.EMBEDPIPE, "distill", "--out", str(STATIC_DIR), "--force"], env=h.clean_env(), check=True)
    return STATIC_DIR


# --- child processes (this script again, with --child) ---------------------------------------------


def child_chunker(docs_file: str) -> dict:
    """chunk_batch against the raw tokenizer on the same loaded texts: CPU seconds, best of 3."""
    from shared.messages import SourceDoc
    from shared.settings import Settings
    from shared.spec import chunk_policy
    from shared.tokenizers import load_tokenizer
    from workers.chunk import chunk_batch
    from workers.load import load_batch

    raw = [SourceDoc(**json.loads(line)).to_dict() for line in Path(docs_file).open()]
    docs, _ = load_batch(raw, Settings().max_doc_bytes)
    tokenizer = load_tokenizer(h.MODEL)
    policy = chunk_policy(Settings(), tokenizer)
    texts = [d.text for d in docs]

    def best(f) -> float:
        times = []
        for _ in range(3):
            started = time.process_time()
            f()
            times.append(time.process_time() - started)
        return min(times)

    raw_s = best(lambda: tokenizer._tok.encode_batch(texts, add_special_tokens=False))
    chunk_s = best(lambda: chunk_batch(docs, tokenizer, policy))
    chunks = chunk_batch(docs, tokenizer, policy)
    return {
        "documents": len(docs),
        "chunks": len(chunks),
        "tokens": sum(c.tokens for c in chunks),
        "raw_tokenizer_cpu_s": raw_s,
        "chunker_cpu_s": chunk_s,
    }


def vector_transport(vectors) -> dict:
    """One part's vectors through Redis: bytes per chunk and CPU microseconds per chunk (encode + decode),
    as msgpack lists of floats, as raw float32 bytes (what travels) and as float16 bytes."""
    import msgpack

    from shared.vectors import pack_vectors, unpack_vectors

    rows = len(vectors)
    ways = {
        "msgpack lists": (lambda: msgpack.packb(vectors.tolist()), lambda raw: msgpack.unpackb(raw)),
        "float32 bytes": (lambda: pack_vectors(vectors), lambda raw: unpack_vectors(raw, rows)),
        "float16 bytes": (lambda: pack_vectors(vectors, "float16"), lambda raw: unpack_vectors(raw, rows, "float16")),
    }
    out = {}
    for name, (encode, decode) in ways.items():
        started = time.process_time()
        for _ in range(5):
            raw = encode()
            decode(raw)
        cpu_us = (time.process_time() - started) / 5 / rows * 1e6
        out[name] = {"bytes_per_chunk": len(raw) / rows, "cpu_us_per_chunk": round(cpu_us, 2)}
    return out


def child_chunker_baseline(docs_file: str, rev: str) -> dict:
    """This chunker and REV's on the same texts with the reference model's tokenizer, CPU seconds."""
    import types

    from shared.messages import SourceDoc
    from shared.models import ModelTokenizer
    from shared.settings import Settings
    from shared.spec import chunk_policy
    from workers.chunk import chunk_batch
    from workers.load import load_batch

    def old_module(path: str) -> types.ModuleType:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True)
        module = types.ModuleType(f"baseline_{path.replace('/', '_')[:-3]}")
        sys.modules[module.__name__] = module  # dataclasses look their module up
        exec(compile(source.stdout, f"{rev}:{path}", "exec"), module.__dict__)
        return module

    old_models, old_chunk = old_module("shared/models.py"), old_module("workers/chunk.py")
    raw = [SourceDoc(**json.loads(line)).to_dict() for line in Path(docs_file).open()]
    docs, _ = load_batch(raw, Settings().max_doc_bytes)
    new_tok, old_tok = ModelTokenizer(h.MODEL), old_models.ModelTokenizer(h.MODEL)
    policy = chunk_policy(Settings(), new_tok)
    old_policy = old_chunk.ChunkPolicy(policy.max_tokens, policy.overlap_tokens)
    texts = [d.text for d in docs]

    def cpu(f) -> float:
        started = time.process_time()
        f()
        return time.process_time() - started

    return {
        "rev": rev,
        "chunks": len(chunk_batch(docs, new_tok, policy)),
        "raw_tokenizer_cpu_s": min(
            cpu(lambda: new_tok._tok.encode_batch(texts, add_special_tokens=False)) for _ in "ab"
        ),
        "chunker_cpu_s": min(cpu(lambda: chunk_batch(docs, new_tok, policy)) for _ in "ab"),
        "baseline_chunker_cpu_s": min(cpu(lambda: old_chunk.chunk_batch(docs, old_tok, old_policy)) for _ in "ab"),
    }


def child_bare(docs_file: str, batches: str) -> dict:
    """The limit: encode() of the chunk texts, and the embedder over the chunks' token IDs."""
    from workers.embedder import LocalEmbedder

    chunks = tp.pipeline_chunks(Path(docs_file))
    texts = [c.text for c in chunks]
    embedder = LocalEmbedder(h.MODEL, h.DEVICE).warm_up()
    model = embedder._model
    model.encode(texts[:64], batch_size=64)  # first-call costs outside the clock
    seconds = {}
    for b in map(int, batches.split(",")):
        started = time.perf_counter()
        model.encode(texts, batch_size=b, normalize_embeddings=True, show_progress_bar=False)
        seconds[b] = time.perf_counter() - started
    started, cpu0 = time.perf_counter(), time.process_time()
    vectors = embedder.embed_chunks(chunks)
    ids_s, ids_cpu = time.perf_counter() - started, time.process_time() - cpu0
    return {
        "vector_transport": vector_transport(vectors[:1024]),
        "chunks": len(chunks),
        "tokens": sum(c.tokens for c in chunks),
        "seconds_by_batch": seconds,
        "token_ids_seconds": ids_s,
        "token_ids_cpu_s": ids_cpu,
    }


def child_quality(scifact: str, sizes: str) -> dict:
    """SciFact recall@10 / nDCG@10 with h.MODEL in the embedded mode: the subset, and the whole corpus
    with each chunk size in `sizes` (0: the model's default; none: no whole-corpus run)."""
    from shared.quality import corpus_documents, evaluate, load_beir
    from shared.settings import Settings
    from shared.spec import spec_for
    from shared.store import open_store
    from tests.helpers import scifact_subset as subset
    from workers.embed import make_embedder
    from workers.embedded import run_embedded

    full = load_beir(Path(scifact))
    runs = {"subset": (*subset(full), 0)}
    runs |= {f"corpus{f', chunks of {n}' if n else ''}": (full, None, n) for n in map(int, sizes.split(",")) if sizes}
    out = {}
    for name, (eval_set, ids, chunk_tokens) in runs.items():
        with tempfile.TemporaryDirectory() as store:
            settings = Settings.from_env({}, store=store, model=h.MODEL, device=h.DEVICE, chunk_tokens=chunk_tokens)
            embedder = make_embedder(settings).warm_up()
            summary = run_embedded(settings, corpus_documents(eval_set, ids), embedder=embedder)
            out[name] = {
                "chunks": summary.chunks,
                **evaluate(open_store(store, spec_for(settings)), embedder, eval_set),
            }
    return out


def bare_row(me: list[str], model: str, device: str, docs_file: Path, batches: str) -> dict:
    b, _, rss = h.run_measured([*me, "bare", model, device, str(docs_file), batches], h.clean_env())
    best = min(b["seconds_by_batch"], key=b["seconds_by_batch"].get)
    return {**b, "best_batch": best, "seconds": b["seconds_by_batch"][best], "peak_rss_mb": rss}


def bare_line(name: str, b: dict) -> str:
    return (
        f"{name} bare encode (B={b['best_batch']}): {b['chunks']} chunks in {b['seconds']:.2f} s = "
        f"{b['chunks'] / b['seconds']:,.0f} chunks/s, {b['tokens'] / b['seconds']:,.0f} tokens/s; from token IDs: "
        f"{b['token_ids_seconds']:.2f} s = {b['tokens'] / b['token_ids_seconds']:,.0f} tokens/s"
    )


# --- the report ---------------------------------------------------------------------------------------


def support_lines(r: dict) -> list[str]:
    per_ms = 1000 / max(r["chunks"], 1)  # CPU seconds of the run -> CPU ms per chunk
    cpu = r["cpu_by_process"]
    support = {n: s for n, s in cpu.items() if n.rstrip("0123456789") in SUPPORT}
    embed = sum(s for n, s in cpu.items() if n.startswith("embed"))
    total = sum(support.values()) * per_ms
    each = ", ".join(f"{n} {s * per_ms:.3f}" for n, s in support.items())
    return [
        f"support cost: {total:.3f} CPU ms per chunk written ({each}); embedders {embed * per_ms:.3f}",
        "peak RSS MB: " + ", ".join(f"{n} {v:.0f}" for n, v in r["peak_rss_mb"].items()),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=10000, help="SciFact abstracts (default 10,000)")
    parser.add_argument("--model", type=Path, help="a static model directory (default: distil one, once)")
    parser.add_argument("--embedders", type=int, nargs="+", default=[1], help="distributed rows: embed workers")
    parser.add_argument("--pools", default="", help="workers of the other pools, e.g. load=2,chunk=4,write=2")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--scifact", type=Path, default=h.SCIFACT, help="BEIR SciFact directory")
    parser.add_argument("--set", action="append", default=[], metavar="EMBEDPIPE_X=V", help="a setting for all rows")
    parser.add_argument("--reference", default="all-MiniLM-L6-v2", help="the model to compare speed with")
    parser.add_argument("--reference-docs", type=int, default=500, help="documents for the reference's bare row")
    parser.add_argument("--baseline", metavar="REV", help="also this git revision's chunker (see the chunker row)")
    parser.add_argument(
        "--quality", action="store_true", help="also SciFact recall@10: the static model and --reference"
    )
    parser.add_argument(
        "--quality-chunk-tokens",
        type=int,
        nargs="+",
        default=[0],
        metavar="N",
        help="--quality's whole-corpus runs of the static model, one per chunk size (0: its default)",
    )
    parser.add_argument("--recovery", action="store_true", help="also the recovery of a SIGKILLed embed job")
    parser.add_argument("--only", nargs="+", choices=("chunker", "bare", "distributed"), help="only these rows")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        h.MODEL, h.DEVICE = args.child[1], args.child[2]
        fn = {
            "chunker": child_chunker,
            "chunker_baseline": child_chunker_baseline,
            "bare": child_bare,
            "quality": child_quality,
        }[args.child[0]]
        print(json.dumps(fn(*args.child[3:])))
        return
    h.MODEL, h.DEVICE = str(static_model(args.model)), args.device
    h.SETTINGS.update(kv.split("=", 1) for kv in args.set)
    pools = {k: int(v) for k, v in (p.split("=") for p in args.pools.split(",") if p)}
    wanted = set(args.only or ("chunker", "bare", "distributed"))
    results: dict = {"cpu": cpu_name(), "model": h.MODEL, "device": args.device, "documents": args.docs}
    print(f"{results['cpu']}; model {h.MODEL} on {args.device}; load average {os.getloadavg()[0]:.2f}", flush=True)
    me = [sys.executable, __file__, "--child"]
    with tempfile.TemporaryDirectory(prefix="embedpipe-fast-") as tmp_name:
        tmp = Path(tmp_name)
        docs_file = tmp / "docs.jsonl"
        h.write_docs(args.docs, docs_file, args.scifact)
        if "chunker" in wanted:
            c, _, _ = h.run_measured([*me, "chunker", h.MODEL, args.device, str(docs_file)], h.clean_env())
            results["chunker"] = c
            ratio = c["chunker_cpu_s"] / c["raw_tokenizer_cpu_s"]
            print(
                f"chunker: {c['chunker_cpu_s']:.2f} CPU s for {c['chunks']} chunks "
                f"({c['chunker_cpu_s'] * 1000 / c['chunks']:.3f} ms per chunk), the raw tokenizer "
                f"{c['raw_tokenizer_cpu_s']:.2f} s on the same texts: {ratio:.2f}x",
                flush=True,
            )
            if args.baseline:
                cmd = [*me, "chunker_baseline", args.reference, args.device, str(docs_file), args.baseline]
                c, _, _ = h.run_measured(cmd, h.clean_env())
                results["chunker_baseline"] = c
                raw_s = c["raw_tokenizer_cpu_s"]
                print(
                    f"chunker with {args.reference}'s tokenizer, {c['chunks']} chunks: this one "
                    f"{c['chunker_cpu_s']:.2f} CPU s ({c['chunker_cpu_s'] / raw_s:.2f}x the raw tokenizer's "
                    f"{raw_s:.2f} s), {args.baseline}'s {c['baseline_chunker_cpu_s']:.2f} s "
                    f"({c['baseline_chunker_cpu_s'] / raw_s:.2f}x)",
                    flush=True,
                )
        bare = None
        if "bare" in wanted or "distributed" in wanted:
            bare = results["bare"] = bare_row(me, h.MODEL, args.device, docs_file, "256,1024,4096")
            print(bare_line("this model", bare), flush=True)
            print(
                f"vectors of a {min(1024, bare['chunks'])}-chunk part, per chunk: "
                + "; ".join(
                    f"{name} {v['bytes_per_chunk']:,.0f} B, {v['cpu_us_per_chunk']:.1f} us to encode and decode"
                    for name, v in bare["vector_transport"].items()
                ),
                flush=True,
            )
        if "bare" in wanted and args.reference and args.reference != h.MODEL:
            few = tmp / "reference.jsonl"
            h.write_docs(args.reference_docs, few, args.scifact)
            batches = "16,32,64" if args.device == "cpu" else "256,1024,4096"
            ref = results["reference_bare"] = bare_row(me, args.reference, args.device, few, batches)
            print(bare_line(f"{args.reference} ({args.reference_docs} documents)", ref), flush=True)
            speedup = (bare["tokens"] / bare["seconds"]) / (ref["tokens"] / ref["seconds"])
            print(f"  this model reads {speedup:,.0f}x the tokens per second of {args.reference} (bare encode)")
        if "distributed" in wanted:
            results["distributed"] = []
            for n in args.embedders:
                (tmp / f"d{n}").mkdir()
                r = tp.bench_distributed(docs_file, tmp / f"d{n}", "torch", n, pools)
                r.pop("status", None)
                results["distributed"].append(r)
                print(
                    f"{r['mode']}: {r['chunks']} chunks in {r['seconds']:.1f} s = {r['chunks_per_s']:,.0f} chunks/s, "
                    f"{r['tokens_per_s']:,.0f} tokens/s; {r['chunks_per_s'] / (bare['chunks'] / bare['seconds']):.3f}"
                    " of bare encode",
                    flush=True,
                )
                for line in support_lines(r):
                    print("  " + line, flush=True)
                if r["chunks"] != bare["chunks"]:
                    print(f"  WARNING: {r['chunks']} chunks stored, bare encode had {bare['chunks']}")
    if args.quality:
        results["quality"] = {}
        sweep = ",".join(map(str, args.quality_chunk_tokens))
        for model, sizes in ((h.MODEL, sweep), (args.reference, "")):
            q, _, _ = h.run_measured([*me, "quality", model, args.device, str(args.scifact), sizes], h.clean_env())
            results["quality"][model] = q
            for name, r in q.items():
                print(
                    f"SciFact {name} ({r['queries']} queries), {Path(model).name}: recall@10 {r['recall@10']:.3f}, "
                    f"nDCG@10 {r['ndcg@10']:.3f} ({r['chunks']} chunks)",
                    flush=True,
                )
    if args.recovery:
        from recovery import measure_recovery, summary

        r = measure_recovery(scifact=args.scifact)
        results["recovery"] = r
        print(summary(r), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
        print(f"results: {args.out}")


if __name__ == "__main__":
    main()
