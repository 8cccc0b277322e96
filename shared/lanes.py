"""Fan-out to several embedding specs: one lane per model of EMBEDPIPE_MODELS.

`EMBEDPIPE_MODELS=all-MiniLM-L6-v2,openai:text-embedding-3-small@256` gives two lanes. Each document is
loaded once and chunked once per lane by one chunk job; each lane then has its own embed queue
(`embed@LANE`), so a GPU pool serves one model and an API pool another, scaled apart; the write pool writes
every lane, each into its spec's collection. A lane's share of a batch is a batch of its own, `BATCH~LANE`
(keys, plan, parts, finalisation), whose documents are the batch's. The batch is done when every lane is
(workers/batch_redis.py joins them): only then are its documents counted done and their old dead letters
cleared.

Without EMBEDPIPE_MODELS (or with one model) there is one lane named '': the keys, queue names and batch
IDs embedpipe always had.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from shared.errors import ConfigError
from shared.settings import Settings, parse_model

LANE_SEPARATOR = "~"  # BATCH~LANE: rq job IDs keep it as '-', keys as it is; batch IDs and lane names have none
MAX_LANES = 8  # each lane is a queue, a collection and a label: a bounded set


def lane_name(entry: str) -> str:
    """The lane's name: the model entry in lowercase letters, digits and hyphens (a queue suffix, a label)."""
    return re.sub(r"[^a-z0-9]+", "-", entry.lower()).strip("-")[:40]


@dataclass(frozen=True)
class Lane:
    name: str  # '' in a one-model deployment
    entry: str  # as the user wrote it in EMBEDPIPE_MODELS
    settings: Settings  # the deployment's settings with this lane's model and dimensions


def lanes(settings: Settings) -> list[Lane]:
    """The lanes of a deployment, in EMBEDPIPE_MODELS order (the first is the primary: probes, search)."""
    entries = [e.strip() for e in settings.models.split(",") if e.strip()]
    if len(entries) <= 1:
        model, dims = parse_model(entries[0]) if entries else (settings.model, settings.dimensions)
        return [Lane("", entries[0] if entries else settings.model, replace(settings, model=model, dimensions=dims))]
    if len(entries) > MAX_LANES:
        raise ConfigError(f"EMBEDPIPE_MODELS names {len(entries)} models; at most {MAX_LANES}")
    out = []
    for entry in entries:
        model, dims = parse_model(entry)
        out.append(
            Lane(lane_name(entry), entry, replace(settings, model=model, dimensions=dims or settings.dimensions))
        )
    names = [lane.name for lane in out]
    if len(set(names)) < len(names) or "" in names:
        raise ConfigError(f"EMBEDPIPE_MODELS={settings.models!r}: two models give the same lane name {names}")
    return out


def own_lane(settings: Settings) -> Lane:
    """The lane an embed worker serves: the entry of EMBEDPIPE_MODELS its --model names (exactly, or by a
    model and dimensions, or by a model name only one entry has); without --model, the first entry."""
    all_lanes = lanes(settings)
    if len(all_lanes) == 1:
        return all_lanes[0]
    by_entry = [lane for lane in all_lanes if settings.model in (lane.entry, lane.name)]
    by_spec = [
        lane
        for lane in all_lanes
        if (lane.settings.model, lane.settings.dimensions) == (settings.model, settings.dimensions)
    ]
    by_model = [lane for lane in all_lanes if lane.settings.model == settings.model]
    found = next((f for f in (by_entry, by_spec, by_model) if f), [])
    if len(found) == 1:
        return found[0]
    choices = ", ".join(lane.entry for lane in all_lanes)
    raise ConfigError(f"--model {settings.model!r} must name one model of EMBEDPIPE_MODELS: {choices}")


def one_model(settings: Settings, command: str) -> None:
    """The embedded runtime embeds with one model: several (EMBEDPIPE_MODELS) are the distributed pools' job."""
    if len(lanes(settings)) > 1:
        raise ConfigError(
            f"`{command}` embeds with one model; EMBEDPIPE_MODELS={settings.models!r} names several: "
            "use the distributed pools (`embedpipe enqueue`), or unset it and pass --model"
        )


def share_id(batch_id: str, lane: str) -> str:
    """The ID of a lane's share of a batch (the batch's own ID with one model)."""
    return f"{batch_id}{LANE_SEPARATOR}{lane}" if lane else batch_id


def lane_of(batch_or_lane_id: str) -> tuple[str, str]:
    """(batch ID, lane name) of a lane's batch ID; ('BATCH', '') for a one-model deployment's batch."""
    batch_id, _, lane = batch_or_lane_id.partition(LANE_SEPARATOR)
    return batch_id, lane
