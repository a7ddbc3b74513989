"""The tuner's parts against known answers: the search converges on a synthetic reward's optimum,
rewards are computed per list from joined rows (corrections replace negatives, positions
discounted), CUPED cuts the variance users add without moving the gain, and a tuner loop over a
real joined folder, fed by a synthetic world whose best weights are known, moves control there,
promotes only a candidate confirmed on fresh users, rolls back a promotion its guard beats, and
resumes the round in flight after a restart."""
from __future__ import annotations

import numpy as np
import pytest

from loadtest.simulate.tune_world import World, joined_table
from model_export.tune import cuped, surrogate
from model_export.tune.cem import Search
from model_export.tune.reward import RewardSpec, list_rewards, welch
from model_export.tune.state import TuneState
from model_export.tune.tuner import Tuner, TuneSettings

OPT = np.array([1.2, 0.4])


def quadratic(x: np.ndarray) -> np.ndarray:
    return 1.0 - ((x - OPT) ** 2).sum(-1)


@pytest.mark.parametrize("method", ["cem", "es"])
def test_the_search_converges_on_a_noisy_quadratic(method):
    rng = np.random.default_rng(3)
    spread = 0.75 if method == "cem" else 0.2        # ES keeps its spread: a fine one to end close
    s = Search([2.5, 2.5], [spread, spread], [0.0, 0.0], [3.0, 3.0], method=method, min_std=0.02)
    for _ in range(80):
        x = s.sample(8, rng)
        s.update(x, quadratic(x) + rng.normal(0, 0.02, len(x)))
    assert np.abs(s.mean - OPT).max() < 0.15, s.mean
    if method == "cem":
        assert s.std.max() < 0.2


def corner(x: np.ndarray) -> np.ndarray:
    """The tiny world's shape: a plateau over most of the box, 11% better in the small-weight corner."""
    return 0.89 + 0.11 * np.exp(-0.35 * x[..., 0] - 0.9 * x[..., 1])


def test_log_scale_and_the_surrogate_reach_a_corner_a_linear_cem_walks_past():
    """From the plateau's far side, with one round's noise (4.4% of the optimum per arm) above most of
    the plateau's differences: 12 rounds of 4 arms, 100 seeded runs each."""
    def run(seed: int, scale: str, recentre: bool) -> float:
        rng = np.random.default_rng(seed)
        s = Search.start(np.array([3.0, 3.0]), 0.5, np.zeros(2), np.full(2, 3.0), scale=scale)
        z, gain, at = [], [], s.coords(np.array([3.0, 3.0]))          # control stays at the start
        for _ in range(12):
            x = s.sample(4, rng)
            r = corner(x) + rng.normal(0, 0.044, 4)
            s.update(x, r)
            z += list(s.coords(x))
            gain += list(r - corner(np.array([3.0, 3.0])) - rng.normal(0, 0.044))
            beta = surrogate.fit(np.array(z), np.tile(at, (len(z), 1)), np.array(gain),
                                 np.ones(len(z))) if recentre else None
            if beta is not None:
                s.mean = surrogate.propose(beta, s.mean, s.std, s.zlo, s.zhi)
        return float(corner(s.centre))

    got = {k: np.mean([run(seed, *k) for seed in range(100)]) for k in [("linear", False), ("log", True)]}
    assert got[("log", True)] > 0.95 and got[("log", True)] > got[("linear", False)] + 0.04, got   # 0.977, 0.912


