"""A response surface over every round's arms: where CEM's next mean should be.

CEM ranks one round's few arms and forgets them; on a landscape whose differences are below one
round's noise it walks at random. Every finished round, though, measured each arm against control
in the same minutes, so `gain = arm reward - control reward` is free of what drifts for everyone
(users consuming their best items, the hour). A quadratic q in the search coordinates, fitted to all
rounds' gains by weighted least squares (weight = 1 / (1/lists_arm + 1/lists_control), a little
ridge), pools that evidence. A gain is a difference, q(arm) - q(control), so rounds before and
after a promotion (different controls) fit one surface; where control's weights are not known
(the server's own, not named to the tuner) a free offset stands in for q(control). The surface's
argmax on a grid inside a trust region around the current mean (2 spreads, never narrower than
TRUST_FLOOR) becomes the next mean. The trust region keeps a misfitted surface from throwing the
search across the box; CEM's spread update still decides how wide the next arms sample.
"""
from __future__ import annotations

import itertools

import numpy as np

RIDGE = 1e-2          # per point, on the non-constant terms (search coordinates are O(1))
TRUST = 2.0           # the argmax is searched within this many spreads of the current mean,
TRUST_FLOOR = 0.5     # spreads counted at least this wide (search coordinates): CEM's spread can
                      # collapse where one round cannot tell arms apart, the pooled surface still can
GRID = 25             # grid points per searched weight (capped so the grid stays ~20k points)


def features(z: np.ndarray) -> np.ndarray:
    """[n, d] -> [n, 1 + d + d(d+1)/2]: constant, linear and quadratic terms."""
    d = z.shape[1]
    cols = [np.ones(len(z)), *z.T, *(z[:, i] * z[:, j] for i in range(d) for j in range(i, d))]
    return np.stack(cols, 1)


def fit(z: np.ndarray, z_control: np.ndarray, gain: np.ndarray, weight: np.ndarray) -> np.ndarray | None:
    """Coefficients of the quadratic from gains of arms at `z` over controls at `z_control` (rows
    of NaN: control's weights unknown), or None with too few points (fewer than twice the terms).
    The constant term is only the unknown controls' offset (0 when every control is known)."""
    f = features(z)
    if len(z) < 2 * f.shape[1]:
        return None
    known = ~np.isnan(z_control).any(1)
    f[known] -= features(z_control[known])        # q(arm) - q(control): the constant cancels
    w = weight / weight.mean()
    reg = RIDGE * len(z) * np.eye(f.shape[1])
    reg[0, 0] = 0.0 if not known.all() else 1.0     # all known: the constant column is 0, pin it
    return np.linalg.solve(f.T @ (f * w[:, None]) + reg, f.T @ (w * gain))


def propose(beta: np.ndarray, mean: np.ndarray, std: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The surface's argmax on a grid over the box, within TRUST spreads (at least TRUST_FLOOR) of `mean`."""
    d = len(mean)
    n = max(3, min(GRID, int(20000 ** (1 / d))))
    reach = TRUST * np.maximum(std, TRUST_FLOOR)
    axes = [np.linspace(max(lo[i], mean[i] - reach[i]), min(hi[i], mean[i] + reach[i]), n) for i in range(d)]
    grid = np.array(list(itertools.product(*axes)))
    return grid[int(np.argmax(features(grid) @ beta))]
