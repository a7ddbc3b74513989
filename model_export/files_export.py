"""`recserve data export`: any Dataset (MovieLens, a synthetic world) written in the files format
of model_export.files, so that `data.source = "files"` over the export loads the same Dataset
(docs/data.md, the worked example; tests/test_files.py checks it array for array).

Categorical fields are written as their integer codes and `ctx_*`, `created` and the content
vector explicitly, so nothing is re-derived differently on the way back. Times: day 0 of the
log is placed at EPOCH (the Dataset keeps days, not the original unix times).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from model_export.dataset import Dataset
from model_export.files import CONTENT, CTX, LABEL

EPOCH = 1_000_000_000.0      # 2001-09-09 UTC: unix time of day 0


def export_dataset(ds: Dataset, out: str | Path, fmt: str = "parquet") -> list[Path]:
    """Write interactions, items and users to `out` (.parquet, or .csv with content_0.. columns)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unix = lambda days: EPOCH + days.astype(np.float64) * 86400    # noqa: E731
    inter = {"user_id": ds.user_ids[ds.log_user], "item_id": ds.item_ids[ds.log_item], "timestamp": unix(ds.log_time)}
    inter |= {LABEL + t: ds.log_labels[:, k].astype(np.int8) for k, t in enumerate(ds.tasks)}
    if not ds.implicit:
        inter["position"] = ds.log_position.astype(np.int16)
    inter |= {CTX + f: ds.log_context[:, k] for k, f in enumerate(ds.context_fields)}
    items = {"item_id": ds.item_ids, "category": ds.item_category, "author": ds.item_author,
             "created": unix(ds.item_created)}
    users = {"user_id": ds.user_ids} | {f: ds.user_profile[:, k] for k, f in enumerate(ds.profile_fields)}
    paths = []
    for name, cols in (("interactions", inter), ("items", items), ("users", users)):
        table = pa.table({k: pa.array(v) for k, v in cols.items()})
        if name == "items":
            table = _with_content(table, ds.item_content, fmt)
        path = out / f"{name}.{fmt}"
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(table, path)
        else:
            import pyarrow.csv as pv

            pv.write_csv(table, path)
        paths.append(path)
    return paths


def _with_content(table: pa.Table, content: np.ndarray, fmt: str) -> pa.Table:
    c = np.ascontiguousarray(content, np.float32)
    if fmt == "parquet":
        return table.append_column(CONTENT, pa.FixedSizeListArray.from_arrays(pa.array(c.reshape(-1)), c.shape[1])
                                   .cast(pa.list_(pa.float32())))
    for k in range(c.shape[1]):
        table = table.append_column(f"{CONTENT}_{k}", pa.array(c[:, k]))
    return table
