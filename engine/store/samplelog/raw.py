"""The request path's encoding of a served list, and its conversion to Arrow off that path.

Building an Arrow record batch costs ~30 Arrow calls; between requests, with cold caches on a
shared machine, that was ~0.3 ms per Recommend, most of the log's budget. So a Recommend
writes a raw record instead (a struct header, two numpy blocks and the strings: ~0.1 ms), and
Arrow batches are built for many calls at once, off the request path (`raw_batch`): by the
segment writer's background thread (COVER records, engine.store.samplelog.segments), or by a
reader for raw records no batch covers (a writer killed before its thread got to them, Redis
stream entries). Both give the same rows: the `impressions` schema of records.py.

Layout: HEAD, then float32 [score n | predictions n*T row-major | user_x Du | item_x n*Di], then
int32 [item_index n | context K | recent L | routes per item n | string lengths S], then the
UTF-8 strings: request_id, user_id, experiment, bundle_version, T task names, K context
fields, n item ids, the route names item by item.
"""
from __future__ import annotations

import struct

import numpy as np
import pyarrow as pa

from engine.store.samplelog.records import IMPRESSIONS

HEAD = struct.Struct("<IHHHHHddi?I")     # n, T, K, Du, Di, L, time, now_days, user_index, degraded, S


def raw_record(*, request_id: str, time: float, user_id: str, user_index: int, item_ids: list[str],
               items: np.ndarray, experiment: str, bundle_version: str, routes: list[list[str]],
               scores: np.ndarray, predictions: dict[str, np.ndarray], context: dict[str, int],
               degraded: bool, now_days: float, user_x: np.ndarray, item_x: np.ndarray | None,
               recent: np.ndarray) -> bytes:
    n, tasks, keys = len(item_ids), list(predictions), list(context)
    di = 0 if item_x is None else item_x.shape[1]
    floats = [np.asarray(scores, np.float32)]
    if tasks:
        floats.append(np.stack([predictions[t] for t in tasks], axis=1).astype(np.float32).ravel())
    floats.append(np.asarray(user_x, np.float32))
    if di:
        floats.append(np.asarray(item_x, np.float32).ravel())
    strs = [request_id, user_id, experiment, bundle_version, *tasks, *keys, *item_ids,
            *(r for row in routes for r in row)]
    enc = [s.encode() for s in strs]
    ints = np.concatenate([np.asarray(items, np.int32), np.array([context[k] for k in keys], np.int32),
                           np.asarray(recent, np.int32), np.array([len(r) for r in routes], np.int32),
                           np.array([len(e) for e in enc], np.int32)])
    return b"".join((HEAD.pack(n, len(tasks), len(keys), len(user_x), di, len(recent), time, now_days,
                               user_index, degraded, len(enc)),
                     np.concatenate(floats).tobytes(), ints.tobytes(), *enc))


