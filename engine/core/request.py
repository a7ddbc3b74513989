"""Request and response of one Recommend call, independent of the transport.

Field names follow the proto (protos/recserve.proto) where the client sets them; the engine
validates a Request once (engine.core.validation) and works on a normalised copy."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class Request:
    user_id: str
    count: int = 0                                          # 0: serving.default_count
    context: dict[str, int] = field(default_factory=dict)  # e.g. hour (0-23), device (0..n)
    exclude_item_ids: list[str] = field(default_factory=list)   # external item ids
    experiment: str = ""                                    # "": assigned by user hash
    debug: bool = False
    deadline_ms: float | None = None                        # None: serving.deadline_ms; <= 0: already passed
    request_id: str = ""


@dataclass(slots=True)
class StageTrace:
    name: str
    ms: float
    count_in: int
    count_out: int
    status: str = "ok"  # ok | skipped | failed | timeout


@dataclass(slots=True)
class ServedInputs:
    """What the rankers saw for the served rows, as the server computed them: what the sample
    log records so a trainer learns from exactly the features that were served.

    The fine ranker's feeds are `user` (broadcast), `item` and the sequence, which is the
    bundle's `item_emb[recent]` masked where `recent < 0` (featurize.sequence_input): the
    bundle version plus `recent` reproduce it exactly. Coarse phase 2 reads `user` and `item`;
    the phase-1 trees read the last len(COARSE_FEATURES) columns of `item`. `item` is None
    when no ranking stage ran (a pipeline without rankers)."""

    items: np.ndarray                      # int32 [n] catalog indices, in the served order
    user_index: int                        # row in the bundle's user tables, -1 for a new user
    user: np.ndarray                       # float32 [Du] featurize.ranker_user_input
    item: np.ndarray | None                # float32 [n, Di] featurize.ranker_item_input
    recent: np.ndarray                     # int32 [L] the user's recent positives, -1 padded
    now: float                             # days on the bundle clock (item ages were taken at it)


@dataclass(slots=True)
class Response:
    item_ids: list[str]
    scores: np.ndarray                     # float32 fused score per served item
    task_scores: dict[str, np.ndarray]     # task name -> float32 per served item
    routes: list[list[str]]                # recall routes that found each item
    degraded: bool = False
    experiment: str = ""
    bundle_version: str = ""
    request_id: str = ""
    trace: list[StageTrace] = field(default_factory=list)
    total_ms: float = 0.0
    inputs: ServedInputs | None = None     # for the sample log (engine.app.samplelog)


EVENT_KINDS = ("impression", "click", "like", "finish", "dislike")


@dataclass(slots=True)
class Event:
    kind: str           # one of EVENT_KINDS
    user_id: str
    item_id: str
    timestamp: float    # unix seconds; 0 means "now"
    request_id: str = ""
