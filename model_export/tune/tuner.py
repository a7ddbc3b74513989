"""The tuning loop: rounds of arms on a live server, scored from the joined samples.

A round: sample K weight vectors, install them as arms `tune-r<round>-a<k>` sharing `share` of
the traffic as capped arms (Experiment.cap: never more than their share of lists; control keeps
the rest) under a fresh salt (new users per round), wait until every
arm and control has `min_impressions` joined impressions (or `max_wait_s` passed), score each
list (reward.py) and adjust it by its user's earlier rewards (cuped.py), refit the search
(cem.py) on the arms' mean rewards and recentre it on a surface fitted to every round's
arm-vs-control gains (surrogate.py), then:

- candidate: the best arm becomes a candidate when its gain over control in the same round
  clears a one-sided Welch lower bound at `confidence`, Bonferroni-corrected for picking the best
  of K (winner's curse);
- confirm: the next rounds serve the candidate as arm 0 to fresh users; it is promoted to control
  when its gain, pooled over those rounds only (free of the selection that picked it), clears
  the bound at `confidence`, and dropped when the pooled gain turns negative or after
  `confirm_rounds` rounds (`confirm_rounds = 0`: promote on the selection round);
- guard: the round after a promotion serves the previous control as arm 0; control goes back to
  it if the guard beats control by a lower bound > 0 in that round (same users' minutes, so the
  drift everyone sees cancels).

Control's lists count from the round's start (SetArms answered + `settle_s`, the time every
worker takes to follow); arms are named per round, so their rows cannot mix. The state file is
saved at every step: a restarted tuner resumes the round in flight from its joined offset.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from model_export.joined import JoinedOffset, JoinedReader
from model_export.tune import cuped, surrogate
from model_export.tune.cem import Search
from model_export.tune.evidence import pooled, round_gain
from model_export.tune.reward import Lists, RewardSpec, list_rewards, welch
from model_export.tune.state import Round, TuneState

log = logging.getLogger("recserve.tune")


@dataclass
class TuneSettings:
    search: dict[str, tuple[float, float]] = field(default_factory=lambda: {"like": (0.0, 3.0), "finish": (0.0, 3.0)})
    fixed: dict[str, float] = field(default_factory=lambda: {"click": 1.0})   # weights not searched
    init: dict[str, float] = field(default_factory=dict)    # start of the search mean (default: mid-box)
    control: dict[str, float] | None = None   # the server's own control weights: the first promotion's guard
    init_std: float = 0.5                  # start of the spread, as a share of each weight's box
    scale: str = "log"                     # search log(w + eps) or the weights themselves (cem.py)
    surrogate: bool = True                 # recentre the search on a surface fitted to every round (surrogate.py)
    stage: str = "rerank"                  # the rerank stage whose weights are tuned
    arms: int = 6                          # K
    share: float = 0.10                    # total traffic share of the arms
    min_impressions: int = 2000            # joined impressions per arm (and control) before scoring
    max_wait_s: float = 600.0              # score the round with what arrived by then
    confidence: float = 0.95
    confirm_rounds: int = 2                # rounds a candidate is re-tested before promotion (0: promote at once)
    cuped: bool = True                     # adjust list rewards by the user's earlier rewards (cuped.py)
    reward: RewardSpec = field(default_factory=RewardSpec)
    method: str = "cem"
    elite_frac: float = 0.34
    min_std: float = 0.05
    settle_s: float = 2.0                  # after SetArms, before control's lists count
    poll_s: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if not self.search:
            raise ValueError("search: name at least one weight to tune")
        if set(self.search) & set(self.fixed):
            raise ValueError(f"{sorted(set(self.search) & set(self.fixed))}: both searched and fixed")
        if self.arms < 2:
            raise ValueError("arms: at least 2 (the elites are a share of them)")
        if not 0 < self.share < 1:
            raise ValueError("share: the arms' total traffic share, in (0, 1)")
        if not 0.5 < self.confidence < 1:
            raise ValueError("confidence: in (0.5, 1)")
        if self.min_impressions < 1:
            raise ValueError("min_impressions: at least 1")
        if self.scale not in ("linear", "log"):
            raise ValueError(f"scale: '{self.scale}' is not one of linear, log")
        if self.init_std <= 0:
            raise ValueError("init_std: > 0 (a share of each weight's box)")
        if self.confirm_rounds < 0:
            raise ValueError("confirm_rounds: >= 0")


class Tuner:
    """`arms_api` is engine.app.client.RecServeClient-like: set_arms(arms, control, salt=...)."""

    def __init__(self, s: TuneSettings, arms_api: Any, joined: Path, state_path: Path,
                 on_round: Callable[[dict], None] | None = None):
        s.check()
        self.s, self.api, self.reader, self.path = s, arms_api, JoinedReader(joined), Path(state_path)
        self.on_round = on_round
        self.key = f"stage.{s.stage}.weights"
        names = list(s.search)
        lo = np.array([s.search[n][0] for n in names])
        hi = np.array([s.search[n][1] for n in names])
        st = TuneState.load(self.path)
        kw = dict(method=s.method, elite_frac=s.elite_frac, min_std=s.min_std, scale=s.scale)
        if st is not None and st.names != names:
            raise ValueError(f"{self.path}: tunes {st.names}, not {names}: another tuning run's state")
        if st is not None and st.search.get("scale", "linear") != s.scale:
            raise ValueError(f"{self.path}: searched on the {st.search.get('scale', 'linear')} scale, not {s.scale}")
        if st is None:
            init = np.array([s.init.get(n, (lo[i] + hi[i]) / 2) for i, n in enumerate(names)])
            st = TuneState(search=Search.start(init, s.init_std, lo, hi, **kw).to_json(), names=names)
            st.offset = self._end().to_json()      # rows served before the tuner started do not count
            st.origin = dict(st.offset)
        self.state = st
        self.search = Search(np.array(st.search["mean"]), np.array(st.search["std"]), lo, hi, **kw)
        self.rows: list[Lists] = []                 # every list read since the round's offset
        self.users = self._users_before(st.current.offset if st.current else st.offset)
        self.state.save(self.path)

    # -- the loop ----------------------------------------------------------------------
    def run(self, rounds: int = 0, stop: Callable[[], bool] = lambda: False) -> None:
        """`rounds` more rounds (0: until `stop()`)."""
        done = 0
        while not stop() and (rounds == 0 or done < rounds):
            if self.step(stop) is not None:
                done += 1

    def step(self, stop: Callable[[], bool] = lambda: False) -> dict | None:
        """One round: install (or resume) its arms, collect, score, update. None if stopped first."""
        if self.state.current is None:
            self._install()
        cur = self.state.current
        deadline = time.time() + self.s.max_wait_s
        counts: dict[str, int] = {}
        while True:
            self._read()
            lists = self._round_lists(cur)
            counts = {n: int(lists.impressions[lists.experiment == n].sum()) for n in ["", *cur.names]}
            if min(counts.values()) >= self.s.min_impressions or time.time() >= deadline:
                break
            if stop():
                return None
            time.sleep(self.s.poll_s)
        return self._score(cur, lists)

    # -- steps -------------------------------------------------------------------------
    def weights(self, x: np.ndarray) -> dict[str, float]:
        return {**self.s.fixed, **{n: round(float(v), 4) for n, v in zip(self.state.names, x)}}

    def _control_set(self) -> dict[str, Any]:
        return {self.key: self.state.control} if self.state.control is not None else {}

    def _install(self) -> None:
        st = self.state
        rng = np.random.default_rng([self.s.seed, st.round])
        x = self.search.sample(self.s.arms, rng)
        sets = [{self.key: self.weights(xk)} for xk in x]
        pinned = st.pin["role"] if st.pin else ""
        if pinned:                       # arm 0 serves the pinned weights as given
            x[0] = [st.pin["weights"].get(n, 0.0) for n in st.names]
            sets[0] = {self.key: st.pin["weights"]}
        names = [f"tune-r{st.round}-a{k}" for k in range(self.s.arms)]
        salt = f"tune-{self.s.seed}-r{st.round}"
        share = self.s.share / self.s.arms
        self.api.set_arms([(n, share, st_, True) for n, st_ in zip(names, sets)], self._control_set(), salt=salt)
        st.current = Round(st.round, names, x.tolist(), salt, time.time() + self.s.settle_s, dict(st.offset),
                           pinned)
        self.rows = []
        st.save(self.path)
        log.info("tune: round %d: %d arms installed, %.1f%% of traffic each%s", st.round, self.s.arms,
                 100 * share, f" (arm 0: {pinned} {st.pin['weights']})" if pinned else "")

    def _read(self) -> None:
        """New joined commits, every list of them (the users' history needs the others too)."""
        for table, commit in self.reader.read(JoinedOffset.from_json(self.state.offset)):
            self.rows.append(list_rewards(table, self.s.reward))
            self.state.offset = commit.offset.to_json()

    def _round_lists(self, cur: Round) -> Lists:
        """This round's arms' lists and control's since the round started."""
        lists = Lists.concat(self.rows)
        names = set(cur.names)
        keep = np.fromiter((e in names for e in lists.experiment), bool, len(lists.experiment))
        keep |= (lists.experiment == "") & (lists.time >= cur.start)
        return lists.select(keep)

    def _users_before(self, offset: dict) -> cuped.UserHistory:
        """Every user's list rewards from the tuner's start up to `offset` (a restart rebuilds it)."""
        users = cuped.UserHistory()
        if not self.s.cuped or self.state.origin is None:
            return users
        end = JoinedOffset.from_json(offset)
        if end == JoinedOffset.from_json(self.state.origin):
            return users
        for table, commit in self.reader.read(JoinedOffset.from_json(self.state.origin)):
            lists = list_rewards(table, self.s.reward)
            users.add(lists.user, lists.reward)
            if commit.offset == end:
                break
        return users

    def _score(self, cur: Round, lists: Lists) -> dict:
        st = self.state
        reward, theta = lists.reward, 0.0
        if self.s.cuped and len(self.users):
            reward, theta = cuped.adjust(lists.reward, self.users.covariate(lists.user))
        is_ctl = lists.experiment == ""
        ctl = (reward[is_ctl], lists.user[is_ctl])
        per_arm = [(reward[m], lists.user[m]) for m in (lists.experiment == n for n in cur.names)]
        x = np.array(cur.x)
        means = np.array([_mean(a) for a, _ in per_arm])
        sampled = np.isfinite(means) & (np.arange(len(means)) >= (1 if cur.pinned else 0))
        if sampled.sum() >= 2:
            self.search.update(x[sampled], means[sampled])
        rec: dict[str, Any] = {
            "round": cur.number, "start": cur.start, "end": time.time(), "salt": cur.salt,
            "control": {"weights": st.control, "reward": _mean(lists.reward[is_ctl]), "adjusted": _mean(ctl[0]),
                        "lists": int(ctl[0].size), "impressions": int(lists.impressions[is_ctl].sum())},
            "arms": [{"name": n, "weights": self.weights(xk), "reward": _mean(lists.reward[lists.experiment == n]),
                      "adjusted": _mean(a), "lists": int(a.size),
                      "impressions": int(lists.impressions[lists.experiment == n].sum())}
                     for n, xk, (a, _) in zip(cur.names, x, per_arm)],
            "cuped": {"theta": round(theta, 4), "users_known": len(self.users)},
        }
        if cur.pinned:
            rec["arms"][0] |= {"pinned": cur.pinned, "weights": st.pin["weights"]}
        if self.s.surrogate:
            rec["surrogate_points"] = self._recentre([*st.history, rec])
        rec |= {
            "mean": dict(zip(st.names, self.search.centre.round(4).tolist())),   # weights
            "std": dict(zip(st.names, self.search.std.round(4).tolist())),       # search coordinates
            "band": {n: [round(float(a), 4), round(float(b), 4)]                   # mean -+ 1 spread, as weights
                     for n, a, b in zip(st.names, self.search.weights(self.search.mean - self.search.std),
                                        self.search.weights(self.search.mean + self.search.std))},
            "exploration_share": float(lists.impressions[~is_ctl].sum() / max(lists.impressions.sum(), 1)),
        }
        rec["decision"] = self._decide(cur, ctl, per_arm, means, x, rec)
        st.search = self.search.to_json()
        st.history.append(rec)
        st.current, st.round = None, cur.number + 1
        everything = Lists.concat(self.rows)           # the round's lists join the users' history
        if self.s.cuped:
            self.users.add(everything.user, everything.reward)
        self.rows = []
        st.save(self.path)
        log.info(line(rec))
        if self.on_round:
            self.on_round(rec)
        return rec

    def _recentre(self, history: list[dict]) -> int:
        """Move the search mean to the argmax of the surrogate over every round's arm-vs-control
        gains (surrogate.py); the number of points it was fitted on (0: too few yet)."""
        z, zc, gain, weight = [], [], [], []
        names = self.state.names
        for rec in history:
            c = rec["control"]
            cw = c["weights"] if c["weights"] is not None else self.s.control
            at = (self.search.coords(np.array([cw[n] for n in names])) if cw is not None
                  else np.full(len(names), np.nan))
            for a in rec["arms"]:
                if a["lists"] and c["lists"]:
                    z.append(self.search.coords(np.array([a["weights"][n] for n in names])))
                    zc.append(at)
                    gain.append(a.get("adjusted", a["reward"]) - c.get("adjusted", c["reward"]))
                    weight.append(1.0 / (1.0 / a["lists"] + 1.0 / c["lists"]))
        d = len(names)
        beta = surrogate.fit(np.array(z).reshape(-1, d), np.array(zc).reshape(-1, d), np.array(gain),
                             np.array(weight))
        if beta is None:
            return 0
        sr = self.search
        sr.mean = surrogate.propose(beta, sr.mean, sr.std, sr.zlo, sr.zhi)
        return len(z)

    def _decide(self, cur: Round, ctl: tuple, per_arm: list[tuple], means: np.ndarray, x: np.ndarray,
                rec: dict) -> str:
        """Guard or confirm the pinned arm, then take this round's best sampled arm as a candidate.
        `ctl` and each of `per_arm`: (list rewards, their users)."""
        st, s = self.state, self.s
        said = []
        if cur.pinned:
            pin = st.pin
            g = round_gain(*per_arm[0], *ctl)
            if np.isfinite(g[0]):
                pin["evidence"].append(list(g))
            b = pooled(pin["evidence"], s.confidence)
            rec["pinned"] = {"role": cur.pinned, "weights": pin["weights"], "rounds": len(pin["evidence"]),
                             "gain": b.gain, "lower": b.lower, "upper": b.upper}
            st.pin = None
            if cur.pinned == "guard":
                if b.lower > 0:                    # the previous control beats the promoted one
                    st.control, st.previous = st.previous, None
                    return f"rolled back: the previous control is ahead by {b.gain:+.4f} (lower bound {b.lower:+.4f})"
                said.append(f"guard passed ({b.gain:+.4f}, lower {b.lower:+.4f})")
            elif b.lower > 0:
                return self._promote(pin["weights"], f"promoted the candidate after {len(pin['evidence'])} "
                                                          f"round(s): pooled gain {b.gain:+.4f} (lower {b.lower:+.4f})")
            elif b.gain > 0 and len(pin["evidence"]) < s.confirm_rounds:
                st.pin = pin                       # not yet clear, still ahead: one more round
                said.append(f"candidate kept ({b.gain:+.4f}, lower {b.lower:+.4f})")
            else:
                said.append(f"candidate dropped ({b.gain:+.4f}, lower {b.lower:+.4f})")
        sampled = [k for k in range(len(per_arm)) if np.isfinite(means[k]) and not (cur.pinned and k == 0)]
        if not sampled:
            return "; ".join(said + ["no arm had lists"])
        best = max(sampled, key=lambda k: means[k])
        c = welch(per_arm[best][0], ctl[0], 1 - (1 - s.confidence) / len(sampled), per_arm[best][1], ctl[1])
        rec["best"] = {"name": cur.names[best], "gain": c.gain, "lower": c.lower}
        if c.lower > 0 and s.confirm_rounds == 0:
            return self._promote(self.weights(x[best]), f"promoted {cur.names[best]}")
        if c.lower > 0 and st.pin is None:
            st.pin = {"role": "confirm", "weights": self.weights(x[best]), "evidence": []}
            said.append(f"candidate {cur.names[best]}: confirming next round")
        return "; ".join(said or ["kept control"])

    def _promote(self, weights: dict[str, float], why: str) -> str:
        st = self.state
        st.previous, st.control = st.control, weights
        guard = st.previous if st.previous is not None else self.s.control
        if self.s.confirm_rounds and guard is not None:
            st.pin = {"role": "guard", "weights": guard, "evidence": []}
        return why

    def _end(self) -> JoinedOffset:
        c = self.reader.last_commit()
        return c.offset if c else JoinedOffset()


def line(rec: dict) -> str:
    """The per-round log line."""
    c, b = rec["control"], rec.get("best", {})
    best = f"best {b['name']} {b['gain']:+.4f} (lower {b['lower']:+.4f})" if b else "no best"
    mean = " ".join(f"{k}={v:.2f}+-{rec['std'][k]:.2f}" for k, v in rec["mean"].items())
    return (f"tune: round {rec['round']}: control {c['reward']:.4f} ({c['lists']} lists), {best}: {rec['decision']}; "
            f"mean {mean}; exploration {100 * rec['exploration_share']:.1f}% of impressions")


def _mean(a: np.ndarray) -> float:
    return float(a.mean()) if a.size else float("nan")
