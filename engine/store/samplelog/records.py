"""The sample log's records: one Arrow schema per stream, the same bytes in every backend.

`impressions`: one row per served item of a Recommend (a call's rows are one record batch);
`events`: one row per event ReportEvents accepted; `joined` (the joiner's output,
model_export.join): an impression row plus the labels joined to it. A record batch travels as
an Arrow IPC message (`encode`) in a segment file (engine.store.samplelog.segments) or a Redis
stream entry (engine.store.samplelog.streams); readers decode it with the schema here.

The ranker inputs are logged as served (engine.core.request.ServedInputs): `user_x` is the
rankers' user row (repeated on every row of the call), `item_x` the item row (item embedding,
then the coarse features), `recent` the catalog indices whose bundle item embeddings form the
fine ranker's sequence, `now_days` the bundle-clock time the item ages were taken at.
"""
from __future__ import annotations

import itertools
import threading

import numpy as np
import pyarrow as pa

from engine.core.request import EVENT_KINDS

SCHEMA_VERSION = 1

IMPRESSIONS = pa.schema([
    ("request_id", pa.string()),
    ("time", pa.float64()),                          # unix seconds on the server, when the answer was built
    ("user_id", pa.string()),
    ("user_index", pa.int32()),                      # bundle user row, -1: a user the bundle does not know
    ("item_id", pa.string()),
    ("item_index", pa.int32()),                      # bundle catalog row
    ("position", pa.int16()),                        # slot in the served list, 0 first
    ("experiment", pa.string()),
    ("bundle_version", pa.string()),
    ("routes", pa.list_(pa.string())),
    ("score", pa.float32()),                         # fused score the list was ordered by
    ("predictions", pa.map_(pa.string(), pa.float32())),   # task -> probability (empty: fine ranking skipped)
    ("context", pa.map_(pa.string(), pa.int32())),   # as the client sent it
    ("degraded", pa.bool_()),
    ("now_days", pa.float64()),
    ("user_x", pa.list_(pa.float32())),
    ("item_x", pa.list_(pa.float32())),              # empty when no ranking stage ran
    ("recent", pa.list_(pa.int32())),
], metadata={"recserve.stream": "impressions", "recserve.schema_version": str(SCHEMA_VERSION)})

EVENTS = pa.schema([
    ("time", pa.float64()),                          # unix seconds on the server, when it was accepted
    ("event_time", pa.float64()),                    # the client's timestamp (its 0, "now": = time)
    ("kind", pa.string()),
    ("user_id", pa.string()),
    ("item_id", pa.string()),
    ("request_id", pa.string()),                     # "" from clients that do not send it
], metadata={"recserve.stream": "events", "recserve.schema_version": str(SCHEMA_VERSION)})

LABELS = tuple(f"label_{k}" for k in EVENT_KINDS)   # 1: at least one event of the kind joined
JOINED = pa.schema([
    *IMPRESSIONS,
    *((name, pa.int8()) for name in LABELS),
    ("correction", pa.bool_()),                      # re-emitted: a positive arrived after the negative went out
    ("close_time", pa.float64()),                    # joiner clock (unix s) when the row was emitted
    ("source", pa.string()),                         # where the impression was read: partition@position
], metadata={"recserve.stream": "joined", "recserve.schema_version": str(SCHEMA_VERSION)})

SCHEMAS = {"impressions": IMPRESSIONS, "events": EVENTS, "joined": JOINED}


def encode(batch: pa.RecordBatch) -> bytes:
    """One record batch as an Arrow IPC message (no schema: readers know it)."""
    return batch.serialize().to_pybytes()


def decode(payload: bytes | memoryview, schema: pa.Schema) -> pa.RecordBatch:
    return pa.ipc.read_record_batch(pa.py_buffer(payload), schema)


def _zero_copy(a: np.ndarray) -> pa.Array:
    """An Arrow array over a numpy buffer, sharing its memory: writes to `a` show in it."""
    return pa.Array.from_buffers(pa.from_numpy_dtype(a.dtype), a.size, [None, pa.py_buffer(a)])


def _offsets(n: int, width: int) -> pa.Array:
    return pa.array(np.arange(n + 1, dtype=np.int32) * width)


