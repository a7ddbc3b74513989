"""A synthetic server for the tuner: lists whose click rate is a known function of their fusion
weights, written to a real joined folder, users hashed to arms by salt as the server does.

The closed-loop simulator (tune_run.py) takes ~10 wall minutes a seed; a search rule needs tens
of seeds to judge. This world runs the real `Tuner` (state file, joined reader, CUPED, bounds,
confirmation, guard) against a landscape whose optimum is known, in seconds a seed, with the
simulator's noise: lists of `items` impressions, heavy-tailed user activity and user-level click
propensity (a list's reward correlates ~0.5 with its user's other lists, as measured in the
simulator). `python -m loadtest.simulate.tune_world --seeds 40` prints, per landscape, control's
end utility as a share of the optimum and how many runs end at >= 95% of it.

Landscapes: `corner`, the tiny world's shape (a plateau over most of the box, ~11% better in the
small-weight corner; the optimum clicks only); `interior`, a bump at like 1.2, finish 0.4.
"""
from __future__ import annotations

import argparse
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from engine.core.config import arm_point
from engine.store.samplelog import records
from model_export.joined import JoinedWriter

BASE = 0.1023       # the tiny world's expected list reward at its optimum (docs/tuning.md)


def corner(x: np.ndarray) -> np.ndarray:
    """Share of the optimum: 0.89 on the plateau, 1 at like = finish = 0 (finish matters most)."""
    return 0.89 + 0.11 * np.exp(-0.35 * x[..., 0] - 0.9 * x[..., 1])


def interior(x: np.ndarray) -> np.ndarray:
    """Share of the optimum: a bump at (1.2, 0.4), 0.89 far from it."""
    return 0.89 + 0.11 * np.exp(-((x - np.array([1.2, 0.4])) ** 2).sum(-1) / 0.8)


LANDSCAPES: dict[str, Callable[[np.ndarray], np.ndarray]] = {"corner": corner, "interior": interior}


def joined_table(n: int, cols: dict[str, np.ndarray]) -> pa.Table:
    """`n` joined rows: the given columns, every other JOINED column at its empty value."""
    arrays = []
    for f in records.JOINED:
        if f.name in cols:
            arrays.append(pa.array(cols[f.name], f.type))
        elif pa.types.is_list(f.type) or pa.types.is_map(f.type):
            arrays.append(pa.array([[]] * n, f.type))
        elif pa.types.is_string(f.type):
            arrays.append(pa.array([""] * n, f.type))
        else:
            arrays.append(pa.array(np.zeros(n), f.type))
    return pa.Table.from_arrays(arrays, schema=records.JOINED)


