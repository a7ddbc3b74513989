"""Position bias learnt apart from relevance (model_export.position): the loss, the first guess of
the curve, and a fit on lists whose order depends on relevance, where raw labels mislead."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model_export.position import Examination, label_loss


def test_without_slots_the_loss_is_plain_log_loss():
    logits, y = torch.randn(50, 3), (torch.rand(50, 3) < 0.3).float()
    assert torch.allclose(label_loss(logits, y, None), F.binary_cross_entropy_with_logits(logits, y, reduction="none"))


def test_with_slots_the_loss_is_the_log_loss_of_examined_times_relevant():
    exam = Examination(4)
    logits, y = torch.randn(40, 2), (torch.rand(40, 2) < 0.3).float()
    slot = torch.randint(0, 6, (40,))                         # 4 and 5 share slot 3's examination
    e = torch.tensor([1.0, *exam.curve()[1:]])[slot.clamp(max=3)][:, None]
    p = torch.sigmoid(logits) * e
    want = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
    assert torch.allclose(label_loss(logits, y, exam.log_prob(slot)), want, atol=1e-5)
    assert exam.curve()[0] == 1.0


def test_first_guess_is_each_slots_rate_over_the_first_when_order_ignores_relevance():
    rng = np.random.default_rng(0)
    truth = (1.0 + np.arange(10)) ** -0.35
    slot = rng.integers(0, 10, 400_000)
    clicked = rng.random(slot.size) < 0.1 * truth[slot]
    exam = Examination(12)
    exam.start_from(slot, clicked)
    curve = np.array(exam.curve())
    assert np.abs(curve[:10] - truth).max() < 0.03
    assert curve[10] == pytest.approx(curve[9], abs=0.02) and curve[11] == pytest.approx(curve[10])   # unseen: copied


def test_fit_separates_position_from_relevance_when_the_best_items_are_shown_first():
    """Lists ordered by relevance: raw labels make low slots look worse than their examination
    alone does; the curve fitted beside a relevance model recovers the true examination."""
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    n_lists, k = 20_000, 8
    x = rng.standard_normal((n_lists, k)).astype(np.float32)
    x = -np.sort(-x, axis=1)                                  # the best item first in every list
    truth = (1.0 + np.arange(k)) ** -0.35
    rel = 1 / (1 + np.exp(-(1.5 * x - 1.5)))
    y = (rng.random((n_lists, k)) < rel * truth).astype(np.float32).reshape(-1)
    slot = np.tile(np.arange(k), n_lists)
    naive = np.array([y[slot == p].mean() for p in range(k)]) / y[slot == 0].mean()

    w = torch.nn.Linear(1, 1)
    exam = Examination(k)
    opt = torch.optim.Adam([*w.parameters(), *exam.parameters()], lr=0.02)
    xt, yt, st = torch.from_numpy(x.reshape(-1, 1)), torch.from_numpy(y), torch.from_numpy(slot)
    for _ in range(1200):
        opt.zero_grad()
        label_loss(w(xt).squeeze(1), yt, exam.log_prob(st)).mean().backward()
        opt.step()
    curve = np.array(exam.curve())
    assert naive[-1] < truth[-1] - 0.2                        # raw labels: the last slot looks far worse
    assert np.abs(curve - truth).max() < 0.06
    assert w.weight.item() == pytest.approx(1.5, abs=0.25)


@pytest.mark.parametrize("on", [False, True])
def test_the_streaming_trainer_trains_the_curve_only_when_told(tmp_path, on):
    """`stream.position_bias`: the loop's samples train the examination curve or leave it be."""
    from engine.core.sections import StreamConfig
    from model_export.models import CoarseDNN
    from model_export.stream.rankers import RankerLearner
    from model_export.stream.samples import Samples
    from model_export.train import RankerRows

    rng = np.random.default_rng(0)
    n, du, di = 2048, 6, 10
    model = CoarseDNN(du, di, 4, [8], positions=8)
    before = model.exam.raw.detach().clone()
    rows = RankerRows(rng.standard_normal((n, du)).astype(np.float32), rng.standard_normal((n, di)).astype(np.float32),
                      np.full((n, 3), -1, np.int32), (rng.random((n, 1)) < 0.2).astype(np.float32),
                      rng.integers(0, 8, n).astype(np.int16))
    samples = Samples(rows, np.zeros(n, np.int32), np.zeros(n, np.int32), np.array(["v"] * n))
    learner = RankerLearner(tmp_path, {"coarse_dnn": model}, StreamConfig(models=["coarse_dnn"], position_bias=on),
                            ("click",))
    learner.train(samples, seq=None, rng=rng)
    moved = not torch.equal(model.exam.raw.detach(), before)
    assert moved == on
