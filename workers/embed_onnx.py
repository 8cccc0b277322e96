"""The ONNX Runtime backends of the local embedder (EMBEDPIPE_BACKEND=onnx, onnx-int8; CPU only).

The model is exported from the local weights once (no download), cached under the embedder's
cache_dir by a hash of the model files and the variant, and refused if its vectors drift below
MIN_COSINE from torch's on fixed texts.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from shared.errors import ConfigError
from workers.model_load import CHECK_TEXTS, MIN_COSINE, load_sentence_transformer

log = logging.getLogger(__name__)

ONNX_FORMAT = "2"  # part of the cache key: bump when the export changes


class OnnxModel:
    """A Transformer + Pooling (mean or CLS) [+ Normalize] sentence-transformers model, run by ONNX
    Runtime on the CPU. sentence-transformers' own ONNX backend needs optimum-onnx, which requires
    transformers < 4.58 (a downgrade here); this needs only onnxruntime and onnx (the `onnx` extra).

    `load()` exports the model once from the local weights (torch.onnx), optionally int8-quantised
    (dynamic, per-channel, 7-bit weights: safe on CPUs without VNNI), checks it against torch's
    vectors (cosine >= MIN_COSINE) and caches it in cache_dir under a hash of the model's files
    and the variant; later starts load the file without importing sentence-transformers."""

    def __init__(self, model_dir: Path, file: Path, threads: int) -> None:
        import onnxruntime as ort

        self.pooling, self.normalize, transformer_dir = _onnx_compatible(model_dir)
        config = json.loads((model_dir / "sentence_bert_config.json").read_text())
        self.file = file
        self.tokenizer = Tokenizer.from_file(str(transformer_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(int(config.get("max_seq_length", 512)))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # No spinning: idle ORT threads would burn the CPU that the chunker and writer need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.dimension = int(self.session.get_outputs()[0].shape[-1])

    @classmethod
    def load(cls, model_dir: Path, quantized: bool, threads: int, cache_dir: Path) -> OnnxModel:
        return cls(model_dir, export_onnx(model_dir, quantized, cache_dir), threads)

    def encode(self, texts: list[str], normalize_embeddings: bool = True, **_: Any) -> np.ndarray:
        return self.encode_ids([e.ids for e in self.tokenizer.encode_batch(texts)], normalize_embeddings)

    def encode_ids(self, rows: list[Any], normalize_embeddings: bool = True) -> np.ndarray:
        """Vectors of token-ID rows (special tokens included), padded into one batch."""
        ids = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, r in enumerate(rows):
            ids[row, : len(r)] = r
            mask[row, : len(r)] = 1
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]
        if self.pooling == "cls":
            vectors = hidden[:, 0]
        else:
            vectors = (hidden * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        if normalize_embeddings or self.normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(vectors, dtype=np.float32)


def _onnx_compatible(model_dir: Path) -> tuple[str, bool, Path]:
    """(pooling, normalize, transformer directory) of a model the ONNX backends can run, else ConfigError."""
    modules = json.loads((model_dir / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise ConfigError(f"the ONNX backends run Transformer + Pooling [+ Normalize] models; {model_dir} has {kinds}")
    pooling = json.loads((model_dir / modules[1]["path"] / "config.json").read_text())
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
    if modes not in (["pooling_mode_mean_tokens"], ["pooling_mode_cls_token"]):
        raise ConfigError(f"the ONNX backends support mean or CLS pooling; {model_dir} uses {modes}")
    return ("cls" if modes == ["pooling_mode_cls_token"] else "mean"), len(kinds) == 3, model_dir / modules[0]["path"]


def export_onnx(model_dir: Path, quantized: bool, cache_dir: Path) -> Path:
    """The cached ONNX file of this model (int8 if `quantized`), exported and checked first if missing.
    The key hashes the model's files, so a changed model gets a fresh export; concurrent exporters
    each write a temporary directory of their own and the first rename wins."""
    digest = hashlib.blake2b(f"{ONNX_FORMAT}:{'int8' if quantized else 'fp32'}".encode(), digest_size=16)
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file() and p.suffix != ".md"):
        digest.update(str(f.relative_to(model_dir)).encode())
        with f.open("rb") as data:
            while block := data.read(1 << 20):
                digest.update(block)
    target = cache_dir / digest.hexdigest()
    if (target / "model.onnx").is_file():
        return target / "model.onnx"
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".export-") as tmp:
        work = Path(tmp) / "model"
        work.mkdir()
        cosine = _export(model_dir, quantized, work)
        meta = {"model": str(model_dir), "int8": quantized, "min_cosine_to_torch": round(cosine, 5)}
        (work / "meta.json").write_text(json.dumps(meta))
        try:
            work.rename(target)
        except OSError:  # another process exported it first
            if not (target / "model.onnx").is_file():
                raise
    log.info("exported %s to %s in %.1f s: %s", model_dir.name, target, time.perf_counter() - started, meta)
    return target / "model.onnx"


def _export(model_dir: Path, quantized: bool, work: Path) -> float:
    """Export (and quantise) into work/model.onnx; return the smallest cosine to torch's vectors on
    CHECK_TEXTS (ConfigError if below MIN_COSINE)."""
    import torch

    st = load_sentence_transformer(model_dir, "cpu")
    hf = st[0].auto_model.eval()
    tokenize = getattr(st, "preprocess", None) or st.tokenize  # renamed in sentence-transformers 6
    sample = tokenize(["an example", "a slightly longer example text"])
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in sample]
    names = [n for n in names if n in inspect.signature(hf.forward).parameters]

    class Hidden(torch.nn.Module):  # positional inputs for the exporter; the last hidden state out
        def __init__(self) -> None:
            super().__init__()
            self.model = hf

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(names, inputs, strict=True))).last_hidden_state

    fp32 = work / ("fp32.onnx" if quantized else "model.onnx")
    dynamic = {n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on Python control flow: harmless here
        torch.onnx.export(
            Hidden(),
            tuple(sample[n] for n in names),
            str(fp32),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes=dynamic,
            opset_version=17,
            dynamo=False,
        )
    if quantized:
        _quantize(fp32, work / "model.onnx")
        fp32.unlink()
    texts = list(CHECK_TEXTS)
    want = st.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    got = OnnxModel(model_dir, work / "model.onnx", threads=1).encode(texts)
    cosine = float((want * got).sum(axis=1).min())
    if cosine < MIN_COSINE:
        raise ConfigError(f"the ONNX export of {model_dir} differs from torch (cosine {cosine:.4f}); use backend torch")
    return cosine


def _quantize(fp32: Path, out: Path) -> None:
    """Dynamic int8: weights per channel in 7 bits (reduce_range: no saturation on AVX2 CPUs without
    VNNI), activations per tensor at run time, only MatMuls with a constant weight. The FFN's
    down-projections (weights with more rows than columns: 1536 x 384 in MiniLM) stay float: their
    inputs have the outliers that int8 activations clip. Measured on the sample corpus: min cosine to
    torch 0.994 with them float, 0.983-0.988 with everything quantised, for ~10% of the speed-up."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(fp32), load_external_data=False).graph
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    down = [
        n.name
        for n in graph.node
        if n.op_type == "MatMul" and len(d := shapes.get(n.input[1], ())) == 2 and d[0] > d[1]
    ]
    quantize_dynamic(
        str(fp32),
        str(out),
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=True,
        nodes_to_exclude=down,
        extra_options={"MatMulConstBOnly": True},
    )
