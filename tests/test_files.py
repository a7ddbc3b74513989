"""`data.source = "files"`: the round trip of the export, the checks that name file, column and
first bad row, and a bad file that leaves no half-built bundle behind."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.csv as pv
import pyarrow.parquet as pq
import pytest

from engine.core.config import load_config

from engine.core.sections import DataConfig
from model_export.data import load_dataset
from model_export.files import DataFileError, load_files
from model_export.files_export import export_dataset
from model_export.movielens import default_movielens_dir, load_movielens


def assert_same(a, b, skip=("name", "truth")) -> None:
    for f in dataclasses.fields(a):
        if f.name in skip:
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), f.name
        else:
            assert x == y, f.name


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_movielens_exported_to_files_loads_as_the_same_dataset(tmp_path, fmt):
    """The worked example of docs/data.md: the same arrays, so the same bundle."""
    if not (default_movielens_dir() / "ml-100k.inter").is_file() and not (default_movielens_dir() / "u.data").is_file():
        pytest.skip("MovieLens-100k is not cached: recserve data fetch movielens-100k")
    ml = load_movielens(default_movielens_dir())
    export_dataset(ml, tmp_path, fmt)
    got = load_dataset(DataConfig(source="files", files_dir=str(tmp_path)))
    assert_same(ml, got)
    assert got.name == f"files:{tmp_path.name}"


def test_a_synthetic_world_round_trips_with_its_impression_log(tmp_path):
    cfg = load_config("configs/tiny.toml").data
    world = load_dataset(cfg)
    export_dataset(world, tmp_path)
    got = load_files(tmp_path, cfg.history_frac, cfg.valid_frac)
    assert not got.implicit                     # a position column: shown-and-skipped rows are negatives
    # day 0 of a files log is its first interaction, its end the last one plus an hour
    shift = float(world.log_time[0])
    assert np.allclose(got.log_time, world.log_time - shift, atol=1e-4)
    assert np.allclose(got.item_created, world.item_created - shift, atol=1e-4)
    assert_same(world, got, skip=("name", "truth", "log_time", "item_created", "t_history", "t_valid", "t_end"))


def test_without_position_the_log_is_implicit_and_defaults_fill_in(tmp_path):
    pv.write_csv(pa.table({"user_id": ["b", "a", "b"], "item_id": [10, 11, 10], "timestamp": [7200.0, 3600.0, 90000.0],
                           "label_like": [1, 0, 1]}), tmp_path / "interactions.csv")
    pq.write_table(pa.table({"item_id": ["10", "11", "12"], "category": ["drama", "comedy", "drama"],
                             "author": [3, 1, 3], "created": [None, 0.0, 1000.0]}), tmp_path / "items.parquet")
    ds = load_files(tmp_path)
    assert ds.implicit and ds.tasks == ("like",)
    assert ds.user_ids.tolist() == ["b", "a"] and ds.item_ids.tolist() == ["10", "11", "12"]
    assert ds.log_user.tolist() == [1, 0, 0] and ds.log_item.tolist() == [1, 0, 0]     # time-sorted
    assert ds.item_category.tolist() == [2, 1, 2] and ds.n_categories == 3              # 0: unknown
    assert ds.item_author.tolist() == [3, 1, 3] and ds.n_authors == 4
    assert ds.context_fields == ("hour", "device") and ds.log_context[:, 0].tolist() == [1, 2, 1]
    assert ds.item_created.tolist() == np.float32([3600 / 86400, -3600 / 86400, -2600 / 86400]).tolist()  # day 0:
    #                                                                           the first interaction; unknown: first use
    assert ds.item_content.shape == (3, 3)                                              # category one-hot
    assert ds.profile_fields == ("none",) and ds.user_profile.shape == (2, 1)


def _files(tmp_path, inter: dict, items: dict | None = None, users: dict | None = None) -> None:
    pv.write_csv(pa.table(inter), tmp_path / "interactions.csv")
    pv.write_csv(pa.table(items or {"item_id": ["i1", "i2"], "category": ["a", "b"], "author": ["x", "y"],
                                     "created": [0.0, 1.0]}), tmp_path / "items.csv")
    if users:
        pv.write_csv(pa.table(users), tmp_path / "users.csv")


GOOD = {"user_id": ["u1", "u2", "u3"], "item_id": ["i1", "i2", "i1"], "timestamp": ["10", "20", "30"],
        "label_click": ["1", "0", "1"]}


@pytest.mark.parametrize("change, items, users, expect", [
    ({"timestamp": ["10", "2x", "30"]}, None, None, r"interactions.csv: column 'timestamp', row 2 \(line 3\): '2x' is not a number"),
    ({"label_click": ["1", "0", "2"]}, None, None, r"column 'label_click', row 3 \(line 4\): 2 is not 0 or 1"),
    ({"item_id": ["i1", "i2", "nope"]}, None, None, r"column 'item_id', row 3 \(line 4\): item 'nope' is not in items.csv"),
    ({"user_id": ["u1", None, "u3"]}, None, None, r"column 'user_id', row 2 \(line 3\): empty"),
    ({"position": ["0", "-1", "2"]}, None, None, r"column 'position', row 2 \(line 3\): -1 is below 0"),
    ({"ctx_hour": ["3", "4.5", "1"]}, None, None, r"column 'ctx_hour', row 2 \(line 3\): '4.5' is not an integer"),
    ({"timestamp": None}, None, None, r"interactions.csv: missing column 'timestamp'"),
    ({"label_click": None}, None, None, r"no label column"),
    ({}, {"item_id": ["i1", "i2", "i1"], "category": ["a", "b", "c"], "author": ["x", "y", "z"],
          "created": ["0", "1", "2"]}, None, r"items.csv: column 'item_id', row 3 \(line 4\): 'i1' appears twice"),
    ({}, {"item_id": ["i1", "i2"], "category": ["a", "b"], "author": ["x", "y"], "created": ["0", "inf"]}, None,
     r"items.csv: column 'created', row 2 \(line 3\): 'inf' is not a number"),
    ({}, None, {"user_id": ["u1", "u1"], "age": ["3", "4"]}, r"users.csv: column 'user_id', row 2 \(line 3\): 'u1' appears twice"),
])
def test_a_bad_file_names_file_column_and_first_bad_row(tmp_path, change, items, users, expect):
    inter = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    _files(tmp_path, inter, items, users)
    with pytest.raises(DataFileError, match=expect):
        load_files(tmp_path)


def test_parquet_types_are_checked_too(tmp_path):
    pq.write_table(pa.table({"user_id": [1.5, 2.0], "item_id": ["i1", "i2"], "timestamp": [1.0, 2.0],
                             "label_click": [1, 0]}), tmp_path / "interactions.parquet")
    pv.write_csv(pa.table({"item_id": ["i1", "i2"], "category": ["a", "b"], "author": ["x", "y"],
                           "created": [0.0, 1.0]}), tmp_path / "items.csv")
    with pytest.raises(DataFileError, match=r"interactions.parquet: column 'user_id': ids must be strings or integers"):
        load_files(tmp_path)
    pq.write_table(pa.table({"item_id": ["i1"], "category": ["a"], "author": ["x"], "created": [0.0],
                             "content": pa.array([[1.0, 2.0]], pa.list_(pa.float32()))}), tmp_path / "items.parquet")
    with pytest.raises(DataFileError, match="both items.parquet and items.csv"):
        load_files(tmp_path)
    (tmp_path / "items.csv").unlink()
    pq.write_table(pa.table({"item_id": ["i1", "i2"], "category": ["a", "b"], "author": ["x", "y"],
                             "created": [0.0, 1.0],
                             "content": pa.array([[1.0, 2.0], [1.0]], pa.list_(pa.float32()))}), tmp_path / "items.parquet")
    pq.write_table(pa.table({"user_id": ["u1", "u2"], "item_id": ["i1", "i2"], "timestamp": [1.0, 2.0],
                             "label_click": [1, 0]}), tmp_path / "interactions.parquet")
    with pytest.raises(DataFileError, match=r"items.parquet: column 'content', row 2: 1 values where the first row has 2"):
        load_files(tmp_path)


@pytest.mark.slow
def test_a_bad_file_stops_the_build_before_anything_is_written(tmp_path):
    """`recserve build` over a broken files source: one line naming the culprit, no version."""
    from engine.cli.main import main

    (tmp_path / "data").mkdir()
    _files(tmp_path / "data", {**GOOD, "timestamp": ["10", "20", "thirty"]})
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    text = open("configs/tiny.toml").read().replace("[data]", f'[data]\nsource = "files"\nfiles_dir = "{tmp_path / "data"}"', 1)
    (cfg / "tiny.toml").write_text(text)
    for side in ("whitelist_tiny.toml", "blocklist_tiny.toml"):
        shutil.copy(f"configs/{side}", cfg / side)
    out = tmp_path / "bundles"
    assert main(["build", "--config", str(cfg / "tiny.toml"), "--out", str(out)]) == 2
    assert not out.exists() or not any(p.name != "checkpoints" for p in out.iterdir())
