"""One entry point from a DataConfig to a Dataset, whatever the source."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from engine.core.sections import DataConfig
from model_export.dataset import Dataset
from model_export.movielens import default_movielens_dir, load_movielens
from model_export.world import make_world


def load_dataset(cfg: DataConfig) -> Dataset:
    """The synthetic world for cfg.seed, MovieLens from cfg.movielens_dir (default: the fetch cache), or
    your own files from cfg.files_dir (model_export.files: checked whole before anything is built);
    split as cfg.split says (model_export.dataset)."""
    if cfg.source == "synthetic":
        ds = make_world(cfg)
    elif cfg.source == "movielens":
        directory = Path(cfg.movielens_dir) if cfg.movielens_dir else default_movielens_dir()
        try:
            ds = load_movielens(directory, cfg.history_frac, cfg.valid_frac)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}; run `recserve data fetch movielens-100k` to download it") from None
    elif cfg.source == "files":
        from model_export.files import load_files

        ds = load_files(cfg.files_dir, cfg.history_frac, cfg.valid_frac)
    else:
        raise ValueError(f"data.source: unknown source '{cfg.source}' (synthetic | movielens | files)")
    return dataclasses.replace(ds, split=cfg.split, held_out=cfg.held_out)
