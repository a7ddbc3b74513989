"""The sample log's records: one Arrow schema per stream, the same rows in every backend.

`impressions`: one row per served item of a Recommend (written as a raw record on the request
path and converted to these rows off it: engine.store.samplelog.raw);
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
