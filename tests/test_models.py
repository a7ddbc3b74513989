"""model_export: the four models learn something real on the tiny world, the ONNX graphs match
torch (in the build and again in a torch-free process), and torch and featurize build the same inputs."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.core.bundle import load_bundle
from engine.core.config import load_config
from engine.core.featurize import item_tower_input, one_hot, user_tower_input
from model_export.models import CoarseDNN, MMoE, load_checkpoints
from model_export.train import auc

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return load_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def torch_models(tiny_bundle, bundle) -> dict[str, torch.nn.Module]:
    return load_checkpoints(tiny_bundle / "checkpoints" / bundle.version)


# ------------------------------------------------------------------ unit: no bundle needed

def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    y, s = rng.random(300) < 0.3, np.round(rng.random(300), 1)       # rounding makes ties
    pos, neg = s[y], s[~y]
    want = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size)
    assert auc(y, s) == pytest.approx(want)


def _ranker_inputs(n: int, du: int = 20, di: int = 14, d: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, du)).astype(np.float32), rng.standard_normal((n, di)).astype(np.float32),
            rng.standard_normal((n, 5, d)).astype(np.float32), (rng.random((n, 5)) < 0.6).astype(np.float32))


def test_rankers_broadcast_one_user_row_over_candidates():
    user, item, seq, mask = (torch.from_numpy(a) for a in _ranker_inputs(7))
    mask[0] = 0                                                          # an empty history
    dnn, fine = CoarseDNN(20, 14, 8, [16]).eval(), MMoE(20, 14, 8, 3, 2, [16, 8], [4]).eval()
    with torch.no_grad():
        one = dnn(user[:1], item)
        assert one.shape == (7,)
        assert torch.allclose(one, dnn(user[:1].expand(7, -1), item))
        probs = fine(user[:1], item, seq[:1], mask[:1])
        assert probs.shape == (7, 3) and torch.isfinite(probs).all()
        assert torch.allclose(probs, fine(user[:1].expand(7, -1), item, seq[:1].expand(7, -1, -1),
                                          mask[:1].expand(7, -1)), atol=1e-6)
        assert torch.isfinite(fine(user, item, seq, mask)).all()


# ------------------------------------------------------------------ the tiny bundle's models

def test_two_tower_beats_random_and_popularity(bundle):
    m = bundle.manifest["metrics"]["two_tower"]
    assert m["recall@100"] > 3 * m["random_recall@100"]
    assert m["recall@100"] > m["popular_recall@100"]


@pytest.mark.parametrize("model", ["coarse_trees", "coarse_dnn", "fine"])
def test_rankers_beat_chance(bundle, model):
    m = bundle.manifest["metrics"][model]
    assert m[f"auc_{bundle.tasks[0]}"] > 0.7
    if model == "fine":
        assert {k for k in m if k.startswith("auc_")} == {f"auc_{t}" for t in bundle.tasks}
        assert min(v for k, v in m.items() if k.startswith("auc_")) > 0.7


@pytest.mark.parametrize("model", ["coarse_dnn", "fine"])
def test_rankers_learn_the_worlds_examination_curve_apart(bundle, model):
    """The tiny world's log clicks an item in slot p with (1 + p) ** -0.35 of its chance in slot 0;
    the rankers' examination curves (model_export.position) fall the same way."""
    m = bundle.manifest["metrics"][model]
    got = [m[f"exam@{p}"] for p in (1, 4, 9)]
    assert got[0] > got[1] > got[2]
    for p, e in zip((1, 4, 9), got):
        assert abs(e - (1 + p) ** -0.35) < 0.15, (p, e)


@pytest.fixture(scope="module")
def tol(tiny_config) -> float:
    return load_config(tiny_config).train.parity_tol


def test_build_parity_within_tolerance(bundle, tol):
    for name in ("user_tower", "item_tower", "coarse_dnn", "fine"):
        assert bundle.manifest["models"][name]["parity_max_abs_diff"] <= tol, name


def test_featurize_matches_torch_inputs(bundle, torch_models):
    """The exported tables are the trained ones (unseen rows zeroed), and featurize gathers from them
    exactly the vectors the torch model computes."""
    tt, t = copy.deepcopy(torch_models["two_tower"]), bundle.tables
    cat, auth = (np.load(bundle.file(f"tables/{n}.npy")) for n in ("category_emb", "author_emb"))
    for table, emb in ((t.user_id_emb, tt.user_id), (t.item_id_emb, tt.item_id), (cat, tt.category),
                       (auth, tt.author)):
        w, seen = emb.weight.detach().numpy(), np.abs(table).sum(1) > 0
        assert seen.sum() > 0
        np.testing.assert_array_equal(table[seen], w[seen])
        emb.weight.data = torch.from_numpy(np.array(table))          # serve-time view: unseen rows zero
    users = np.arange(64)
    recent = np.array(bundle.state.user_recent[users])
    ctx = np.zeros((users.size, len(t.context_cardinality)), np.int32)
    onehots = np.concatenate([one_hot(t.user_profile[users], t.profile_cardinality),
                              one_hot(ctx, t.context_cardinality)], 1)
    items = np.arange(len(t.item_emb))
    keep = (np.abs(t.item_id_emb).sum(1) > 0).astype(np.float32)
    assert 0 < keep.sum() < keep.size                  # cold items exist and have zero id rows
    with torch.no_grad():
        got = tt.user_input(torch.from_numpy(users), torch.ones(users.size), torch.from_numpy(onehots),
                            torch.from_numpy(recent).long(), torch.from_numpy(np.array(t.item_content))).numpy()
        got_i = tt.item_input(torch.from_numpy(items), torch.from_numpy(keep),
                              torch.from_numpy(np.array(t.item_category)).long(),
                              torch.from_numpy(np.array(t.item_author)).long(),
                              torch.from_numpy(np.array(t.item_content))).numpy()
        emb = tt.item_tower(torch.from_numpy(got_i)).numpy()
    np.testing.assert_allclose(got, user_tower_input(t, users, t.user_profile[users], ctx, recent), atol=1e-6)
    np.testing.assert_allclose(got_i, item_tower_input(t, cat, auth, items), atol=1e-6)
    np.testing.assert_allclose(emb, t.item_emb, atol=1e-4)        # the shipped catalog embeddings


