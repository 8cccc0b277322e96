"""embedpipe from Python: one import for what the `embedpipe` command does.

    import embedpipe

    summary = embedpipe.run("examples/", store="./my-store")          # embed, in this process
    for hit in embedpipe.search("a question", k=3, store="./my-store"):
        print(hit.score, hit.doc_id, hit.text[:80])
    handle = embedpipe.submit(["docs/"], redis_url="redis://localhost:6379/0")   # the distributed pipeline
    handle.wait(timeout=600)

Keyword settings are those of `Settings` (model="...", store="...", chunk_tokens=..., ...): each one
overrides its EMBEDPIPE_* environment variable, which overrides the default. A `settings=` object
replaces the environment as the base. Sources are paths (files, directories, globs), http(s) URLs,
`SourceDoc`s or dicts like {"id": ..., "text": ..., "metadata": {...}}.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from producer import client
from producer.search import search as _search
from producer.sources import iter_sources, resolve
from shared.errors import ConfigError, EmbedpipeError
from shared.lanes import one_model
from shared.messages import DeadLetter, SourceDoc
from shared.settings import Settings
from shared.store_types import Hit
from workers.embedded import RunSummary, run_embedded

__all__ = [
    "ConfigError",
    "EmbedpipeError",
    "Handle",
    "Hit",
    "RunSummary",
    "Settings",
    "SourceDoc",
    "run",
    "search",
    "submit",
]

Source = str | os.PathLike[str] | SourceDoc | Mapping[str, Any]


def settings_of(settings: Settings | None = None, **overrides: Any) -> Settings:
    """The settings a call runs with: `settings` (else the environment) with `overrides` applied."""
    if settings is None:
        return Settings.from_env(**overrides)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    return dataclasses.replace(settings, **overrides).validated()


def run(
    sources: Source | Iterable[Source],
    *,
    exclude: Iterable[str] = (),
    settings: Settings | None = None,
    **overrides: Any,
) -> RunSummary:
    """Embed `sources` into the local store (settings.store) in this process, no Redis: unchanged
    documents skipped, cached chunks not embedded again. Failed documents are counted in the summary
    and kept as dead letters beside the store (`embedpipe failed`)."""
    chosen = settings_of(settings, **overrides)
    one_model(chosen, "embedpipe.run")
    return run_embedded(chosen, _items(sources, chosen, tuple(exclude)))


def search(
    query: str,
    k: int = 5,
    where: Mapping[str, Any] | None = None,
    *,
    collection: str | None = None,
    settings: Settings | None = None,
    **overrides: Any,
) -> list[Hit]:
    """The `k` chunks closest to `query`, best first (doc_id, chunk_id, index, score, text, metadata);
    with `where`, only chunks of documents whose metadata has each of those fields with that value."""
    return _search(settings_of(settings, **overrides), query, k, where, collection)


@dataclass
class Handle:
    """Documents submitted to the distributed pipeline: their batches, and a way to wait for them."""

    batch_ids: list[str]
    documents: int
    rejected: list[DeadLetter]  # refused before submitting (unreadable files, malformed JSONL lines)
    settings: Settings

    def wait(self, timeout: float = 0) -> bool:
        """Block until every batch is settled (stored, or its documents dead letters); False if
        `timeout` seconds (0: never) passed first."""
        return client.wait_for_batches(client.connect(self.settings), self.settings, self.batch_ids, timeout)


def submit(
    sources: Source | Iterable[Source],
    *,
    exclude: Iterable[str] = (),
    settings: Settings | None = None,
    **overrides: Any,
) -> Handle:
    """Enqueue `sources` for the distributed pipeline's workers (settings.redis_url) and return at once."""
    chosen = settings_of(settings, **overrides)
    result = client.submit(client.connect(chosen), chosen, _items(sources, chosen, tuple(exclude)))
    return Handle(result.batch_ids, result.documents, result.rejected_letters, chosen)


def _items(sources: Source | Iterable[Source], settings: Settings, exclude: tuple[str, ...]) -> Iterator[Any]:
    if isinstance(sources, str | os.PathLike | SourceDoc | Mapping):
        sources = [sources]
    paths: list[str] = []
    for source in sources:
        if isinstance(source, SourceDoc):
            yield source
        elif isinstance(source, Mapping):
            yield SourceDoc.from_dict(dict(source))
        elif isinstance(source, str | os.PathLike):
            paths.append(os.fspath(source))
        else:
            raise ConfigError(f"a source is a path, a URL, a SourceDoc or a dict, not {type(source).__name__}")
    if paths:
        yield from iter_sources(resolve(paths, exclude, settings.id_prefix), settings.max_doc_bytes)