def test_the_surrogate_finds_a_quadratics_optimum_inside_its_trust_region():
    rng = np.random.default_rng(0)
    z = rng.uniform(0, 3, (40, 2))
    unknown = np.full_like(z, np.nan)
    beta = surrogate.fit(z, unknown, quadratic(z) + rng.normal(0, 0.01, 40), np.ones(40))
    assert np.abs(surrogate.propose(beta, np.array([1.5, 1.5]), np.ones(2), np.zeros(2), np.full(2, 3.0)) - OPT).max() < 0.15
    near = surrogate.propose(beta, np.array([2.8, 2.8]), np.full(2, 0.6), np.zeros(2), np.full(2, 3.0))
    assert np.allclose(near, [1.6, 1.6])                     # the trust region's corner towards the optimum
    collapsed = surrogate.propose(beta, np.array([2.8, 2.8]), np.full(2, 0.01), np.zeros(2), np.full(2, 3.0))
    assert np.allclose(collapsed, [2.8 - 2 * surrogate.TRUST_FLOOR] * 2)   # a collapsed spread still moves
    assert surrogate.fit(z[:11], unknown[:11], quadratic(z[:11]), np.ones(11)) is None    # < twice its 6 terms
    # gains over two different known controls fit one surface: the same optimum
    zc = np.where(np.arange(40)[:, None] < 20, [[3.0, 3.0]], [[2.0, 1.0]])
    beta = surrogate.fit(z, zc, quadratic(z) - quadratic(zc) + rng.normal(0, 0.01, 40), np.ones(40))
    assert np.abs(surrogate.propose(beta, np.array([1.5, 1.5]), np.ones(2), np.zeros(2), np.full(2, 3.0)) - OPT).max() < 0.15


def test_samples_stay_in_the_box_and_bad_settings_are_refused():
    s = Search([0.1, 2.9], [5.0, 5.0], [0.0, 0.0], [3.0, 3.0])
    x = s.sample(200, np.random.default_rng(0))
    assert x.min() >= 0 and x.max() <= 3
    with pytest.raises(ValueError, match="lo < hi"):
        Search([1.0], [1.0], [2.0], [1.0])
    with pytest.raises(ValueError, match="method"):
        Search([1.0], [1.0], [0.0], [2.0], method="sgd")
    with pytest.raises(ValueError, match="scale log"):
        Search([1.0], [1.0], [-1.0], [2.0], scale="log")
    s = Search.start(np.array([0.0, 3.0]), 0.5, np.zeros(2), np.full(2, 3.0), scale="log")
    assert np.allclose(s.centre, [0.0, 3.0]) and np.allclose(s.weights(s.coords(np.array([0.3, 2.0]))), [0.3, 2.0])
    x = s.sample(200, np.random.default_rng(0))
    assert x.min() >= 0 and x.max() <= 3


def test_a_search_started_at_a_corner_of_the_box_keeps_its_spread():
    """Samples past an edge are mirrored into the box, not clipped onto it: with the mean on the
    edge, clipping gives elites the mean's own value there and collapses the spread."""
    def start() -> Search:
        return Search.start(np.array([3.0, 3.0]), 0.5, np.zeros(2), np.full(2, 3.0), scale="log")

    s = start()
    z = s.coords(s.sample(400, np.random.default_rng(0)))
    assert (z < s.zhi - 1e-9).all()                          # none left sitting on the edge
    assert np.allclose(np.sqrt(((z - s.mean) ** 2).mean(0)), s.std, rtol=0.1)
    kept = []
    for seed in range(200):                                  # one round of 4 arms on a flat reward
        s, rng = start(), np.random.default_rng(seed)
        s.update(s.sample(4, rng), rng.normal(0, 1, 4))
        kept.append(s.std / start().std)
    kept = np.array(kept)          # clipped onto the edge: 0.65 of the spread kept, 42% of rounds under half
    assert kept.mean() > 0.8 and (kept < 0.5).mean() < 0.15, (kept.mean(), (kept < 0.5).mean())


