"""Training data views built on the tiny bundle: cold views of ranker rows (model_export.cold_rows)
and cascade samples for distillation (model_export.distill): each checked against what the
serving featurizer and the exported models compute."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine.core.bundle import load_bundle
from engine.core.config import load_config
from engine.core.featurize import COARSE_FEATURES, CTR_PRIOR_IMP, CTR_PRIOR_POS, sequence_input
from engine.core.state import snapshot
from model_export import cascade, cold_rows, distill, train
from model_export.data import load_dataset
from model_export.export import ort_session
from model_export.models import load_checkpoints

COL = {n: k for k, n in enumerate(COARSE_FEATURES)}


@dataclasses.dataclass
class World:
    ds: object
    cfg: object
    tables: object
    tt_tables: dict
    st: object
    user_emb: object
    item_emb: object
    fine: torch.nn.Module
    rank_rows: np.ndarray
    schema: dict


@pytest.fixture(scope="module")
def world(tiny_bundle) -> World:
    b = load_bundle(tiny_bundle)
    cfg = load_config(b.config_path)
    ds = load_dataset(cfg.data)
    st = snapshot(ds.log_user, ds.log_item, ds.log_time, ds.log_labels[:, 0], ds.n_users, ds.n_items, ds.t_history,
                  cfg.train.recent_len, cfg.serving.seen_window, cfg.serving.hot_half_life_hours / 24)
    tt_tables = {k: np.load(b.file(f"tables/{k}.npy")) for k in ("item_id_emb", "category_emb", "author_emb")}
    tables = dataclasses.replace(b.tables, item_emb=np.array(b.tables.item_emb))
    user_s, item_s = (ort_session(b.file(f"models/{n}.onnx")) for n in ("user_tower", "item_tower"))
    fine = load_checkpoints(tiny_bundle / "checkpoints" / b.version)["fine"]
    return World(ds, cfg, tables, tt_tables, st, lambda x: user_s.run(None, {"x": x})[0],
                 lambda x: item_s.run(None, {"x": x})[0], fine, ds.rank.rows, b.manifest["schema"])


# ------------------------------------------------------------------ cold views of ranker rows

def test_content_only_embeds_like_an_item_without_id_row(world):
    cold = cold_rows.content_only(world.tables, world.tt_tables, world.item_emb)
    no_id = np.abs(world.tables.item_id_emb).sum(1) == 0
    assert 0 < no_id.sum() < no_id.size
    # an item the two-tower never trained on already embeds from content: its view is unchanged
    np.testing.assert_allclose(cold.item_emb[no_id], world.tables.item_emb[no_id], atol=1e-5)
    moved = np.abs(cold.item_emb[~no_id] - world.tables.item_emb[~no_id]).max(1)
    assert np.mean(moved > 1e-3) > 0.9
    assert cold.item_id_emb is world.tables.item_id_emb          # user towers still pool the id rows


def _masked(world, n: int, share: float, seed: int):
    """The first n rank rows as built (real) and with a share of them given the cold view."""
    rows = world.rank_rows[:n]
    real = train.ranker_rows(world.ds, world.tables, rows, world.st, world.user_emb, "real")
    view = train.ranker_rows(world.ds, world.tables, rows, world.st, world.user_emb, "view")
    cold = cold_rows.content_only(world.tables, world.tt_tables, world.item_emb)
    picked = cold_rows.mask_history(world.ds, view, rows, cold, world.st, world.user_emb, share,
                                    np.random.default_rng(seed))
    return rows, real, view, cold, picked


def test_masked_rows_look_like_a_new_item_at_serving(world):
    rows, real, view, cold, picked = _masked(world, 400, 1.0, 0)
    assert picked.size == rows.size
    d = world.tables.item_emb.shape[1]
    items = world.ds.log_item[rows]
    np.testing.assert_allclose(view.item[:, :d], cold.item_emb[items], atol=1e-6)
    f, f_real = view.item[:, d:], real.item[:, d:]
    assert (f[:, COL["item_log_imp"]] == 0).all() and (f[:, COL["item_log_hot"]] == 0).all()
    np.testing.assert_allclose(f[:, COL["item_ctr"]], CTR_PRIOR_POS / CTR_PRIOR_IMP)
    np.testing.assert_allclose(f[:, COL["tt_score"]], np.einsum("nd,nd->n", real.user[:, :d], cold.item_emb[items]),
                               atol=1e-5)
    kept = [COL[n] for n in ("item_age_days", "user_log_imp", "user_ctr", "cat_affinity", "author_affinity",
                             "content_sim", "hour", "device")]
    np.testing.assert_array_equal(f[:, kept], f_real[:, kept])
    np.testing.assert_array_equal(view.user, real.user)
    np.testing.assert_array_equal(view.labels, real.labels)


def test_mask_history_replaces_the_drawn_share_only(world):
    rows, real, view, cold, picked = _masked(world, 500, 0.3, 1)
    assert picked.size == 150 and np.unique(picked).size == 150
    other = np.setdiff1d(np.arange(rows.size), picked)
    np.testing.assert_array_equal(view.item[other], real.item[other])
    assert (view.item[picked, world.tables.item_emb.shape[1] + COL["item_log_imp"]] == 0).all()


# ------------------------------------------------------------------ cascade samples

def test_listwise_loss_is_the_cross_entropy_to_the_teachers_softmax():
    rng = np.random.default_rng(0)
    s, t = (torch.from_numpy(rng.standard_normal((4, 7)).astype(np.float32)) for _ in range(2))
    want = -(torch.softmax(t, 1) * torch.log_softmax(s, 1)).sum(1).mean()
    torch.testing.assert_close(distill.listwise_loss(s, t), want)
    # the student matching the teacher up to a shift per user is the minimum
    assert distill.listwise_loss(t + 3.0, t) < distill.listwise_loss(s, t)


def _fusion(world):
    from stages.rerank_beam import fuse
    p = world.cfg.stage["rerank"][1]
    return lambda probs: fuse({n: probs[:, j] for j, n in enumerate(world.ds.tasks)}, p.weights, p.fusion, p.eps)


def _samples(world, n_users, rng):
    return distill.cascade_samples(world.ds, world.cfg, world.tables, world.schema, world.user_emb, world.ds.rank,
                                   world.fine.eval(), _fusion(world), n_users, rng)


def test_cascade_keeps_the_teachers_best_of_the_served_recall_scored_like_the_served_fine_model(world, tiny_bundle):
    c = _samples(world, 40, np.random.default_rng(0))
    g = distill.TOP + distill.OTHERS
    assert c.group == g and len(c.users) == len(c.user) > 0
    assert c.item.shape[0] == len(c.user) * g and c.teacher.shape == (len(c.user), g)
    # the first TOP are the teacher's best, best first, and beat every other kept candidate
    assert (np.diff(c.teacher[:, :distill.TOP], axis=1) <= 0).all()
    assert (c.teacher[:, distill.TOP - 1] >= c.teacher[:, distill.TOP:].max(1)).all()
    # every kept candidate is one the config's routes and filters recall for that user at their cut
    rec, states = cascade.recall(world.ds, world.cfg, world.tables, world.schema, world.user_emb, world.ds.rank,
                                 c.users)
    d = world.tables.item_emb.shape[1]
    for k in range(len(c.users)):
        got = c.item[k * g:(k + 1) * g, :d]
        want = world.tables.item_emb[rec.item[rec.row == k]]
        assert (np.abs(got[:, None, :] - want[None]).max(2) < 1e-6).any(1).all()
    # the teacher's values are the served fine model's (ONNX), fused as the rerank fuses them
    sess = ort_session(load_bundle(tiny_bundle).file("models/fine.onnx"))
    seq, mask = sequence_input(world.tables, states.recent[:1])
    probs = sess.run(None, {"user": c.user[:1], "item": c.item[:g], "seq": seq, "seq_mask": mask})[0]
    np.testing.assert_allclose(np.log(_fusion(world)(probs)), c.teacher[0], atol=1e-4)
    np.testing.assert_allclose(probs, c.probs[0], atol=1e-4)
    # candidate rows carry the coarse features the rank_trees stage computes
    assert np.isfinite(c.item).all() and (c.item[:, d + COL["item_log_imp"]] >= 0).all()
    x, y = c.soft_rows()
    assert x.shape == (len(c.item), len(COARSE_FEATURES)) and ((y >= 0) & (y <= 1)).all()


def test_distillation_makes_the_coarse_dnn_agree_with_the_fine_ranker(world):
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(world.rank_rows, 20_000, replace=False))
    tr = train.ranker_rows(world.ds, world.tables, rows, world.st, world.user_emb, "train")
    c = _samples(world, 400, rng)
    got = {}
    for w in (0.0, 1.0):
        cfg = dataclasses.replace(world.cfg.train, distill_weight=w, dnn_epochs=2)
        torch.manual_seed(0)
        _, metrics = train.fit_coarse_dnn(tr, tr, world.tables.item_emb.shape[1], "click", cfg,
                                          lambda m: distill.Listwise(m, c, len(tr.user), cfg))
        got[w] = metrics["teacher_top10_in_top10"]
    assert got[1.0] > got[0.0] + 0.05, got
