"""The whole error hierarchy of embedpipe."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for annotations only: the light client imports this module without numpy
    import numpy as np
    import numpy.typing as npt

    Vectors = npt.NDArray[np.float32]

# The closed set of reasons a document can fail with. Metrics and dead letters use only these.
REASONS = (
    "decode_error",  # bytes that are not text in any encoding we accept, or a bad message
    "empty",  # nothing left after cleaning
    "too_large",  # over the configured size limit
    "unsupported_type",  # a file type we do not read (binary, images, ...)
    "source_error",  # a URL that cannot be fetched
    "model_error",  # the model failed on this document's text
    "store_error",  # the store refused this document's chunks
    "job_failed",  # the job carrying the document failed for good
)


class EmbedpipeError(Exception):
    """Base class of every error embedpipe raises on purpose."""


class ConfigError(EmbedpipeError):
    """A setting is missing or invalid; the message says which and how to fix it."""


class DecodeError(EmbedpipeError):
    """A message or payload read from Redis or a file could not be decoded."""


class RetryableError(EmbedpipeError):
    """A transient failure: the job may succeed if it runs again."""


class RateLimited(RetryableError):
    """The API's rate limit (or its quota) holds longer than a job should wait: the job is rescheduled
    `retry_in_s` later without spending one of its retries (a rate limit delays work, never fails it).
    `vectors` and `done` carry what was embedded before it (those rows are kept, not paid twice)."""

    def __init__(
        self,
        message: str,
        retry_in_s: float,
        quota: bool = False,
        vectors: Vectors | dict[int, Vectors] | None = None,  # all rows, or those that came back by row
        done: Iterable[int] = (),
    ) -> None:
        super().__init__(message)
        self.retry_in_s, self.quota, self.vectors, self.done = retry_in_s, quota, vectors, set(done)


class PermanentError(EmbedpipeError):
    """A failure that retrying cannot fix."""


class PruneRefused(PermanentError):
    """A sync would delete more of a collection than the prune guard allows (or everything)."""


class DocumentError(PermanentError):
    """One document cannot be processed; it becomes a dead letter, its batch goes on."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown failure reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message


class EmbedFailures(EmbedpipeError):
    """The embedder could not embed some chunks of a part for good (a text the model still runs out of
    memory on, an input the API refuses with a 400); every other chunk has its vector. The caller
    (workers/embed.py, workers/embedded.py) makes dead letters (reason model_error) of the documents of
    the failed chunks and goes on with the rest.

    `vectors` has one row per chunk of the part (rows of failed chunks are zeros); `failed` maps the
    row index of each failed chunk to a message (the API's message, say; never a secret)."""

    def __init__(self, vectors: Vectors, failed: dict[int, str]) -> None:
        super().__init__(f"{len(failed)} chunk(s) could not be embedded")
        self.vectors = vectors
        self.failed = failed