def test_rewards_are_per_list_discounted_and_corrections_replace_negatives():
    table = joined_table(5, dict(          # lists r1 (arm x) and r2 (control); r2's last row corrects its c
        request_id=["r1", "r1", "r2", "r2", "r2"], item_id=["a", "b", "a", "c", "c"], position=[0, 1, 0, 1, 1],
        experiment=["x", "x", "", "", ""], time=[5.0, 5.0, 6.0, 6.0, 6.0], label_click=[1, 0, 0, 0, 1],
        label_like=[1, 0, 0, 0, 0], correction=[False, False, False, False, True]))
    lists = list_rewards(table, RewardSpec({"click": 1.0, "like": 0.5}))
    got = dict(zip(lists.experiment, zip(lists.reward, lists.impressions)))
    assert got["x"][1] == 2 and got["x"][0] == pytest.approx(1.5 / 2)
    assert got[""][1] == 2 and got[""][0] == pytest.approx(1 / np.log2(3) / 2)
    flat = list_rewards(table, RewardSpec({"click": 1.0}, discount="none"))
    assert dict(zip(flat.experiment, flat.reward))[""] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no label column"):
        list_rewards(table, RewardSpec({"share": 1.0}))


def test_welch_bounds_bracket_the_gain_and_count_a_users_lists_as_one_cluster():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1, 4000), rng.normal(0.9, 1, 4000)
    ua, ub = np.arange(4000).astype(str), np.arange(4000, 8000).astype(str)
    c = welch(a, b, 0.95, ua, ub)
    assert c.lower < 0.1 < c.upper and c.lower > 0
    assert welch(b, a, 0.95, ub, ua).upper < 0
    plain = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)   # one list a user: Welch's own
    assert (c.upper - c.lower) / 2 == pytest.approx(plain * 1.645, rel=0.01)
    # 40 heavy users with 100 alike lists each: 40 clusters, not 4000 lists
    heavy = np.repeat(rng.normal(0, 1, 40), 100) + rng.normal(0, 0.1, 4000)
    hu = np.repeat(np.arange(40), 100).astype(str)
    wide = welch(heavy, b, 0.95, hu, ub)
    assert wide.upper - wide.lower > 5 * (c.upper - c.lower) and wide.n_a == 40


def landscape(flat: bool = False):
    """A list's click rate from its weights: a bump at OPT, or 0.2 everywhere."""
    def p(weights: dict) -> float:
        x = np.array([weights.get("like", 0.0), weights.get("finish", 0.0)])
        return 0.2 if flat else float(0.05 + 0.25 * np.exp(-((x - OPT) ** 2).sum() / 2))
    return p


def world_at(out, seed: int = 0, users: int = 100000, flat: bool = False) -> World:
    """The synthetic server (loadtest/simulate/tune_world.py) with 4-item lists and control on clicks only."""
    return World(out, landscape(flat), {"click": 1.0}, seed=seed, users=users, items=4)


def _settings(**kw) -> TuneSettings:
    base = dict(arms=6, share=0.3, min_impressions=600, max_wait_s=60, poll_s=0.0, settle_s=0.0,
                reward=RewardSpec({"click": 1.0}, discount="none"), init={"like": 2.2, "finish": 2.2})
    return TuneSettings(**{**base, **kw})


def test_the_tuner_moves_control_to_the_optimum_and_resumes_after_a_restart(tmp_path):
    world = world_at(tmp_path / "joined")
    state = tmp_path / "tune.json"
    t = Tuner(_settings(), world, tmp_path / "joined", state)
    t._install()                                     # a round in flight ...
    installed = [n for n, _, _, _ in world.arms]
    del t                                            # ... and the tuner killed before scoring it
    t = Tuner(_settings(), world, tmp_path / "joined", state)
    assert t.state.current is not None and t.state.current.names == installed
    first = t.step(stop=world.tick)
    assert world.installs == 1 and [a["name"] for a in first["arms"]] == installed   # resumed, not resampled
    t.run(rounds=24, stop=world.tick)
    st = TuneState.load(state)
    assert st.round == 25 and len(st.history) == 25
    assert st.search["scale"] == "log" and np.abs(t.search.centre - OPT).max() < 0.35, (t.search.centre, st.search)
    promoted = [h for h in st.history if h["decision"].startswith("promoted")]
    assert promoted and st.control is not None
    assert landscape()(st.control) > 0.9 * landscape()(dict(zip(["like", "finish"], OPT))), st.control
    for h in promoted:          # every promotion: a candidate of the round before, confirmed on fresh users
        before = st.history[h["round"] - 1]
        assert h["pinned"]["role"] == "confirm" and h["pinned"]["lower"] > 0, h
        assert before["best"]["lower"] > 0 or before.get("pinned", {}).get("role") == "confirm", before
    assert all(h["exploration_share"] < 0.3 + 0.05 for h in st.history)
    t2 = Tuner(_settings(), world, tmp_path / "joined", state)   # a restart between rounds keeps everything
    assert t2.state.round == 25 and t2.state.control == st.control and np.allclose(t2.search.mean, st.search["mean"])


