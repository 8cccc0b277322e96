"""Static embedding models: `embedpipe distill` makes one from a local sentence-transformers model.

A static model (model2vec) keeps one vector per vocabulary token, computed once by running the source
model over each token, reduced by PCA and weighted by token frequency (SIF); embedding a text is then
a lookup and a mean. It costs a fraction of a transformer forward pass (~100x on a CPU) and keeps part
of the source's quality: the CPU tier for bulk work. model2vec's `distill` works offline from the local
weights. The result is a sentence-transformers directory (a StaticEmbedding module) that
EMBEDPIPE_MODEL=DIR takes in both runtimes; its spec (weights, pooling "static", chunk size) names its
own collection.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from shared.errors import ConfigError
from shared.models import model_kind, resolve_model_path

log = logging.getLogger(__name__)

DEFAULT_DIMS = 256  # PCA dimensions of the token vectors (all-MiniLM-L6-v2 has 384)


def distill(source: str, out: Path, dims: int = DEFAULT_DIMS, force: bool = False) -> dict[str, Any]:
    """Distil a static model from `source` (a local model, offline) into the directory `out`;
    dims = 0 keeps the source's dimensions (no PCA). Returns what was made."""
    started = time.perf_counter()
    path = resolve_model_path(source)
    if model_kind(path) == "static":
        raise ConfigError(f"{source} is already a static model: distil from a transformer model")
    taken = any(out.iterdir()) if out.is_dir() else out.exists()
    if taken and not force:
        raise ConfigError(f"{out} exists and is not empty: choose another --out or pass --force")
    if dims < 0:
        raise ConfigError(f"--dims must be 0 (the source's dimensions) or positive, got {dims}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never a download: the source is on disk
    try:
        from model2vec.distill import distill as model2vec_distill
    except ImportError as e:
        raise ConfigError(f"distilling needs model2vec and its tokenizer tools ({e}): pip install -e .") from e
    hidden = _hidden_size(path)
    if hidden and dims > hidden:
        raise ConfigError(f"--dims {dims} is more than the {hidden} dimensions of {source}")
    model = model2vec_distill(model_name=str(path), pca_dims=dims or None, device="cpu")
    # Write beside the target, then move it into place: an interrupted run leaves no half a model.
    staging = out.with_name(f".{out.name}.distilling-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    model_kind(staging)  # the result must read as a complete static model
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    staging.rename(out)
    summary = {
        "model": str(out),
        "from": source,
        "dimensions": int(model.dim),
        "vocabulary": len(model.tokens),
        "seconds": round(time.perf_counter() - started, 1),
    }
    log.info(
        "distilled %s into %s: %d dimensions, %d tokens", source, out, summary["dimensions"], summary["vocabulary"]
    )
    return summary


def _hidden_size(path: Path) -> int:
    config = path / "config.json"
    try:
        return int(json.loads(config.read_text()).get("hidden_size", 0)) if config.is_file() else 0
    except (ValueError, TypeError):
        return 0
