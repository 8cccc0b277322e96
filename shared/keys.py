"""Every Redis key embedpipe uses, in one place, per pipeline: a `Keyspace` is the keys of one namespace
(EMBEDPIPE_NAMESPACE, `Settings.keys`). The default namespace ('') keeps the names embedpipe always had
(embedpipe:inbox, ...); namespace N puts its keys under embedpipe:ns:N: (so no key of the default
namespace has `ns` as its second part). rq's own keys (rq:queue:<name>, ...) are rq's: the namespace is
in the queue names (shared/queues.py). Two keys are shared by every namespace on purpose: the embedding
cache (content-addressed under the embedding spec: any pipeline would compute the same vector) and an
API account's rate budget (the account's limit is the same whoever spends it)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.errors import ConfigError

PREFIX = "embedpipe"
NAMESPACE_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")  # fits a key, a queue name and an rq job ID


def check_namespace(namespace: str) -> str:
    if namespace and not NAMESPACE_PATTERN.fullmatch(namespace):
        raise ConfigError(
            f"EMBEDPIPE_NAMESPACE={namespace!r}: use 1 to 32 lowercase letters, digits and hyphens ('' = the default)"
        )
    return namespace


@dataclass(frozen=True)
class Keyspace:
    """The keys of one pipeline (one namespace) on a Redis shared with others."""

    namespace: str = ""

    @property
    def prefix(self) -> str:
        return f"{PREFIX}:ns:{self.namespace}" if self.namespace else PREFIX

    @property
    def INBOX(self) -> str:
        """List: JSON or msgpack documents pushed by any client"""
        return f"{self.prefix}:inbox"

    @property
    def INBOX_TAKERS(self) -> str:
        """Set: IDs of janitors that may hold a batch taken from the inbox"""
        return f"{self.prefix}:inbox:takers"

    @property
    def JANITOR_TICK(self) -> str:
        """When a janitor last finished a round with every step done (s)"""
        return f"{self.prefix}:janitor:tick"

    @property
    def DEAD(self) -> str:
        """Hash: doc_id -> msgpack DeadLetter"""
        return f"{self.prefix}:dead"

    @property
    def DEAD_RECENT(self) -> str:
        """Sorted set: doc_id by time, the newest few (for the dashboard)"""
        return f"{self.prefix}:dead:recent"

    @property
    def DEAD_BY_TIME(self) -> str:
        """Sorted set: every dead letter's doc_id by time, to expire the oldest"""
        return f"{self.prefix}:dead:at"

    @property
    def PROBE(self) -> str:
        """Hash: the last quality probe's results"""
        return f"{self.prefix}:probe"

    @property
    def PROBE_REQUESTED(self) -> str:
        """Chunks_written of the last state a probe was requested for"""
        return f"{self.prefix}:probe:requested"

    @property
    def DEAD_ATTEMPTS(self) -> str:
        """Hash: doc_id -> how many times it failed for good"""
        return f"{self.prefix}:dead:attempts"

    @property
    def COUNTERS(self) -> str:
        """Hash: documents_done, chunks_written, ..."""
        return f"{self.prefix}:counters"

    def lane_counters(self, lane: str) -> str:
        """Hash: documents_done, chunks_written, documents_skipped of one lane (one model of several)."""
        return f"{self.prefix}:counters:{lane}"

    def batch_backfill(self, batch_id: str) -> str:
        """The collection a backfill batch's texts were read from (`reembed --enqueue`): the chunker drops
        a document that collection no longer holds with that text (edited since: its newer copy wins)."""
        return f"{self.prefix}:backfill:{batch_id}"

    def batch_lanes(self, batch_id: str) -> str:
        """set of the lanes a batch fans out to (several models), written by its chunk job."""
        return f"{self.prefix}:lanes:{batch_id}"

    def lanes_finalized(self, batch_id: str) -> str:
        """hash lane -> msgpack outcome of that lane's share of the batch, until the last lane joins them."""
        return f"{self.prefix}:lanesfinal:{batch_id}"

    def inbox_taken(self, janitor_id: str) -> str:
        """list: the inbox messages a janitor took and has not enqueued yet (workers/inbox.py)."""
        return f"{self.prefix}:inbox:taken:{janitor_id}"

    def janitor_alive(self, janitor_id: str) -> str:
        """set with a short TTL while that janitor runs: when it is gone, its taken batch goes back."""
        return f"{self.prefix}:janitor:alive:{janitor_id}"

    def dead_source(self, doc_id: str) -> str:
        """msgpack SourceDoc dict of a dead letter, for redrive; expires on its own schedule."""
        return f"{self.prefix}:dead:src:{doc_id}"

    def parts_failed(self, batch_id: str) -> str:
        """set of part numbers whose embed or write job failed for good."""
        return f"{self.prefix}:failedparts:{batch_id}"

    def docs_failed(self, batch_id: str) -> str:
        """set of IDs of documents of the batch whose text the model or API refused (dead letters)."""
        return f"{self.prefix}:faileddocs:{batch_id}"

    def docs_committed(self, batch_id: str) -> str:
        """set of IDs of documents of the batch written whole by one write job (records included)."""
        return f"{self.prefix}:committed:{batch_id}"

    def kept_ids(self, token: str) -> str:
        """msgpack PruneRequest of a sync (`enqueue --prune`): the claim check of a prune job."""
        return f"{self.prefix}:kept:{token}"

    def kept_set(self, token: str) -> str:
        """set of the document IDs a sync keeps, written by the client in slices and asked about the store's
        IDs a slice at a time by the prune job: neither side sends or holds millions of IDs in one piece."""
        return f"{self.prefix}:keptset:{token}"

    def batch_doc_ids(self, batch_id: str) -> str:
        """msgpack list of a batch's document IDs, kept as long as dead letters keep sources: if the batch's
        payloads expire before it completes, its documents still become dead letters, one each."""
        return f"{self.prefix}:batchids:{batch_id}"

    def sources(self, batch_id: str) -> str:
        """msgpack list of submitted SourceDoc dicts (claim check of a load job)."""
        return f"{self.prefix}:sources:{batch_id}"

    def documents(self, batch_id: str) -> str:
        """msgpack list of loaded Documents (claim check of a chunk job)."""
        return f"{self.prefix}:docs:{batch_id}"

    def chunks(self, batch_id: str, part: int) -> str:
        """msgpack list of Chunks of one embed part."""
        return f"{self.prefix}:chunks:{batch_id}:{part}"

    def vectors(self, batch_id: str, part: int) -> str:
        """float32 bytes, row-major, one row per chunk of the part."""
        return f"{self.prefix}:vecs:{batch_id}:{part}"

    def batch_plan(self, batch_id: str) -> str:
        """hash (messages.BatchPlan): parts -> number of embed parts; spec -> the embedding spec's
        fingerprint; chunks -> msgpack map of each document's chunk IDs."""
        return f"{self.prefix}:plan:{batch_id}"

    def parts_written(self, batch_id: str) -> str:
        """set of part numbers the writer has stored."""
        return f"{self.prefix}:written:{batch_id}"

    def batch_finalized(self, batch_id: str) -> str:
        """set once (SET NX) by the writer that finalizes the batch, so documents are counted once."""
        return f"{self.prefix}:final:{batch_id}"

    def batch_payload_keys(self, batch_id: str) -> list[str]:
        """The keys a batch's lanes share: its sources, document IDs and documents, and its lanes' records."""
        return [
            self.sources(batch_id),
            self.batch_doc_ids(batch_id),
            self.documents(batch_id),
            self.batch_backfill(batch_id),
            self.batch_lanes(batch_id),
            self.lanes_finalized(batch_id),
        ]

    def lane_keys(self, batch_id: str, parts: int) -> list[str]:
        """The keys of one lane's share of a batch (or of the whole batch, with one model)."""
        keys = [
            self.batch_plan(batch_id),
            self.parts_written(batch_id),
            self.parts_failed(batch_id),
            self.docs_failed(batch_id),
            self.docs_committed(batch_id),
        ]
        for p in range(parts):
            keys += [self.chunks(batch_id, p), self.vectors(batch_id, p)]
        return keys

    def batch_keys(self, batch_id: str, parts: int) -> list[str]:
        """All claim-check keys of a batch of a one-model deployment, deleted once it is finalized."""
        return [*self.batch_payload_keys(batch_id), *self.lane_keys(batch_id, parts)]


# Shared by every namespace (see the module docstring).


def vector_cache(text_key: str) -> str:
    """float32 bytes: the embedding cache's vector of one text under one spec (shared/cache.py)."""
    return f"{PREFIX}:vcache:{text_key}"


def rate_budget(host: str, model: str) -> str:
    """hash (req_tat, tok_tat, hold): one API account's rate budget, shared by every embedder (shared/ratelimit.py)."""
    return f"{PREFIX}:ratelimit:{host}:{model}"


DEFAULT = Keyspace()  # the default namespace's keys: what a deployment without EMBEDPIPE_NAMESPACE uses