def test_a_state_file_of_other_weights_is_refused(tmp_path):
    world = world_at(tmp_path / "joined")
    Tuner(_settings(), world, tmp_path / "joined", tmp_path / "s.json")
    with pytest.raises(ValueError, match="another tuning run"):
        Tuner(_settings(search={"like": (0.0, 1.0)}), world, tmp_path / "joined", tmp_path / "s.json")


def test_cuped_cuts_the_variance_users_add_and_keeps_the_gain():
    rng = np.random.default_rng(3)
    users = np.array([f"u{k}" for k in range(2000)], object)
    taste = rng.normal(0, 1, users.size)
    hist = cuped.UserHistory()
    for _ in range(3):                               # earlier rounds
        hist.add(users, taste + rng.normal(0, 1, users.size))
    arm = rng.random(users.size) < 0.5
    y = taste + rng.normal(0, 1, users.size) + 0.2 * arm
    adj, theta = cuped.adjust(y, hist.covariate(users))
    raw_gain, adj_gain = y[arm].mean() - y[~arm].mean(), adj[arm].mean() - adj[~arm].mean()
    assert 0.5 < theta < 1.0 and adj.var() < 0.7 * y.var(), (theta, adj.var(), y.var())
    assert abs(adj_gain - 0.2) < 0.08 and abs(raw_gain - 0.2) < 0.15
    unseen = hist.covariate(np.array(["new"], object))
    assert unseen[0] == pytest.approx(hist.total.sum() / hist.count.sum())   # no history: no adjustment


def test_no_promotion_on_a_flat_world_and_users_history_is_rebuilt_after_a_restart(tmp_path):
    """Every weight vector is as good as control: a promotion would be a false positive. Lucky
    candidates may appear; none survives its confirmation on fresh users."""
    world = world_at(tmp_path / "joined", seed=1, users=3000, flat=True)
    state = tmp_path / "tune.json"
    t = Tuner(_settings(confidence=0.9), world, tmp_path / "joined", state)
    t.run(rounds=12, stop=world.tick)
    st = TuneState.load(state)
    assert not [h for h in st.history if h["decision"].startswith("promoted")], [h["decision"] for h in st.history]
    assert st.history[-1]["cuped"]["users_known"] > 2000 and st.history[-1]["cuped"]["theta"] > 0.2
    known = len(t.users)
    t2 = Tuner(_settings(confidence=0.9), world, tmp_path / "joined", state)
    assert len(t2.users) == known and np.allclose(t2.users.total, t.users.total)


def test_a_promotion_its_guard_beats_is_rolled_back(tmp_path):
    world = world_at(tmp_path / "joined", seed=2)
    state = tmp_path / "tune.json"
    t = Tuner(_settings(control={"click": 1.0, "like": 1.2, "finish": 0.4}), world, tmp_path / "joined", state)
    bad = {"click": 1.0, "like": 3.0, "finish": 3.0}                  # far from the optimum
    t._promote(bad, "promoted by hand")
    assert t.state.pin == {"role": "guard", "weights": t.s.control, "evidence": []}
    rec = t.step(stop=world.tick)
    assert rec["pinned"]["role"] == "guard" and rec["pinned"]["lower"] > 0
    assert rec["decision"].startswith("rolled back") and t.state.control is None   # the server's own again
