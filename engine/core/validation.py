"""The one validator of what a client sends: a Request (Recommend) and an Event (ReportEvents).

Transports only convert their wire format into these dataclasses; the engine checks them
here, once. Messages name fields as the client sees them in the proto (`user_id`, `count`,
`exclude_item_ids`, `experiment`, `context.<field>`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from engine.core.config import Config
from engine.core.errors import DeadlineExceeded, InvalidRequest
from engine.core.request import EVENT_KINDS, Event, Request

MAX_ID_LEN = 256
FUTURE_SLACK_S = 3600.0      # client clocks run ahead; an event beyond this is refused


def checked_request(req: Request, cfg: Config, context_fields: Sequence[str],
                    context_cardinality: Sequence[int]) -> Request:
    """A normalised copy of `req` (count and deadline defaults filled in; `req` is left as it
    is), or InvalidRequest naming the field; DeadlineExceeded if its deadline has passed."""
    s = cfg.serving
    if not req.user_id or len(req.user_id) > MAX_ID_LEN or not req.user_id.isprintable():
        raise InvalidRequest("user_id", f"must be 1-{MAX_ID_LEN} printable characters")
    if not 0 <= req.count <= s.max_count:
        raise InvalidRequest("count", f"{req.count} is outside 0..{s.max_count} (0: the default, {s.default_count})")
    if len(req.exclude_item_ids) > s.max_excludes:
        raise InvalidRequest("exclude_item_ids", f"{len(req.exclude_item_ids)} ids exceed "
                                                 f"serving.max_excludes={s.max_excludes}")
    if any(not x for x in req.exclude_item_ids):
        raise InvalidRequest("exclude_item_ids", "item ids must be non-empty")
    if req.experiment and req.experiment not in cfg.experiments:
        known = ", ".join(sorted(cfg.experiments)) or "none configured"
        raise InvalidRequest("experiment", f"unknown experiment '{req.experiment}' (known: {known})")
    for k, v in req.context.items():
        if k not in context_fields:
            raise InvalidRequest(f"context.{k}", f"unknown context field (known: {', '.join(context_fields)})")
        card = context_cardinality[list(context_fields).index(k)]
        if not 0 <= v < card:
            raise InvalidRequest(f"context.{k}", f"must be in 0..{card - 1}, got {v}")
    if len(req.request_id) > MAX_ID_LEN or not req.request_id.isprintable():
        raise InvalidRequest("request_id", f"must be at most {MAX_ID_LEN} printable characters")
    if req.deadline_ms is not None and not req.deadline_ms > 0:   # NaN included
        raise DeadlineExceeded("the client's deadline leaves no time to serve")
    return dataclasses.replace(req, count=req.count or s.default_count,
                               deadline_ms=s.deadline_ms if req.deadline_ms is None else req.deadline_ms)


def event_fault(e: Event, known_item: bool, now_unix: float) -> str:
    """Why an event is refused ("" if it is not): one line naming the field."""
    if e.kind not in EVENT_KINDS:
        return f"kind: '{e.kind}' is not one of {', '.join(EVENT_KINDS)}"
    if not e.user_id or len(e.user_id) > MAX_ID_LEN:
        return f"user_id: must be 1-{MAX_ID_LEN} characters"
    if len(e.request_id) > MAX_ID_LEN or not e.request_id.isprintable():
        return f"request_id: must be at most {MAX_ID_LEN} printable characters"
    if not known_item:
        return f"item_id: unknown item '{e.item_id}'"
    if not math.isfinite(e.timestamp) or e.timestamp < 0 or e.timestamp > now_unix + FUTURE_SLACK_S:
        return f"timestamp: {e.timestamp} is not a unix time in the past (finite, >= 0; 0 means now)"
    return ""
