"""`data.source = "files"`: your own interaction log, items and users from Parquet or CSV files.

A folder with `interactions`, `items` and optionally `users`, each `.parquet` or `.csv`
(docs/data.md has the format and a worked example). Everything is checked before anything is
built: a bad file raises one DataFileError naming the file, the column and the first bad row.
`export_dataset` writes any Dataset in this format (`recserve data export`), which is how
MovieLens is converted for the worked example.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.core.errors import ConfigError
from model_export.dataset import Dataset

TABLES = ("interactions", "items", "users")
LABEL, CTX, CONTENT = "label_", "ctx_", "content"
_INT = r"^\s*[+-]?\d+\s*$"
_FLOAT = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"


class DataFileError(ConfigError):
    """A data file the config names cannot be used: file, column, first bad row, why."""


class _Table:
    """One file's columns, with the checks that name the first bad row."""

    def __init__(self, path: Path):
        self.path, self.csv = path, path.suffix == ".csv"
        try:
            if self.csv:
                import pyarrow.csv as pv

                with path.open(encoding="utf-8", newline="") as f:
                    names = next(csv.reader(f), [])       # every column read as text, checked below
                self.t = pv.read_csv(path, convert_options=pv.ConvertOptions(
                    column_types={n: pa.string() for n in names}, strings_can_be_null=True, null_values=[""]))
            else:
                import pyarrow.parquet as pq

                self.t = pq.read_table(path)
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise DataFileError(f"{path}: cannot be read: {str(e).splitlines()[0]}") from None
        self.n = self.t.num_rows

    def has(self, col: str) -> bool:
        return col in self.t.column_names

    def fail(self, col: str, row: int, why: str) -> DataFileError:
        where = f"row {row + 1}" + (f" (line {row + 2})" if self.csv else "")
        return DataFileError(f"{self.path}: column '{col}', {where}: {why}")

    def col(self, col: str, nullable: bool = False) -> pa.Array:
        if not self.has(col):
            raise DataFileError(f"{self.path}: missing column '{col}' (has: {', '.join(self.t.column_names)})")
        a = self.t.column(col).combine_chunks()
        if not nullable and a.null_count:
            raise self.fail(col, int(np.flatnonzero(a.is_null().to_numpy(zero_copy_only=False))[0]), "empty")
        return a

    def ids(self, col: str) -> np.ndarray:
        a = self.col(col)
        if not (pa.types.is_string(a.type) or pa.types.is_large_string(a.type) or pa.types.is_integer(a.type)):
            raise DataFileError(f"{self.path}: column '{col}': ids must be strings or integers, not {a.type}")
        s = a.cast(pa.string()).to_numpy(zero_copy_only=False).astype(str)
        bad = np.flatnonzero(np.char.str_len(s) == 0)
        if bad.size:
            raise self.fail(col, int(bad[0]), "empty id")
        return s

    def numbers(self, col: str, integer: bool = False, nullable: bool = False, low: float | None = None
                ) -> np.ndarray:
        """float64 (or int64) values; nulls (if allowed) as NaN."""
        a = self.col(col, nullable)
        if pa.types.is_string(a.type) or pa.types.is_large_string(a.type):
            ok = pc.match_substring_regex(a, _INT if integer else _FLOAT).to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(~ok & ~a.is_null().to_numpy(zero_copy_only=False))
            if bad.size:
                kind = "an integer" if integer else "a number"
                raise self.fail(col, int(bad[0]), f"{a[int(bad[0])].as_py()!r} is not {kind}")
            a = pc.utf8_trim_whitespace(a)
        elif not (pa.types.is_integer(a.type) or pa.types.is_floating(a.type) or pa.types.is_boolean(a.type)):
            raise DataFileError(f"{self.path}: column '{col}': expected numbers, not {a.type}")
        v = a.cast(pa.float64()).to_numpy(zero_copy_only=False)
        known = ~np.isnan(v) if nullable else np.ones(v.size, bool)
        for bad, why in ((~np.isfinite(v), lambda x: "not finite"),
                         (v != np.round(v) if integer else None, lambda x: f"{x:g} is not an integer"),
                         (v < low if low is not None else None, lambda x: f"{x:g} is below {low:g}")):
            rows = np.flatnonzero(known & bad) if bad is not None else ()
            if len(rows):
                raise self.fail(col, int(rows[0]), why(v[rows[0]]))
        return v.astype(np.int64) if integer and not nullable else v

    def codes(self, col: str) -> tuple[np.ndarray, int]:
        """A categorical column as int32 codes and its cardinality: integers >= 0 as they are,
        anything else indexed by sorted value from 1 (0: unknown, for rows the file lacks)."""
        a = self.col(col)
        if pa.types.is_integer(a.type) or (self.csv and pc.all(pc.match_substring_regex(a, _INT)).as_py()):
            v = self.numbers(col, integer=True, low=0)
            return v.astype(np.int32), int(v.max()) + 1 if v.size else 1
        s = a.cast(pa.string()).to_numpy(zero_copy_only=False).astype(str)
        uniq, inv = np.unique(s, return_inverse=True)
        return (inv + 1).astype(np.int32), len(uniq) + 1