def raw_batch(payloads: list[bytes]) -> pa.RecordBatch:
    """The `impressions` rows of many raw records, as one Arrow record batch: numpy over the
    records' blocks, every string of every record in one Arrow array, columns taken from it."""
    f32, i32, blobs, lengths, idx = [], [], [], [], {k: [] for k in ("const", "task", "key", "item", "route")}
    rows, times, nows, uidx, deg, widths, route_n = [], [], [], [], [], [], []
    base = 0
    for p in payloads:
        n, nt, nk, du, di, nl, t, now, u, d, ns = HEAD.unpack_from(p, 0)
        nf = n * (1 + nt + di) + du
        f = np.frombuffer(p, np.float32, nf, HEAD.size)
        i = np.frombuffer(p, np.int32, 2 * n + nk + nl + ns, HEAD.size + 4 * nf)
        blobs.append(p[HEAD.size + 4 * nf + 4 * i.size:])
        lengths.append(i[2 * n + nk + nl:])
        rows.append(n), times.append(t), nows.append(now), uidx.append(u), deg.append(d)
        widths.append((nt, nk, du, di, nl))
        at = n * (1 + nt)
        f32.append((f[:n], f[n:at], f[at:at + du], f[at + du:]))           # user_x: once per record
        i32.append((i[:n], i[n:n + nk], i[n + nk:n + nk + nl]))              # context, recent: once
        route_n.append(i[n + nk + nl:2 * n + nk + nl])
        first = base + 4 + nt + nk       # the item ids' place among all strings
        idx["const"].append(base + np.arange(4))
        idx["task"].append(base + 4 + np.arange(nt))
        idx["key"].append(base + 4 + nt + np.arange(nk))
        idx["item"].append(first + np.arange(n))
        idx["route"].append(first + n + np.arange(ns - (first - base) - n))
        base += ns
    lens = np.concatenate(lengths) if lengths else np.empty(0, np.int32)
    offsets = np.zeros(lens.size + 1, np.int32)
    np.cumsum(lens, out=offsets[1:])
    strings = pa.StringArray.from_buffers(lens.size, pa.py_buffer(offsets), pa.py_buffer(b"".join(blobs)))
    rows_a = np.asarray(rows, np.int64)
    const = np.concatenate(idx["const"]).reshape(-1, 4) if payloads else np.empty((0, 4), np.int64)

    def each_row(vectors: list[np.ndarray], dtype) -> np.ndarray:
        """A record's vector repeated on each of its rows, all records flat."""
        if not vectors:
            return np.empty(0, dtype)
        if len({v.size for v in vectors}) == 1:          # the usual case: one bundle's widths
            return np.repeat(np.stack(vectors), rows_a, axis=0).ravel()
        return np.concatenate([np.tile(v, n) for v, n in zip(vectors, rows)])

    def take(which: str) -> pa.Array:
        per = idx[which]
        flat_idx = each_row(per, np.int64) if which in ("task", "key") else (
            np.concatenate(per) if per else np.empty(0, np.int64))
        return strings.take(pa.array(flat_idx))

    def per_row(values, dtype) -> np.ndarray:
        return np.repeat(np.asarray(values, dtype), rows_a)

    def flat(parts: list, k: int, dtype) -> pa.Array:
        return pa.array(np.concatenate([x[k] for x in parts]) if parts else np.empty(0, dtype))

    def offsets_of(width: int) -> pa.Array:     # list offsets, rows of record r holding widths[r][width] values
        out = np.zeros(rows_a.sum() + 1, np.int32)
        np.cumsum(per_row([w[width] for w in widths], np.int32), out=out[1:])
        return pa.array(out)

    route_off = np.zeros(rows_a.sum() + 1, np.int32)
    np.cumsum(np.concatenate(route_n) if payloads else np.empty(0, np.int32), out=route_off[1:])
    position = np.concatenate([np.arange(n, dtype=np.int16) for n in rows]) if payloads else np.empty(0, np.int16)
    columns = [
        strings.take(pa.array(per_row(const[:, 0], np.int64))), pa.array(per_row(times, np.float64)),
        strings.take(pa.array(per_row(const[:, 1], np.int64))), pa.array(per_row(uidx, np.int32)), take("item"),
        flat(i32, 0, np.int32), pa.array(position), strings.take(pa.array(per_row(const[:, 2], np.int64))),
        strings.take(pa.array(per_row(const[:, 3], np.int64))),
        pa.ListArray.from_arrays(pa.array(route_off), take("route")), flat(f32, 0, np.float32),
        pa.MapArray.from_arrays(offsets_of(0), take("task"), flat(f32, 1, np.float32)),
        pa.MapArray.from_arrays(offsets_of(1), take("key"), pa.array(each_row([x[1] for x in i32], np.int32))),
        pa.array(per_row(deg, bool)), pa.array(per_row(nows, np.float64)),
        pa.ListArray.from_arrays(offsets_of(2), pa.array(each_row([x[2] for x in f32], np.float32))),
        pa.ListArray.from_arrays(offsets_of(3), flat(f32, 3, np.float32)),
        pa.ListArray.from_arrays(offsets_of(4), pa.array(each_row([x[2] for x in i32], np.int32))),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=IMPRESSIONS)
