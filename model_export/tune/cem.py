"""The search distribution over weight vectors: the cross-entropy method, or an evolution strategy.

CEM: a diagonal Gaussian inside a box; each round's samples are ranked by reward, and the
mean and spread move to those of the elites (smoothed, so one noisy round cannot throw the
distribution away). The elites' spread is taken around the old mean, as CMA-ES's rank-mu update
does: while the elites sit to one side the spread stays wide and the search keeps moving,
instead of collapsing short of the optimum (plain CEM's known failure with few samples); it
never falls below `min_std`, so the search keeps exploring as the world drifts.
ES (`method = "es"`): the mean takes a step along the rank-weighted noise, the spread stays. Both
are stateless between calls apart from `mean` and `std`, which the tuner's state file keeps.

Scale: `linear` searches the weights as they are; `log` searches log(w + eps) with eps 5% of the
box, so the search's resolution is relative to the weight. Fusion weights act as ratios (click
fixed at 1), and the difference between 0.1 and 0.5 matters as much as between 1 and 3: on a
linear box the small-weight corner is a sliver a few samples rarely reach. `mean` and `std` are in
search coordinates (weight units on the linear scale); `lo`, `hi` and every x in or out are
weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Search:
    mean: np.ndarray
    std: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    method: str = "cem"              # cem | es
    elite_frac: float = 0.34         # cem: share of the round's samples the distribution refits on
    smoothing: float = 0.7           # cem: weight of the elites' moments against the old ones
    min_std: float = 0.05            # either: spread floor, in search coordinates
    lr: float = 0.5                  # es: step of the mean, in units of the spread
    scale: str = "linear"            # linear | log (module docstring)

    def __post_init__(self) -> None:
        if self.method not in ("cem", "es"):
            raise ValueError(f"method: '{self.method}' is not one of cem, es")
        if self.scale not in ("linear", "log"):
            raise ValueError(f"scale: '{self.scale}' is not one of linear, log")
        for name in ("mean", "std", "lo", "hi"):
            setattr(self, name, np.asarray(getattr(self, name), np.float64))
        if not (self.mean.shape == self.std.shape == self.lo.shape == self.hi.shape):
            raise ValueError("mean, std, lo and hi need one value per searched weight")
        if np.any(self.lo >= self.hi):
            raise ValueError("every bound needs lo < hi")
        if self.scale == "log" and np.any(self.lo < 0):
            raise ValueError("scale log: weights must be >= 0 (lo < 0 in the box)")
        if not 0 < self.elite_frac <= 1 or not 0 < self.smoothing <= 1:
            raise ValueError("elite_frac and smoothing must be in (0, 1]")
        self._eps = 0.05 * (self.hi - self.lo)
        self.zlo, self.zhi = self.coords(self.lo), self.coords(self.hi)
        self.mean = np.clip(self.mean, self.zlo, self.zhi)
        self.std = np.maximum(self.std, self.min_std)

    @classmethod
    def start(cls, init: np.ndarray, std_share: float, lo, hi, **kw) -> "Search":
        """A fresh search centred on the weights `init`, its spread `std_share` of the box."""
        s = cls(np.zeros(len(lo)), np.ones(len(lo)), lo, hi, **kw)
        s.mean = np.clip(s.coords(np.asarray(init, np.float64)), s.zlo, s.zhi)
        s.std = np.maximum(std_share * (s.zhi - s.zlo), s.min_std)
        return s

    def coords(self, w: np.ndarray) -> np.ndarray:
        """Weights -> search coordinates."""
        return np.log(w + self._eps) if self.scale == "log" else np.asarray(w, np.float64)

    def weights(self, z: np.ndarray) -> np.ndarray:
        """Search coordinates -> weights, inside the box."""
        w = np.exp(z) - self._eps if self.scale == "log" else z
        return np.clip(w, self.lo, self.hi)

    @property
    def centre(self) -> np.ndarray:
        """The weights at the distribution's mean."""
        return self.weights(self.mean)

    def sample(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """[k, d] candidate weights. ES draws them in antithetic pairs (mean +- noise); both clip to the box."""
        d = self.mean.size
        if self.method == "es":
            half = rng.standard_normal(((k + 1) // 2, d))
            noise = np.concatenate([half, -half])[:k]
        else:
            noise = rng.standard_normal((k, d))
        return self.weights(self.reflect(self.mean + self.std * noise))

    def reflect(self, z: np.ndarray) -> np.ndarray:
        """Fold coordinates into the box by mirroring at its edges. Clipping would put every sample
        past an edge on it: with the mean there (a start at a corner of the box) the elites would
        sit on the mean and the spread collapse along that weight before anything was learnt."""
        width = self.zhi - self.zlo
        t = np.mod(z - self.zlo, 2 * width)
        return self.zlo + np.where(t > width, 2 * width - t, t)

    def update(self, x: np.ndarray, reward: np.ndarray) -> None:
        """Move the distribution toward the better of the candidate weights `x` [k, d] (`reward` [k])."""
        z, reward = self.coords(np.asarray(x, np.float64)), np.asarray(reward, np.float64)
        if self.method == "es":
            ranks = np.argsort(np.argsort(reward)).astype(np.float64)
            util = ranks / max(len(reward) - 1, 1) - 0.5          # centred ranks: scale-free
            eps = (z - self.mean) / self.std
            self.mean = np.clip(self.mean + self.lr * self.std * (util @ eps) / len(reward), self.zlo, self.zhi)
            return
        n_elite = max(1, int(np.ceil(self.elite_frac * len(reward))))
        elite = z[np.argsort(-reward, kind="stable")[:n_elite]]
        a = self.smoothing
        spread = np.sqrt(((elite - self.mean) ** 2).mean(0))    # around the old mean: wide while moving
        self.mean = np.clip(a * elite.mean(0) + (1 - a) * self.mean, self.zlo, self.zhi)
        self.std = np.maximum(a * spread + (1 - a) * self.std, self.min_std)

    def to_json(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "scale": self.scale}