_TORCH_FREE = r"""
import sys
import lightgbm as lgb
import numpy as np
import onnxruntime as ort
from engine.core import featurize as fz
from engine.core.bundle import load_bundle
from engine.core.config import load_config
from indexes import load_index

b = load_bundle(sys.argv[1])
t, st, m = b.tables, b.state, b.manifest
run = lambda n, feeds: ort.InferenceSession(str(b.file(f"models/{n}.onnx")),
                                            providers=["CPUExecutionProvider"]).run(None, feeds)[0]
users = np.array([0, 1, 2, 3])
ctx = np.zeros((4, len(t.context_cardinality)), np.int32)
recent = np.asarray(st.user_recent[users])
user_x = fz.user_tower_input(t, users, t.user_profile[users], ctx, recent)
user_e = run("user_tower", {"x": user_x})
index = load_index(b.file("index/items.faiss"), nprobe=m["index"]["nprobe"])
scores, items = index.search(user_e[:1], 50)
items = items[0]
item_x = fz.item_tower_input(t, np.load(b.file("tables/category_emb.npy")),
                             np.load(b.file("tables/author_emb.npy")), items)
item_e = np.asarray(t.item_emb[items])
coarse = fz.coarse_features(t, items, user_e[:1], item_e, recent[:1], st.user_n_imp[:1], st.user_n_pos[:1],
                            st.item_n_imp[items], st.item_n_pos[items], st.item_hot[items], ctx[:1], m["time"]["t_end"],
                            fz.i2i_scores(t.i2i, recent[:1]).lookup(items))
user = fz.ranker_user_input(t, user_e[:1], t.user_profile[:1], ctx[:1])
item = fz.ranker_item_input(item_e, coarse)
seq, mask = fz.sequence_input(t, recent[:1])
out = dict(user_x=user_x, user_e=user_e, scores=scores[0], item_x=item_x, item_e=item_e,
           item_tower=run("item_tower", {"x": item_x}), user=user, item=item, seq=seq, seq_mask=mask,
           p=run("coarse_dnn", {"user": user, "item": item}),
           probs=run("fine", {"user": user, "item": item, "seq": seq, "seq_mask": mask}),
           trees=lgb.Booster(model_file=str(b.file("models/coarse_trees.txt"))).predict(coarse))
assert "torch" not in sys.modules, "serving path imported torch"
np.savez(sys.argv[2], **out)
"""


def test_onnx_parity_in_a_torch_free_process(tiny_bundle, bundle, torch_models, tol, tmp_path):
    """Serving-shaped inputs from the bundle alone, run without torch; torch re-scores them from checkpoints."""
    out = tmp_path / "served.npz"
    subprocess.run([sys.executable, "-c", _TORCH_FREE, str(tiny_bundle), str(out)], cwd=ROOT, check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    s = dict(np.load(out))
    tt, dnn, fine = torch_models["two_tower"], torch_models["coarse_dnn"], torch_models["fine"]
    f = {k: torch.from_numpy(v) for k, v in s.items()}
    with torch.no_grad():
        np.testing.assert_allclose(s["user_e"], tt.user_tower(f["user_x"]).numpy(), atol=tol)
        np.testing.assert_allclose(s["item_tower"], tt.item_tower(f["item_x"]).numpy(), atol=tol)
        np.testing.assert_allclose(s["p"], dnn(f["user"], f["item"]).numpy(), atol=tol)
        np.testing.assert_allclose(s["probs"], fine(f["user"], f["item"], f["seq"], f["seq_mask"]).numpy(), atol=tol)
    np.testing.assert_allclose(s["item_tower"], s["item_e"], atol=tol)        # shipped embeddings = the tower's
    np.testing.assert_allclose(s["scores"], s["item_e"] @ s["user_e"][0], atol=1e-4)  # faiss inner products
    assert s["p"].shape == (50,) and s["probs"].shape == (50, len(bundle.tasks))
    assert ((s["trees"] > 0) & (s["trees"] < 1)).all()
