"""Joined samples in, ranker batches out: the streaming trainer's input side.

The joiner commits samples commit by commit (model_export.joined); the trainer reads them in
that order and keeps the freshest `holdout_rows` of them back as the validation slice (the
"held-out slice of the freshest samples"); everything older is trained on, one pass, shuffled
only within a chunk of about `buffer_rows`. The held-out commits are trained on once newer
ones replace them, so every sample is trained on exactly once and validated on before that.

Offsets are whole commits: a version records the offset of the last commit it was trained on,
and a restart from that version reads on from there (`JoinedReader.read(after=...)`).
"""
from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.store.samplelog import records
from model_export.joined import Commit, JoinedOffset, JoinedReader
from model_export.train import RankerRows


@dataclass
class Samples:
    """Rows of one or more commits as the rankers take them, plus what identifies them."""
    rows: RankerRows
    user_index: np.ndarray       # int32 [N] bundle user row (-1: unknown user)
    item_index: np.ndarray       # int32 [N]
    versions: np.ndarray         # '<U' [N] bundle version that served each row
    dropped: int = 0             # rows without ranker inputs (no ranking stage ran)

    def __len__(self) -> int:
        return len(self.rows.user)


def to_samples(table: pa.Table, tasks: tuple[str, ...], d_user: int, d_item: int, recent_len: int) -> Samples:
    """A joined table as ranker rows; rows whose inputs do not have the bundle's widths (a list
    served without ranking, or by a bundle of another schema) are dropped and counted."""
    ok = pc.and_(pc.and_(pc.equal(pc.list_value_length(table["item_x"]), d_item),
                         pc.equal(pc.list_value_length(table["user_x"]), d_user)),
                 pc.equal(pc.list_value_length(table["recent"]), recent_len))
    kept = table.filter(ok)
    n = kept.num_rows

    def mat(name: str, width: int, dtype) -> np.ndarray:     # writable: torch refuses read-only Arrow memory
        return np.require(records.matrix(kept[name]).reshape(n, width), dtype, "CW")

    rows = RankerRows(mat("user_x", d_user, np.float32), mat("item_x", d_item, np.float32),
                      mat("recent", recent_len, np.int32),
                      np.stack([kept[f"label_{t}"].to_numpy() for t in tasks], 1).astype(np.float32),
                      kept["position"].to_numpy().astype(np.int16))
    return Samples(rows, kept["user_index"].to_numpy().astype(np.int32), kept["item_index"].to_numpy().astype(np.int32),
                   kept["bundle_version"].to_numpy(zero_copy_only=False).astype(str),
                   dropped=table.num_rows - n)


def concat(parts: list[Samples]) -> Samples:
    r = [p.rows for p in parts]
    fields = ("user", "item", "recent", "labels", "position")
    return Samples(RankerRows(*(np.concatenate([getattr(x, f) for x in r]) for f in fields)),
                   np.concatenate([p.user_index for p in parts]), np.concatenate([p.item_index for p in parts]),
                   np.concatenate([p.versions for p in parts]), sum(p.dropped for p in parts))


def digest(table: pa.Table) -> int:
    """Order-independent fingerprint of a set of joined rows (sum of 64-bit hashes of request,
    item, correction and source, mod 2^64): a version's input range can be checked row for row."""
    keys = zip(table["request_id"].to_pylist(), table["item_id"].to_pylist(), table["correction"].to_pylist(),
               table["source"].to_pylist())
    total = 0
    for k in keys:
        total += int.from_bytes(hashlib.blake2b(repr(k).encode(), digest_size=8).digest(), "little")
    return total % (1 << 64)


class SampleFeed:
    """Follows the joiner's output from an offset; hands out trainable commits, oldest first,
    while the freshest `holdout_rows` stay held out."""

    def __init__(self, joined: str | Path, after: JoinedOffset, holdout_rows: int):
        self.reader = JoinedReader(joined)
        self.read_to = after                    # everything up to here has been read
        self.pending: deque[tuple[pa.Table, Commit]] = deque()     # read, not trained: the freshest
        self.holdout_rows = holdout_rows

    def poll(self, max_rows: int = 1 << 62) -> int:
        """Read the commits written since the last poll, up to the one reaching `max_rows` (a
        backlog is worked through in steps); the number of rows read."""
        n = 0
        for table, commit in self.reader.read(after=self.read_to, max_rows=max_rows):
            self.pending.append((table, commit))
            self.read_to = commit.offset
            n += table.num_rows
        return n

    def trainable(self) -> list[tuple[pa.Table, Commit]]:
        """Pop the oldest commits whose removal still leaves `holdout_rows` pending."""
        out = []
        held = sum(t.num_rows for t, _ in self.pending)
        while self.pending and held - self.pending[0][0].num_rows >= self.holdout_rows:
            out.append(self.pending.popleft())
            held -= out[-1][0].num_rows
        return out

    def holdout(self) -> pa.Table | None:
        """The held-out slice: the freshest pending commits' rows (None before there are any)."""
        tables = [t for t, _ in self.pending if t.num_rows]
        return pa.concat_tables(tables) if tables else None
