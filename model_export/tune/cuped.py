"""CUPED: a list's reward adjusted by what its user earned before the round.

Users differ far more than the arms do: in the simulator a list's reward correlates ~0.5 with the
same user's earlier lists, so most of an arm's noise is which users it drew. Every round hashes
users to arms under a fresh salt, so a user's reward *before* the round is independent of the arm
and is a valid control variate (Deng et al., 2013): y' = y - theta (x - mean x), theta fitted on
the round's lists of every group together. The means' differences stay unbiased and their
variance drops by the squared correlation.

x is the user's mean list reward over earlier rounds, shrunk towards everyone's mean by `PRIOR`
lists (one earlier list says less than ten); a user with no history gets everyone's mean, i.e.
no adjustment. Only rounds already scored feed the history, never the round being adjusted.
"""
from __future__ import annotations

import numpy as np

PRIOR = 1.0        # pseudo-lists at everyone's mean in each user's covariate


class UserHistory:
    """Per-user sums of list rewards over the rounds scored so far."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.total = np.zeros(0)
        self.count = np.zeros(0)

    def __len__(self) -> int:
        return len(self.index)

    def _rows(self, users: np.ndarray, grow: bool) -> np.ndarray:
        if grow:
            for u in users:
                self.index.setdefault(u, len(self.index))
            if len(self.index) > self.total.size:
                pad = len(self.index) - self.total.size
                self.total = np.concatenate([self.total, np.zeros(pad)])
                self.count = np.concatenate([self.count, np.zeros(pad)])
        return np.fromiter((self.index.get(u, -1) for u in users), np.int64, len(users))

    def add(self, users: np.ndarray, reward: np.ndarray) -> None:
        rows = self._rows(users, grow=True)
        np.add.at(self.total, rows, reward)
        np.add.at(self.count, rows, 1.0)

    def covariate(self, users: np.ndarray) -> np.ndarray:
        """Each user's shrunk mean earlier reward; everyone's mean for users never seen."""
        n = self.count.sum()
        overall = self.total.sum() / n if n else 0.0
        rows = self._rows(users, grow=False)
        seen = rows >= 0
        r = np.where(seen, rows, 0)
        tot = np.where(seen, self.total[r] if self.total.size else 0.0, 0.0)
        cnt = np.where(seen, self.count[r] if self.count.size else 0.0, 0.0)
        return (tot + PRIOR * overall) / (cnt + PRIOR)


def adjust(reward: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, float]:
    """CUPED-adjusted rewards and theta; unadjusted (theta 0) when x does not vary."""
    if reward.size < 3:
        return reward, 0.0
    xc = x - x.mean()
    var = float(xc @ xc)
    if var <= 1e-12:
        return reward, 0.0
    theta = float(xc @ (reward - reward.mean())) / var
    return reward - theta * xc, theta
