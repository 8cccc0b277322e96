"""The Embedder seam: what the embed stage, the embedded runner, search, the probe and the model
comparison need of a model. Two kinds implement it: a local sentence-transformers model
(workers/embedder.py) and a model behind an OpenAI-compatible API (workers/embed_api.py);
workers.embed.make_embedder picks one from the settings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from shared.messages import Chunk

if TYPE_CHECKING:  # for annotations only: the light client imports this module without numpy
    import numpy as np
    import numpy.typing as npt


class Embedder(Protocol):
    dimension: int  # of the vectors it returns; 0 until known (an API model learns it from its first answer)

    @property
    def ready(self) -> bool:
        """The model is loaded (or the API client made): embedding will not pay for a warm-up."""
        ...

    def warm_up(self) -> Embedder:
        """Load the model once (idempotent); embedding before this fails loudly."""
        ...

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """One normalised vector per text, in order (queries, evaluation sets)."""
        ...

    def embed_chunks(self, chunks: list[Chunk], prefix: str = "") -> npt.NDArray[np.float32]:
        """One vector per chunk (of prefix + its text), in chunk order. Raises EmbedFailures with the
        vectors of every other chunk when some chunks cannot be embedded for good."""
        ...
