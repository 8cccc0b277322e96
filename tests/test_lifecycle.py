"""Promotion (producer/lifecycle.py) with plain lists of collections: search switches to a collection
only when it is complete and its quality probe is no worse than the active one's beyond the tolerance."""

from __future__ import annotations

import pytest

from producer.lifecycle import promotion
from shared.errors import ConfigError


def collection(name: str, documents: int, recall: float | None, active: bool = False, eval_dir: str = "e") -> dict:
    probe = {"recall_at_10": recall, "eval": eval_dir} if recall is not None else None
    return {"name": name, "active": active, "documents": documents, "probe": probe}


def test_a_complete_collection_no_worse_on_the_probe_is_promoted():
    rows = [collection("old", 100, 0.80, active=True), collection("new", 100, 0.79)]
    decision = promotion(rows, "new", tolerance=0.02)
    assert decision.allowed and "0.800 -> 0.790" in decision.message


@pytest.mark.parametrize(
    ("new", "complaint"),
    [
        (collection("new", 99, 0.95), "not complete"),  # fewer documents: the re-embed did not finish
        (collection("new", 100, 0.77), "a drop of 0.030"),  # worse by more than the tolerance
        (collection("new", 100, None), "no quality probe of new"),
        (collection("new", 100, 0.90, eval_dir="other"), "different eval sets"),
    ],
)
def test_an_incomplete_or_worse_collection_is_refused(new, complaint):
    decision = promotion([collection("old", 100, 0.80, active=True), new], "new", tolerance=0.02)
    assert not decision.allowed and complaint in decision.message


def test_the_first_and_the_active_collection_need_no_comparison_and_an_unknown_one_is_an_error():
    assert promotion([collection("only", 5, None)], "only", 0.02).allowed
    assert promotion([collection("old", 5, None, active=True)], "old", 0.02).allowed
    with pytest.raises(ConfigError, match="no collection 'missing'"):
        promotion([collection("old", 5, None, active=True)], "missing", 0.02)
