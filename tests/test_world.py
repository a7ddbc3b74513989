"""The synthetic world: deterministic, fills the Dataset contract, and its truth is learnable."""
import dataclasses

import numpy as np
import pytest

from engine.core.sections import DataConfig
from model_export.dataset import Dataset
from model_export.world import COLD_WINDOW, _categories, _items, make_world

CFG = DataConfig()   # the tiny defaults: 2000 users, 5000 items, 100 impressions per user


@pytest.fixture(scope="module")
def world() -> Dataset:
    return make_world(CFG)


def arrays(ds: Dataset) -> dict[str, np.ndarray]:
    return {f.name: getattr(ds, f.name) for f in dataclasses.fields(ds)
            if isinstance(getattr(ds, f.name), np.ndarray)}


def test_same_seed_identical_other_seed_differs(world):
    again = arrays(make_world(CFG))
    for name, a in arrays(world).items():
        assert a.dtype == again[name].dtype and a.tobytes() == again[name].tobytes(), name
    other = make_world(dataclasses.replace(CFG, seed=CFG.seed + 1))
    assert not np.array_equal(other.item_content, world.item_content)
    assert len(other.log_item) != len(world.log_item) or not np.array_equal(other.log_item, world.log_item)


def test_contract_shapes_and_dtypes(world):
    n, u, i = len(world.log_user), world.n_users, world.n_items
    expect = {"user_ids": ("U", (u,)), "item_ids": ("U", (i,)), "user_profile": (np.int32, (u, 3)),
              "item_category": (np.int32, (i,)), "item_author": (np.int32, (i,)),
              "item_content": (np.float32, (i, CFG.content_dim)), "item_created": (np.float32, (i,)),
              "log_user": (np.int32, (n,)), "log_item": (np.int32, (n,)), "log_time": (np.float32, (n,)),
              "log_position": (np.int16, (n,)), "log_context": (np.int32, (n, 2)),
              "log_labels": (np.int8, (n, 3))}
    for name, (dtype, shape) in expect.items():
        a = getattr(world, name)
        assert (a.dtype.kind == "U" if dtype == "U" else a.dtype == dtype), name
        assert a.shape == shape, name
    assert (u, i) == (CFG.n_users, CFG.n_items) and world.user_ids[5] == "u5" and world.item_ids[7] == "i7"
    assert world.tasks == ("click", "like", "finish")
    assert abs(n / u - CFG.impressions_per_user) < 0.1 * CFG.impressions_per_user
    assert (world.user_profile < np.array(world.profile_cardinality)).all() and (world.user_profile >= 0).all()
    assert (world.log_context < np.array(world.context_cardinality)).all() and (world.log_context >= 0).all()
    assert world.item_category.max() < world.n_categories and world.item_author.max() < world.n_authors


def test_log_sorted_split_and_causal(world):
    t = world.log_time
    assert (np.diff(t) >= 0).all() and t[0] >= 0 and t[-1] < world.t_end
    assert 0 < world.t_history < world.t_valid < world.t_end == CFG.days
    windows = [world.window(0, world.t_history), world.window(world.t_history, world.t_valid),
               world.window(world.t_valid, world.t_end)]
    assert sum(len(w) for w in windows) == len(t) and all(len(w) for w in windows)
    assert (t >= world.item_created[world.log_item]).all()          # never shown before creation
    shown = np.stack([world.log_user, world.log_item, t.view(np.int32)], axis=1)
    assert len(np.unique(shown, axis=0)) == len(t)                  # no item twice in one session


def test_cold_items_exist_without_interactions(world):
    shown = np.bincount(world.log_item, minlength=world.n_items) > 0
    late = (world.item_created > world.t_end - COLD_WINDOW) & (world.item_created <= world.t_end)
    assert (late & ~shown).sum() >= round(CFG.cold_share * CFG.n_items)
    assert (world.item_created <= world.t_end).all()                 # every item is servable at t_end
    assert shown.mean() > 0.8


def test_labels_consistent_and_rates_sane(world):
    click, like, finish = world.log_labels.T.astype(bool)
    assert not (like & ~click).any() and not (finish & ~click).any()
    assert 0.05 < click.mean() < 0.15
    assert 0.2 < like.sum() / click.sum() < 0.7 and 0.2 < finish.sum() / click.sum() < 0.7


def test_truth_is_probabilities_and_discriminates(world):
    p = world.truth.probs(world.log_user, world.log_item)
    assert p.dtype == np.float32 and p.shape == (len(world.log_user), 3)
    assert (p >= 0).all() and (p <= 1).all()
    assert (p[:, 1] <= p[:, 0]).all() and (p[:, 2] <= p[:, 0]).all()
    for t in range(3):
        y = world.log_labels[:, t].astype(bool)
        assert p[y, t].mean() > 1.3 * p[~y, t].mean(), world.tasks[t]
    u = int(world.log_user[0])
    full = world.truth.user_probs(u)
    assert full.shape == (world.n_items, 3) and full.dtype == np.float32
    some = np.arange(0, world.n_items, 97)
    np.testing.assert_allclose(full[some], world.truth.probs(np.full(len(some), u), some), rtol=1e-5, atol=1e-7)
    # the logging policy is informative: shown items beat the catalog average
    assert p[:, 0].mean() > 1.5 * world.truth.user_probs(u)[:, 0].mean()


def test_default_size_catalog_has_enough_categories_and_authors():
    cfg = DataConfig(n_users=20_000, n_items=100_000, n_categories=32, n_authors=2000)
    rng = np.random.default_rng(cfg.seed)
    items = _items(rng, cfg, *_categories(rng, cfg))
    assert len(np.unique(items["category"])) >= 20 and len(np.unique(items["author"])) >= 1000
    assert items["cold"].sum() == round(cfg.cold_share * cfg.n_items)


def test_utility_bound_orders_what_the_log_can_estimate():
    """world_bounds utility: the oracle is 1, each part estimated from the log loses some of it,
    both estimated lose more, and the estimates carry real signal (well above a uniform list's 0)."""
    from model_export.world_bounds import utility
    out = utility("configs/tiny.toml", n_users=60)
    assert out["oracle utility_norm"] == pytest.approx(1.0)
    one = (out["quality from counters utility_norm"], out["taste from history content utility_norm"])
    assert all(0.3 < x < 0.95 for x in one), out
    assert 0.1 < out["both from the log utility_norm"] < min(one), out
    assert 0.1 < out["quality R2 from counters"] < 0.6 and 0.3 < out["corr(history content similarity, taste), users with a positive"] < 0.9