def find(directory: Path, name: str, required: bool = True) -> Path | None:
    found = [directory / f"{name}{ext}" for ext in (".parquet", ".csv") if (directory / f"{name}{ext}").is_file()]
    if len(found) > 1:
        raise DataFileError(f"{directory}: both {found[0].name} and {found[1].name}; keep one")
    if not found and required:
        raise DataFileError(f"{directory}: no {name}.parquet or {name}.csv")
    return found[0] if found else None


def _in_order(*parts: np.ndarray) -> np.ndarray:
    """Distinct ids in order of first appearance across `parts`."""
    ids = np.concatenate(parts) if parts else np.empty(0, str)
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)]


def load_files(directory: str | Path, history_frac: float = 0.7, valid_frac: float = 0.15) -> Dataset:
    d = Path(directory)
    if not d.is_dir():
        raise DataFileError(f"data.files_dir: {d}: no such folder")
    inter, items = _Table(find(d, "interactions")), _Table(find(d, "items"))
    users_path = find(d, "users", required=False)
    users = _Table(users_path) if users_path else None

    # interactions
    r_user, r_item = inter.ids("user_id"), inter.ids("item_id")
    ts = inter.numbers("timestamp")
    tasks = [c[len(LABEL):] for c in inter.t.column_names if c.startswith(LABEL)]
    if not tasks:
        raise DataFileError(f"{inter.path}: no label column (label_<task>, e.g. label_click)")
    labels = np.stack([inter.numbers(LABEL + t, integer=True, low=0) for t in tasks], axis=1)
    over = np.argwhere(labels > 1)
    if over.size:
        raise inter.fail(LABEL + tasks[over[0][1]], int(over[0][0]), f"{labels[tuple(over[0])]} is not 0 or 1")
    implicit = not inter.has("position")
    position = np.zeros(inter.n) if implicit else inter.numbers("position", integer=True, low=0)
    ctx_cols = [c for c in inter.t.column_names if c.startswith(CTX)]
    if ctx_cols:
        ctx = np.stack([inter.numbers(c, integer=True, low=0) for c in ctx_cols], axis=1)
        ctx_fields, ctx_card = tuple(c[len(CTX):] for c in ctx_cols), tuple(int(m) + 1 for m in ctx.max(axis=0))
    else:                            # as the MovieLens loader: hour of day (UTC) from the timestamp, one device
        ctx = np.stack([(ts // 3600 % 24), np.zeros(inter.n)], axis=1)
        ctx_fields, ctx_card = ("hour", "device"), (24, 1)
    if inter.n == 0:
        raise DataFileError(f"{inter.path}: no rows")

    # items
    i_ids = items.ids("item_id")
    _unique(items, "item_id", i_ids)
    category, n_categories = items.codes("category")
    author, n_authors = items.codes("author")
    created = items.numbers("created", nullable=True)
    content = _content(items, category, n_categories)
    missing = np.flatnonzero(~np.isin(r_item, i_ids))
    if missing.size:
        raise inter.fail("item_id", int(missing[0]), f"item '{r_item[missing[0]]}' is not in {items.path.name}")

    # users
    u_file_ids = users.ids("user_id") if users else np.empty(0, str)
    if users:
        _unique(users, "user_id", u_file_ids)
    user_ids, item_ids = _in_order(u_file_ids, r_user), i_ids      # row k of the bundle: the k-th id
    u_index = {u: k for k, u in enumerate(user_ids.tolist())}
    i_index = {t: k for k, t in enumerate(item_ids.tolist())}
    fields = [c for c in users.t.column_names if c != "user_id"] if users else []
    profile = np.zeros((len(user_ids), max(len(fields), 1)), np.int32)
    card = [1] * max(len(fields), 1)
    if users:
        rows = np.array([u_index[u] for u in u_file_ids.tolist()], np.int64)
        for k, f in enumerate(fields):
            profile[rows, k], card[k] = users.codes(f)

    # the log, time-sorted; times in days from the first interaction
    order = np.argsort(ts, kind="stable")
    t0 = float(ts[order[0]])
    log_time = ((ts[order] - t0) / 86400).astype(np.float32)
    t_end = float(log_time[-1]) + 1 / 24
    log_item = np.array([i_index[x] for x in r_item[order].tolist()], np.int32)
    first = np.full(len(item_ids), t_end, np.float32)    # created unknown: first interaction, else the end
    np.minimum.at(first, log_item, log_time)
    created_days = np.where(np.isnan(created), first, (created - t0) / 86400).astype(np.float32)
    return Dataset(
        name=f"files:{d.name}", tasks=tuple(tasks), user_ids=user_ids, item_ids=item_ids,
        user_profile=profile, profile_fields=tuple(fields) or ("none",), profile_cardinality=tuple(card),
        context_fields=ctx_fields, context_cardinality=ctx_card,
        item_category=category, n_categories=n_categories, item_author=author, n_authors=n_authors,
        item_content=content, item_created=created_days,
        log_user=np.array([u_index[u] for u in r_user[order].tolist()], np.int32), log_item=log_item,
        log_time=log_time, log_position=position[order].astype(np.int16),
        log_context=ctx[order].astype(np.int32), log_labels=labels[order].astype(np.int8),
        t_history=history_frac * t_end, t_valid=(1 - valid_frac) * t_end, t_end=t_end, implicit=implicit)


def _unique(t: _Table, col: str, ids: np.ndarray) -> None:
    _, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = ids[first[counts > 1]]
        rows = np.flatnonzero(np.isin(ids, dup))
        raise t.fail(col, int(rows[1]) if rows.size > 1 else int(rows[0]), f"'{ids[rows[1]]}' appears twice")


def _content(t: _Table, category: np.ndarray, n_categories: int) -> np.ndarray:
    """float32 [n, C]: a list column `content`, columns content_0.., or the category one-hot."""
    if t.has(CONTENT):
        a = t.col(CONTENT)
        if not pa.types.is_list(a.type) and not pa.types.is_large_list(a.type):
            raise DataFileError(f"{t.path}: column '{CONTENT}': a list of numbers per item (Parquet), or columns "
                                f"content_0, content_1, ... (CSV)")
        lengths = pc.list_value_length(a).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != lengths[0]) if lengths.size else []
        if len(bad):
            raise t.fail(CONTENT, int(bad[0]), f"{lengths[bad[0]]} values where the first row has {lengths[0]}")
        v = pc.list_flatten(a).cast(pa.float64()).to_numpy(zero_copy_only=False).reshape(t.n, -1)
    else:
        cols = sorted((c for c in t.t.column_names if re.fullmatch(rf"{CONTENT}_\d+", c)),
                      key=lambda c: int(c.rsplit("_", 1)[1]))
        if not cols:
            return np.eye(n_categories, dtype=np.float32)[category]
        v = np.stack([t.numbers(c) for c in cols], axis=1)
    bad = np.argwhere(~np.isfinite(v))
    if bad.size:
        raise t.fail(CONTENT, int(bad[0][0]), "not finite")
    return v.astype(np.float32)
