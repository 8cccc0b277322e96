"""The Tokenizer seam: what the chunker, the embedder and the cost planner need of a tokenizer, and the
one factory that picks it (the model's own Hugging Face tokenizer, or tiktoken for API models)."""

from __future__ import annotations

from typing import Protocol

from shared.models import ModelTokenizer, TokenizerInfo, Tokens, is_api_model
from shared.tokenizer_api import ApiTokenizer


class Tokenizer(Protocol):
    info: TokenizerInfo
    ids_are_model_inputs: bool  # True: the model reads these IDs; False: it reads the text (an API)

    def encode_batch(self, texts: list[str]) -> list[Tokens]: ...
    def offsets(self, text: str) -> list[tuple[int, int]]: ...
    def count(self, texts: list[str]) -> list[int]: ...


def load_tokenizer(model: str, api_max_input_tokens: int = 8192) -> Tokenizer:
    """The tokenizer that counts tokens as the model does: its own for local models, tiktoken for API
    models (whose inputs may hold up to api_max_input_tokens)."""
    if is_api_model(model):
        return ApiTokenizer(model, api_max_input_tokens)
    return ModelTokenizer(model)