class _Layout:
    """The Arrow columns of one shape of served list (rows, tasks, context fields, widths),
    built once over numpy buffers that each call overwrites: a call then costs numpy writes,
    one string conversion and the IPC serialisation, instead of ~30 Arrow constructions (each
    a few microseconds; the log has a budget of a fraction of a millisecond per Recommend).
    One per thread and shape (`_layout`): a batch built on it is valid until the next call."""

    def __init__(self, n: int, tasks: tuple[str, ...], ctx_keys: tuple[str, ...], du: int, di: int, nl: int):
        nt, nk = len(tasks), len(ctx_keys)
        self.n, self.tasks, self.ctx_keys = n, tasks, ctx_keys
        self.f64 = np.zeros(2 * n)                                     # time, now_days
        self.f32 = np.zeros(n * (1 + nt + du + di), np.float32)        # score, predictions, user_x, item_x
        self.i32 = np.zeros(n * (2 + nk + nl) + n + 1, np.int32)       # user_index, item_index, context, recent,
        F64, F32, I32 = (_zero_copy(a) for a in (self.f64, self.f32, self.i32))   # route offsets
        at = 2 * n + n * (nk + nl)
        self.route_offsets = I32.slice(at, n + 1)
        keys = lambda k: pa.array(list(k) * n, pa.string())    # noqa: E731
        self.numeric = {
            "time": F64.slice(0, n), "user_index": I32.slice(0, n), "item_index": I32.slice(n, n),
            "position": pa.array(np.arange(n, dtype=np.int16)), "score": F32.slice(0, n),
            "predictions": pa.MapArray.from_arrays(_offsets(n, nt), keys(tasks), F32.slice(n, n * nt)),
            "context": pa.MapArray.from_arrays(_offsets(n, nk), keys(ctx_keys), I32.slice(2 * n, n * nk)),
            "now_days": F64.slice(n, n),
            "user_x": pa.ListArray.from_arrays(_offsets(n, du), F32.slice(n * (1 + nt), n * du)),
            "item_x": pa.ListArray.from_arrays(_offsets(n, di), F32.slice(n * (1 + nt + du), n * di)),
            "recent": pa.ListArray.from_arrays(_offsets(n, nl), I32.slice(2 * n + n * nk, n * nl)),
        }
        self.degraded = {v: pa.array(np.full(n, v)) for v in (False, True)}

    def fill(self, time: float, user_index: int, items: np.ndarray, scores: np.ndarray,
             predictions: dict[str, np.ndarray], context: dict[str, int], now_days: float, user_x: np.ndarray,
             item_x: np.ndarray | None, recent: np.ndarray, routes: list[list[str]]) -> int:
        """Write one call's numbers into the buffers; returns how many route names it has."""
        n, nt, nk = self.n, len(self.tasks), len(self.ctx_keys)
        du, nl = len(user_x), len(recent)
        self.f64[:n], self.f64[n:] = time, now_days
        f32 = self.f32
        f32[:n] = scores
        for j, t in enumerate(self.tasks):
            f32[n + j:n + n * nt:nt] = predictions[t]
        at = n * (1 + nt)
        f32[at:at + n * du].reshape(n, du)[:] = user_x
        if item_x is not None and item_x.shape[1]:
            f32[at + n * du:].reshape(n, -1)[:] = item_x
        i32 = self.i32
        i32[:n], i32[n:2 * n] = user_index, items
        if nk:
            i32[2 * n:2 * n + n * nk].reshape(n, nk)[:] = [context[k] for k in self.ctx_keys]
        i32[2 * n + n * nk:2 * n + n * (nk + nl)].reshape(n, nl)[:] = recent
        i32[-n:] = list(itertools.accumulate(map(len, routes)))      # offsets[0] stays 0
        return int(i32[-1])


_layouts = threading.local()


def _layout(n: int, tasks: tuple[str, ...], ctx_keys: tuple[str, ...], du: int, di: int, nl: int) -> _Layout:
    cache = _layouts.__dict__.setdefault("by_shape", {})
    key = (n, tasks, ctx_keys, du, di, nl)
    got = cache.get(key)
    if got is None:
        if len(cache) >= 64:         # shapes come from count, tasks and context: a handful in practice
            cache.clear()
        got = cache[key] = _Layout(*key)
    return got


def impression_record(*, request_id: str, time: float, user_id: str, user_index: int, item_ids: list[str],
                      items: np.ndarray, experiment: str, bundle_version: str, routes: list[list[str]],
                      scores: np.ndarray, predictions: dict[str, np.ndarray], context: dict[str, int],
                      degraded: bool, now_days: float, user_x: np.ndarray, item_x: np.ndarray | None,
                      recent: np.ndarray) -> bytes:
    """The rows of one served list (one per item), encoded (`encode`): what the sample log writes."""
    n = len(item_ids)
    lay = _layout(n, tuple(predictions), tuple(context), len(user_x), 0 if item_x is None else item_x.shape[1],
                  len(recent))
    n_routes = lay.fill(time, user_index, items, scores, predictions, context, now_days, user_x, item_x, recent,
                        routes)
    strings = pa.array([*[request_id] * n, *[user_id] * n, *[experiment] * n, *[bundle_version] * n, *item_ids,
                        *(r for row in routes for r in row)], pa.string())
    num = lay.numeric
    cols = [strings.slice(0, n), num["time"], strings.slice(n, n), num["user_index"], strings.slice(4 * n, n),
            num["item_index"], num["position"], strings.slice(2 * n, n), strings.slice(3 * n, n),
            pa.ListArray.from_arrays(lay.route_offsets, strings.slice(5 * n, n_routes)), num["score"],
            num["predictions"], num["context"], lay.degraded[bool(degraded)], num["now_days"], num["user_x"],
            num["item_x"], num["recent"]]
    return encode(pa.RecordBatch.from_arrays(cols, schema=IMPRESSIONS))


def event_batch(time: float, kinds: list[str], user_ids: list[str], item_ids: list[str],
                request_ids: list[str], event_times: list[float]) -> pa.RecordBatch:
    """Accepted events of one ReportEvents call; an event time of 0 ("now") becomes `time`."""
    et = np.asarray(event_times, np.float64)
    return pa.RecordBatch.from_arrays([
        pa.array(np.full(len(kinds), time, np.float64)), pa.array(np.where(et > 0, et, time)),
        pa.array(kinds, pa.string()), pa.array(user_ids, pa.string()), pa.array(item_ids, pa.string()),
        pa.array(request_ids, pa.string())], schema=EVENTS)


def matrix(column: pa.Array) -> np.ndarray:
    """A list<float32|int32> column of equal-length lists as a [n, k] numpy array (zero-copy
    where Arrow allows): how a trainer or a test reads user_x, item_x and recent."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(column)
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(n, -1) if n else flat.reshape(0, 0)
