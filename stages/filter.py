"""Filters: drop candidates by one rule. Cheapest first in the pipeline; each named instance
is traced on its own, so a trace shows what every rule removed.

rules: excluded (the request's excludes), seen (recent impressions and positives of the
user), blocked (a blocklist file, and items older than `max_age_days` if set), author_cap
(at most `max_per_author` per author, best recall score first). Guaranteed items are
exempt from author_cap only: nobody is shown what they excluded or saw.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.core.candidates import Candidates, Guarantee, found_in
from engine.core.errors import ConfigError
from engine.core.registry import Policy, StageEnv, register, sidecar

RULES = ("excluded", "seen", "blocked", "author_cap")


@dataclass
class Params:
    rule: str = ""
    max_per_author: int = 0        # author_cap
    blocklist: str = sidecar()     # blocked: TOML file with `items = ["i1", ...]`, relative to the config
    max_age_days: float = 0.0      # blocked: 0 = items never expire

    def check(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"rule: '{self.rule}' is not one of {', '.join(RULES)}")
        if self.rule == "author_cap" and self.max_per_author <= 0:
            raise ConfigError("max_per_author: author_cap needs a value > 0")
        if self.rule != "author_cap" and self.max_per_author:
            raise ConfigError(f"max_per_author: only rule author_cap reads it, this filter's rule is {self.rule}")
        if self.rule != "blocked" and (self.blocklist or self.max_age_days):
            raise ConfigError(f"blocklist, max_age_days: only rule blocked reads them, this filter's rule is "
                              f"{self.rule}")


@register("filter", Params, policy=Policy(guard=True), reads=("ctx:exclude", "ctx:user", "score:recall"))
class Filter:
    def __init__(self, p: Params, env: StageEnv):
        self.rule, self.cap = p.rule, p.max_per_author
        t = env.bundle.tables
        self.author = np.asarray(t.item_author)
        if p.rule == "blocked":
            blocked = np.zeros(len(self.author), bool)
            if p.blocklist:
                ids = env.read_sidecar("blocklist", p.blocklist).get("items", [])
                blocked[env.item_index.known(ids)] = True
            self.blocked = blocked
            self.max_age, self.created, self.clock = p.max_age_days, np.asarray(t.item_created), env.store.clock

    def __call__(self, ctx, c: Candidates) -> Candidates:
        if self.rule == "excluded":
            return c.take(~found_in(c.item, ctx.exclude)) if ctx.exclude.size else c
        if self.rule == "seen":
            seen = np.concatenate([ctx.user.seen, ctx.user.recent[0]])
            return c.take(~found_in(c.item, seen[seen >= 0]))
        if self.rule == "blocked":
            drop = self.blocked[c.item]
            if self.max_age > 0:
                drop |= self.clock.days() - self.created[c.item] > self.max_age
            return c.take(~drop)
        return self._cap_authors(c)

    def _cap_authors(self, c: Candidates) -> Candidates:
        """Rank within author by recall score; keep rank < cap (guaranteed items always). Only
        the candidates of authors over the cap are sorted: usually a few of ~2,500, or none."""
        a = self.author[c.item]
        over = np.flatnonzero(np.bincount(a)[a] > self.cap)
        if over.size == 0:
            return c
        # equal keys are one author's items at one score: any order among them is a ranking
        # (and numpy's SIMD sort, ~5x faster than the stable one here, repeats it)
        order = over[np.argsort(_author_then_score(a[over], c.scores["recall"][over]))]
        sa = a[order]
        starts = np.r_[0, np.flatnonzero(sa[1:] != sa[:-1]) + 1]
        rank = np.arange(sa.size) - np.repeat(starts, np.diff(np.r_[starts, sa.size]))
        keep = np.ones(a.size, bool)
        keep[order] = rank < self.cap
        return c.take(keep | (c.guaranteed >= Guarantee.COARSE))


def _author_then_score(author: np.ndarray, score: np.ndarray) -> np.ndarray:
    """One int64 key ordering by author, then by descending score: np.lexsort's order in one
    stable sort instead of two (float32 bits made monotone: flip all bits of negatives, set the
    sign bit of the rest; then negated for descending; + 0 makes -0.0 tie with 0.0 as it does there)."""
    bits = (np.asarray(score, np.float32) + np.float32(0)).view(np.uint32)
    mono = np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))
    return (author.astype(np.int64) << 32) | (np.uint32(0xFFFFFFFF) - mono).astype(np.int64)
