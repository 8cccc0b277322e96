"""Loading a sentence-transformers model in torch, and the checks that keep a faster backend honest
(bf16 here, ONNX in workers/embed_onnx.py): its vectors must match torch float32's on fixed texts.
torch and sentence-transformers are imported when a model loads, never at import (they take seconds)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import ConfigError

log = logging.getLogger(__name__)

# Backends that change the arithmetic (bf16, ONNX) are checked when they load: their vectors must match
# torch float32's on these texts (cosine), else the backend is refused.
MIN_COSINE = 0.99
CHECK_TEXTS = (
    "Green tea is steeped at 80 °C for two minutes.",
    "How do client and server agree on a secret key over an open network?",
    " ".join(["The mitochondria regulate apoptosis through the release of cytochrome c."] * 20),
)


def load_sentence_transformer(path: Path, device: str, bf16: bool = False) -> Any:
    """The model on `device`; on CUDA with fp16 weights (bf16 if asked)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the CLI shows its own progress
    try:
        model = SentenceTransformer(str(path), device=device, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # an incomplete or foreign directory
        raise ConfigError(f"cannot load the model at {path}: {type(e).__name__}: {str(e)[:300]}") from e
    if device.startswith("cuda"):
        model.to(torch.bfloat16 if bf16 else torch.float16)
    else:
        model.float()  # model2vec saves float16 vectors: float32 on the CPU (faster, and the mean exact)
    dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    model.dimension = int(dimension() or 0)
    return model


def native_bf16() -> list[str]:
    """The CPU's native bfloat16 features torch knows of (AVX512_BF16, AMX); empty if none."""
    import torch

    return [f for f in ("avx512_bf16", "amx_tile") if getattr(torch.cpu, f"_is_{f}_supported", lambda: False)()]


def cpu_bf16(model: Any) -> Callable[[], AbstractContextManager[Any]]:
    """The context for bf16 forward passes on the CPU: autocast runs the matmuls in bfloat16 (float32
    accumulation) and keeps layer norms, softmax and pooling in float32, with the float32 weights. Fast
    only where the CPU multiplies bf16 natively (AVX512_BF16 or AMX); refused if its vectors drift below
    MIN_COSINE from float32's on CHECK_TEXTS."""
    import torch

    native = native_bf16()
    if not native:
        log.warning("this CPU has no native bfloat16 (AVX512_BF16, AMX): torch-bf16 is likely slower than torch")

    def autocast() -> AbstractContextManager[Any]:
        return torch.autocast("cpu", dtype=torch.bfloat16)

    texts = list(CHECK_TEXTS)
    want = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    with autocast():
        got = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    cosine = float((want * np.asarray(got, dtype=np.float32)).sum(axis=1).min())
    if cosine < MIN_COSINE:
        raise ConfigError(f"bf16 vectors differ from float32 (cosine {cosine:.4f}); use backend torch")
    log.info("bf16 on the CPU (%s): min cosine to float32 %.5f", ", ".join(native) or "emulated", cosine)
    return autocast
