"""MovieLens-100k: fetch (never committed, see TERMS) and load into the Dataset contract.

Two on-disk formats load to the same Dataset: GroupLens (`u.data`, `u.item`, `u.user`) and
recbole atomic files (`ml-100k.inter`, `.item`, `.user`), which the recbole 1.2.1 wheel on PyPI
carries — the one source pip can fetch without a browser.

The log holds ratings only, no impressions (`Dataset.implicit`): a rating is an interaction,
the first task "click" (every row is one), and "like" is rating >= 4. A server hears a rating
as the events impression + click (+ like): the feature store then keeps the rated items as the
user's seen and recent items, which the seen filter and the i2i route read.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from model_export.dataset import Dataset

TERMS = """MovieLens 100k (GroupLens Research, University of Minnesota) - terms of use:
  * research use only; no commercial use without permission;
  * do not redistribute the data (recserve never commits or ships it);
  * cite: F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and
    Context. ACM Transactions on Interactive Intelligent Systems (TiiS) 5, 4, Article 19.
  Full terms: https://files.grouplens.org/datasets/movielens/ml-100k-README.txt"""

GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
          "War", "Western")                       # GroupLens u.item flag order; category = index
AGE_EDGES = (18, 25, 35, 45, 55)                   # -> 6 buckets: <18, 18-24, ..., 55+
RECBOLE_WHEEL = "recbole==1.2.1"
TASKS = ("click", "like")                          # rated at all; rated >= 4
_WHEEL_DIR = "recbole/dataset_example/ml-100k/"

Ratings = tuple[list[str], list[str], np.ndarray, np.ndarray]   # user id, item id, rating, unix time
Items = dict[str, tuple[list[str], int | None]]                  # id -> (genres, release year)
Users = dict[str, tuple[int, str, str]]                          # id -> (age, gender, occupation)


def default_movielens_dir() -> Path:
    """`$RECSERVE_CACHE/ml-100k`, by default `~/.cache/recserve/ml-100k`."""
    return Path(os.environ.get("RECSERVE_CACHE") or Path.home() / ".cache" / "recserve") / "ml-100k"


def fetch_movielens_100k(cache_dir: Path | None = None) -> Path:
    """Download the recbole wheel with pip, keep only its ml-100k files; a no-op when cached."""
    target = Path(cache_dir) if cache_dir else default_movielens_dir()
    print(TERMS)
    if (target / "ml-100k.inter").is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", RECBOLE_WHEEL, "--no-deps", "-d", tmp],
                       check=True)
        with zipfile.ZipFile(next(Path(tmp).glob("recbole-*.whl"))) as wheel:
            names = [n for n in wheel.namelist() if n.startswith(_WHEEL_DIR) and not n.endswith("/")]
            target.mkdir(parents=True, exist_ok=True)
            for name in sorted(names, key=lambda n: n.endswith(".inter")):   # .inter last: marks complete
                (target / Path(name).name).write_bytes(wheel.read(name))
    return target


def load_movielens(directory: str | Path, history_frac: float = 0.7, valid_frac: float = 0.15) -> Dataset:
    """Load either format from `directory`, split by time like DataConfig's fractions.

    item_author is a stand-in grouping key, the release decade (plus one bucket for unknown
    years): MovieLens has no authors, and the rankers only need some item grouping field.
    Users missing from the user file get index 0 in every profile field.
    """
    directory = Path(directory)
    if (directory / "u.data").is_file():
        parsed = _read_grouplens(directory)
    elif inter := sorted(directory.glob("*.inter")):
        parsed = _read_recbole(inter[0])
    else:
        raise FileNotFoundError(f"no MovieLens data in {directory} (expected u.data or a recbole *.inter file)")
    return _build(*parsed, history_frac=history_frac, valid_frac=valid_frac)


def _read_grouplens(d: Path) -> tuple[Ratings, Items, Users]:
    r = np.array((d / "u.data").read_text().split()).reshape(-1, 4)
    items: Items = {}
    for line in _lines(d / "u.item"):
        f = line.split("|")
        year = f[2].rsplit("-", 1)[-1]
        items[f[0]] = ([g for g, flag in zip(GENRES, f[-19:]) if flag == "1"], _year(year))
    users = {f[0]: (int(f[1]), f[2], f[3]) for f in (line.split("|") for line in _lines(d / "u.user"))}
    return (list(r[:, 0]), list(r[:, 1]), r[:, 2].astype(float), r[:, 3].astype(float)), items, users


