"""Every Redis key embedpipe uses, in one place. rq's own keys (rq:queue:<stage>, ...) are rq's."""

PREFIX = "embedpipe"

INBOX = f"{PREFIX}:inbox"  # list: JSON or msgpack documents pushed by any client
INBOX_TAKERS = f"{PREFIX}:inbox:takers"  # set: IDs of janitors that may hold a batch taken from the inbox
JANITOR_TICK = f"{PREFIX}:janitor:tick"  # when a janitor last finished a round with every step done (s)
DEAD = f"{PREFIX}:dead"  # hash: doc_id -> msgpack DeadLetter
DEAD_RECENT = f"{PREFIX}:dead:recent"  # sorted set: doc_id by time, the newest few (for the dashboard)
DEAD_BY_TIME = f"{PREFIX}:dead:at"  # sorted set: every dead letter's doc_id by time, to expire the oldest
PROBE = f"{PREFIX}:probe"  # hash: the last quality probe's results
PROBE_REQUESTED = f"{PREFIX}:probe:requested"  # chunks_written of the last state a probe was requested for
DEAD_ATTEMPTS = f"{PREFIX}:dead:attempts"  # hash: doc_id -> how many times it failed for good
COUNTERS = f"{PREFIX}:counters"  # hash: documents_done, chunks_written, ...


def inbox_taken(janitor_id: str) -> str:
    """list: the inbox messages a janitor took and has not enqueued yet (workers/inbox.py)."""
    return f"{PREFIX}:inbox:taken:{janitor_id}"


def janitor_alive(janitor_id: str) -> str:
    """set with a short TTL while that janitor runs: when it is gone, its taken batch goes back."""
    return f"{PREFIX}:janitor:alive:{janitor_id}"


def dead_source(doc_id: str) -> str:
    """msgpack SourceDoc dict of a dead letter, for redrive; expires on its own schedule."""
    return f"{PREFIX}:dead:src:{doc_id}"


def parts_failed(batch_id: str) -> str:
    """set of part numbers whose embed or write job failed for good."""
    return f"{PREFIX}:failedparts:{batch_id}"


def docs_failed(batch_id: str) -> str:
    """set of IDs of documents of the batch whose text the model or API refused (dead letters)."""
    return f"{PREFIX}:faileddocs:{batch_id}"


def docs_committed(batch_id: str) -> str:
    """set of IDs of documents of the batch written whole by one write job (records included)."""
    return f"{PREFIX}:committed:{batch_id}"


def vector_cache(text_key: str) -> str:
    """float32 bytes: the embedding cache's vector of one text under one spec (shared/cache.py)."""
    return f"{PREFIX}:vcache:{text_key}"


def rate_budget(host: str, model: str) -> str:
    """hash (req_tat, tok_tat, hold): one API account's rate budget, shared by every embedder (shared/ratelimit.py)."""
    return f"{PREFIX}:ratelimit:{host}:{model}"


def kept_ids(token: str) -> str:
    """msgpack list of the document IDs a sync (`enqueue --prune`) keeps; claim check of a prune job."""
    return f"{PREFIX}:kept:{token}"


def batch_doc_ids(batch_id: str) -> str:
    """msgpack list of a batch's document IDs, kept as long as dead letters keep sources: if the batch's
    payloads expire before it completes, its documents still become dead letters, one each."""
    return f"{PREFIX}:batchids:{batch_id}"


def sources(batch_id: str) -> str:
    """msgpack list of submitted SourceDoc dicts (claim check of a load job)."""
    return f"{PREFIX}:sources:{batch_id}"


def documents(batch_id: str) -> str:
    """msgpack list of loaded Documents (claim check of a chunk job)."""
    return f"{PREFIX}:docs:{batch_id}"


def chunks(batch_id: str, part: int) -> str:
    """msgpack list of Chunks of one embed part."""
    return f"{PREFIX}:chunks:{batch_id}:{part}"


def vectors(batch_id: str, part: int) -> str:
    """float32 bytes, row-major, one row per chunk of the part."""
    return f"{PREFIX}:vecs:{batch_id}:{part}"


def batch_plan(batch_id: str) -> str:
    """hash (messages.BatchPlan): parts -> number of embed parts; spec -> the embedding spec's
    fingerprint; chunks -> msgpack map of each document's chunk IDs."""
    return f"{PREFIX}:plan:{batch_id}"


def parts_written(batch_id: str) -> str:
    """set of part numbers the writer has stored."""
    return f"{PREFIX}:written:{batch_id}"


def batch_finalized(batch_id: str) -> str:
    """set once (SET NX) by the writer that finalizes the batch, so documents are counted once."""
    return f"{PREFIX}:final:{batch_id}"


def batch_keys(batch_id: str, parts: int) -> list[str]:
    """All claim-check keys of a batch, deleted once the batch is finalized."""
    keys = [
        sources(batch_id),
        batch_doc_ids(batch_id),
        documents(batch_id),
        batch_plan(batch_id),
        parts_written(batch_id),
        parts_failed(batch_id),
        docs_failed(batch_id),
        docs_committed(batch_id),
    ]
    for p in range(parts):
        keys += [chunks(batch_id, p), vectors(batch_id, p)]
    return keys
