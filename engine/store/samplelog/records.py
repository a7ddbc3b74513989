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

import functools

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


@functools.lru_cache(maxsize=256)
def _offsets(n: int, width: int) -> pa.Array:
    """List offsets of `n` lists of `width` values; the shapes repeat call after call, so
    they are built once (an Arrow conversion costs microseconds; the log budget is tight)."""
    return pa.array(np.arange(n + 1, dtype=np.int32) * width)


@functools.lru_cache(maxsize=256)
def _keys(keys: tuple[str, ...], n: int) -> pa.Array:
    return pa.array(list(keys) * n, pa.string())


@functools.lru_cache(maxsize=64)
def _positions(n: int) -> pa.Array:
    return pa.array(np.arange(n, dtype=np.int16))


def impression_batch(*, request_id: str, time: float, user_id: str, user_index: int, item_ids: list[str],
                     items: np.ndarray, experiment: str, bundle_version: str, routes: list[list[str]],
                     scores: np.ndarray, predictions: dict[str, np.ndarray], context: dict[str, int],
                     degraded: bool, now_days: float, user_x: np.ndarray, item_x: np.ndarray | None,
                     recent: np.ndarray) -> pa.RecordBatch:
    """The rows of one served list. Numpy lays every value of a type out in one buffer, Arrow
    converts each buffer once and the columns are zero-copy slices of it."""
    n = len(item_ids)
    tasks, ctx_keys = tuple(predictions), tuple(context)
    nt, nk, du, nl = len(tasks), len(ctx_keys), len(user_x), len(recent)
    di = 0 if item_x is None else item_x.shape[1]
    f32 = np.empty(n * (1 + nt + du + di), np.float32)       # score, predictions, user_x, item_x
    f32[:n] = scores
    for j, t in enumerate(tasks):
        f32[n + j:n + n * nt:nt] = predictions[t]
    at = n * (1 + nt)
    f32[at:at + n * du].reshape(n, du)[:] = user_x
    if di:
        f32[at + n * du:].reshape(n, di)[:] = item_x
    i32 = np.empty(n * (2 + nk + nl) + n + 1, np.int32)      # user_index, item_index, context, recent, route offsets
    i32[:n] = user_index
    i32[n:2 * n] = items
    at = 2 * n
    if nk:
        i32[at:at + n * nk].reshape(n, nk)[:] = [context[k] for k in ctx_keys]
    i32[at + n * nk:at + n * (nk + nl)].reshape(n, nl)[:] = recent
    at += n * (nk + nl)
    i32[at] = 0
    np.cumsum([len(r) for r in routes], out=i32[at + 1:])
    n_routes = int(i32[-1])
    f64 = np.empty(2 * n)
    f64[:n], f64[n:] = time, now_days
    F32, I32, F64 = pa.array(f32), pa.array(i32), pa.array(f64)
    strings = pa.array([*[request_id] * n, *[user_id] * n, *[experiment] * n, *[bundle_version] * n, *item_ids,
                        *(r for row in routes for r in row)], pa.string())
    cols = [
        strings.slice(0, n), F64.slice(0, n), strings.slice(n, n), I32.slice(0, n), strings.slice(4 * n, n),
        I32.slice(n, n), _positions(n), strings.slice(2 * n, n), strings.slice(3 * n, n),
        pa.ListArray.from_arrays(I32.slice(2 * n + n * (nk + nl), n + 1), strings.slice(5 * n, n_routes)),
        F32.slice(0, n),
        pa.MapArray.from_arrays(_offsets(n, nt), _keys(tasks, n), F32.slice(n, n * nt)),
        pa.MapArray.from_arrays(_offsets(n, nk), _keys(ctx_keys, n), I32.slice(2 * n, n * nk)),
        pa.array(np.full(n, degraded)), F64.slice(n, n),
        pa.ListArray.from_arrays(_offsets(n, du), F32.slice(n * (1 + nt), n * du)),
        pa.ListArray.from_arrays(_offsets(n, di), F32.slice(n * (1 + nt + du), n * di)),
        pa.ListArray.from_arrays(_offsets(n, nl), I32.slice(2 * n + n * nk, n * nl)),
    ]
    return pa.RecordBatch.from_arrays(cols, schema=IMPRESSIONS)


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