def _read_recbole(inter: Path) -> tuple[Ratings, Items, Users]:
    r = _atomic(inter)
    it, us = _atomic(inter.with_suffix(".item")), _atomic(inter.with_suffix(".user"))
    items = {i: (g.split(), _year(y)) for i, g, y in zip(it["item_id"], it["class"], it["release_year"])}
    users = {u: (int(a), g, o) for u, a, g, o in zip(us["user_id"], us["age"], us["gender"], us["occupation"])}
    return (list(r["user_id"]), list(r["item_id"]), np.array(r["rating"], float),
            np.array(r["timestamp"], float)), items, users


def _atomic(path: Path) -> dict[str, tuple[str, ...]]:
    """A recbole atomic file: tab-separated, header `name:type`; columns by name."""
    lines = _lines(path)
    names = [h.split(":")[0] for h in lines[0].split("\t")]
    rows = ((line.split("\t") + [""] * len(names))[:len(names)] for line in lines[1:])
    return dict(zip(names, zip(*rows)))


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]


def _year(s: str) -> int | None:
    return int(s) if len(s) == 4 and s.isdigit() else None


def _build(ratings: Ratings, items: Items, users: Users, history_frac: float, valid_frac: float) -> Dataset:
    r_user, r_item, rating, ts = ratings
    user_ids = _sorted_ids({*users, *r_user})
    item_ids = _sorted_ids({*items, *r_item})
    u_index = {u: i for i, u in enumerate(user_ids)}
    i_index = {t: i for i, t in enumerate(item_ids)}
    order = np.argsort(ts, kind="stable")
    log_user = np.array([u_index[r_user[k]] for k in order], np.int32)
    log_item = np.array([i_index[r_item[k]] for k in order], np.int32)
    ts = ts[order]
    log_time = ((ts - ts[0]) / 86400).astype(np.float32)
    t_end = float(log_time[-1]) + 1 / 24        # the window is half-open: keep the last rating inside it

    genre_index = {g: i for i, g in enumerate(GENRES)}
    genres = np.zeros((len(item_ids), len(GENRES)), np.float32)
    years = np.full(len(item_ids), np.nan)
    for t, (gs, year) in items.items():
        genres[i_index[t], [genre_index[g] for g in gs if g in genre_index]] = 1
        years[i_index[t]] = np.nan if year is None else year
    known = ~np.isnan(years)
    decades = np.unique(years[known] // 10)
    author = np.where(known, np.searchsorted(decades, np.nan_to_num(years) // 10), len(decades))
    year_z = np.where(known, (years - np.nanmean(years)) / (np.nanstd(years) or 1.0), 0.0)
    created = np.full(len(item_ids), t_end, np.float32)
    np.minimum.at(created, log_item, log_time)

    genders = sorted({g for _, g, _ in users.values()})
    occupations = sorted({o for _, _, o in users.values()})
    profile = np.zeros((len(user_ids), 3), np.int32)
    for u, (age, gender, occupation) in users.items():
        profile[u_index[u]] = (np.searchsorted(AGE_EDGES, age, side="right"), genders.index(gender),
                               occupations.index(occupation))
    return Dataset(
        name="movielens", tasks=TASKS, user_ids=np.array(user_ids), item_ids=np.array(item_ids),
        user_profile=profile, profile_fields=("age_bucket", "gender", "occupation"),
        profile_cardinality=(len(AGE_EDGES) + 1, max(len(genders), 1), max(len(occupations), 1)),
        context_fields=("hour", "device"), context_cardinality=(24, 1),
        item_category=genres.argmax(axis=1).astype(np.int32), n_categories=len(GENRES),
        item_author=author.astype(np.int32), n_authors=len(decades) + 1,
        item_content=np.concatenate([genres, year_z[:, None].astype(np.float32)], axis=1),
        item_created=created,
        log_user=log_user, log_item=log_item, log_time=log_time,
        log_position=np.zeros(len(log_user), np.int16),
        log_context=np.stack([(ts // 3600 % 24).astype(np.int32), np.zeros(len(ts), np.int32)], axis=1),
        log_labels=np.stack([np.ones(len(ts), np.int8), (rating[order] >= 4).astype(np.int8)], axis=1),
        t_history=history_frac * t_end, t_valid=(1 - valid_frac) * t_end, t_end=t_end, implicit=True)


def _sorted_ids(ids: set[str]) -> list[str]:
    """Numeric order for the all-digit MovieLens ids, so index i is the (i+1)-th id."""
    return sorted(ids, key=lambda s: (len(s), s))
