"""Search a store (`embedpipe search`, `embedpipe.search`): the query embedded as the collection was (same
model, dimensions, prefix), the k closest chunks, optionally only those whose metadata has given values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from producer.lifecycle import embedder_for
from shared.errors import ConfigError
from shared.settings import Settings
from shared.store import open_store
from shared.store_types import Hit


def search(
    settings: Settings, query: str, k: int = 5, where: Mapping[str, Any] | None = None, collection: str | None = None
) -> list[Hit]:
    """The `k` chunks closest to `query` in the active collection (or `collection`), best first; with
    `where`, only chunks whose document metadata has every one of those fields with exactly that value."""
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if "://" not in settings.store and not settings.store_path.is_dir():
        raise ConfigError(f"no store at {settings.store_path}: run `embedpipe run PATH` first")
    store = open_store(settings.store, collection=collection, settings=settings)
    try:
        embedder = embedder_for(store, settings).warm_up()
        assert store.spec is not None  # embedder_for refuses a store without a collection
        vector = embedder.embed([store.spec.query_prefix + query])[0]
        return store.search(vector, k, where)
    finally:
        store.close()