class World:
    """`set_arms` as the admin RPC takes it; `tick()` serves `per_tick` lists (the tuner's `stop`);
    control ranks with `default` (the server config's weights) until the tuner sets its own."""

    def __init__(self, out: Path, landscape: Callable[[dict], float], default: dict, seed: int = 0, per_tick: int = 400,
                 users: int = 2000, items: int = 40, activity: float = 1.5, taste_shape: float = 4.0):
        self.w = JoinedWriter(out)
        self.rng = np.random.default_rng(seed)
        self.landscape, self.default, self.per_tick, self.items = landscape, default, per_tick, items
        self.arms: list = []
        self.control: dict = {}
        self.salt, self.n, self.installs = "", 0, 0
        act = self.rng.pareto(activity, users) + 1.0
        self.activity = act / act.sum()                                  # heavy users ask more often
        self.taste = self.rng.gamma(taste_shape, 1.0 / taste_shape, users)   # mean 1: who clicks more
        self.ids = np.array([f"u{u}" for u in range(users)], object)
        self.hash = np.zeros(users)

    def set_arms(self, arms, control, salt=""):
        self.arms, self.control, self.salt = list(arms), dict(control), salt
        self.hash = np.array([arm_point(salt, u) for u in self.ids])
        self.installs += 1

    def tick(self) -> bool:
        users = self.rng.choice(len(self.ids), self.per_tick, p=self.activity)
        weights = [self.control.get("stage.rerank.weights", self.default)]   # the server's own
        exp = np.zeros(len(users), np.int64)                 # 0: control, k: arm k-1
        acc = 0.0
        for k, (_name, share, st, _cap) in enumerate(self.arms):
            exp[(self.hash[users] >= acc) & (self.hash[users] < acc + share)] = k + 1
            acc += share
            weights.append(st["stage.rerank.weights"])
        p = np.array([self.landscape(w) for w in weights])[exp] * self.taste[users]
        clicks = self.rng.random((len(users), self.items)) < np.minimum(p, 1.0)[:, None]
        names = np.array(["", *(a[0] for a in self.arms)], object)
        first = self.n
        self.n += len(users)
        n = clicks.size
        req = np.repeat(np.arange(first, self.n), self.items)
        table = joined_table(n, {
            "request_id": np.char.add("q", req.astype(str)).astype(object),
            "item_id": np.char.add("i", np.tile(np.arange(self.items), len(users)).astype(str)).astype(object),
            "position": np.tile(np.arange(self.items), len(users)),
            "experiment": np.repeat(names[exp], self.items),
            "time": np.full(n, 1e10), "user_id": np.repeat(self.ids[users], self.items),
            "label_click": clicks.ravel().astype(np.int8)})
        for batch in table.to_batches():
            self.w.write(batch)
        self.w.commit({}, {}, {}, 0.0)
        return False


def weights_landscape(shape: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict], float]:
    """Fusion weights -> the mean click rate of a list ranked with them."""
    return lambda w: float(BASE * shape(np.array([w.get("like", 0.0), w.get("finish", 0.0)])))


def run(landscape: str, seed: int, rounds: int = 14, arms: int = 4) -> dict:
    """One tuning run from like = finish = 3; control's share of the optimum per round."""
    from model_export.tune.reward import RewardSpec
    from model_export.tune.state import TuneState
    from model_export.tune.tuner import Tuner, TuneSettings

    start = {"click": 1.0, "like": 3.0, "finish": 3.0}
    shape = LANDSCAPES[landscape]
    with tempfile.TemporaryDirectory() as tmp:
        world = World(Path(tmp) / "joined", weights_landscape(shape), start, seed=seed)
        s = TuneSettings(arms=arms, share=0.3, min_impressions=190 * 40, max_wait_s=1e9, poll_s=0.0, settle_s=0.0,
                         confidence=0.9, reward=RewardSpec({"click": 1.0}, discount="none"),
                         init={"like": 3.0, "finish": 3.0}, control=start, seed=seed)
        Tuner(s, world, Path(tmp) / "joined", Path(tmp) / "tune.json").run(rounds=rounds, stop=world.tick)
        st = TuneState.load(Path(tmp) / "tune.json")
    share = lambda w: float(shape(np.array([w["like"], w["finish"]])))
    path = [share(h["control"]["weights"] or start) for h in st.history] + [share(st.control or start)]
    return {"seed": seed, "path": path, "end": path[-1],
            "promotions": sum(h["decision"].startswith("promoted") for h in st.history),
            "worst_step": min(np.diff(path), default=0.0), "mean": st.search["mean"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=40)
    p.add_argument("--rounds", type=int, default=14)
    p.add_argument("--landscape", action="append", choices=sorted(LANDSCAPES))
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args(argv)
    for name in a.landscape or sorted(LANDSCAPES):
        with ProcessPoolExecutor(a.jobs) as pool:
            runs = list(pool.map(run, [name] * a.seeds, range(a.seeds), [a.rounds] * a.seeds))
        end = np.array([r["end"] for r in runs])
        worst = min(r["worst_step"] for r in runs)
        print(f"{name}: end mean {end.mean():.3f}, runs >= 95%: {(end >= 0.95).sum()}/{len(end)}, "
              f"promotions {sum(r['promotions'] for r in runs)}, worst step {100 * worst:+.1f} points, "
              f"worst end {end.min():.3f}", flush=True)


if __name__ == "__main__":
    main()
