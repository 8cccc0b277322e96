"""What the pipeline is doing: per-stage job counts, workers, documents done and failed.

The distributed state is read from Redis by shared/queues.py (the janitor exports it too); the embedded
mode's from the ledger beside its store. The light client: no workers, numpy or torch are imported here.
"""

from __future__ import annotations

from typing import Any

from shared.ledger import Ledger
from shared.queues import distributed_status, inbox_held, is_idle

__all__ = ["distributed_status", "inbox_held", "is_idle", "local_status"]


def local_status(ledger: Ledger, chunks_stored: int) -> dict[str, Any]:
    counters = ledger.counters()
    return {
        "mode": "embedded",
        "documents_done": counters.get("documents_done", 0),
        "documents_failed": ledger.dead_count(),
        "chunks_written": counters.get("chunks_written", 0),
        "chunks_stored": chunks_stored,
        "probe": ledger.last_probe(),
    }
