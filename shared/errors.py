"""The whole error hierarchy of embedpipe."""

from __future__ import annotations

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


class PermanentError(EmbedpipeError):
    """A failure that retrying cannot fix."""


class DocumentError(PermanentError):
    """One document cannot be processed; it becomes a dead letter, its batch goes on."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown failure reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message
