"""The synthetic world: users, items and a logged feed drawn from a known ground truth.

Because every label is drawn from `WorldTruth`, the whole funnel can be scored against an
oracle. Everything is vectorised numpy and deterministic for `cfg.seed`; no [users, items]
matrix is ever built, so a 1M-item catalog fits in a few GB.

Times are days; the log covers [0, days). Most items exist before the log starts
(negative creation days), a share appears during it and is shown only after creation, and a
`cold_share` appears in its last two days but is never shown by the logging policy: those
items exist and are servable, yet have no interactions.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from engine.core.sections import DataConfig
from model_export.dataset import Dataset
from model_export.progress import bar

TASKS = ("click", "like", "finish")
PROFILE_FIELDS, PROFILE_CARDINALITY = ("age_bucket", "region", "activity"), (6, 8, 4)
CONTEXT_FIELDS, CONTEXT_CARDINALITY = ("hour", "device"), (24, 3)

# Ground truth (logits of the conditional probabilities; see WorldTruth.conditional).
CLICK_TASTE, CLICK_QUALITY, CLICK_AFFINITY, CLICK_BIAS = 0.9, 0.5, 0.3, -2.4
LIKE_QUALITY, LIKE_TASTE, LIKE_BIAS = 1.0, 0.5, -2.2
FINISH_AFFINITY, FINISH_QUALITY, FINISH_TASTE, FINISH_BIAS = 0.4, 0.4, 0.8, 0.3
AFFINITY_FLOOR = 0.02          # log affinity is taken of (1-f)*aff + f/K: no -inf categories
ITEM_QUALITY_NOISE = 0.5       # std of an item's quality around its author's

# Logging policy.
EXPLORE_SHARE, POPULAR_SHARE = 0.10, 0.45    # the rest is taste-based
TASTE_CANDIDATES = 40          # per session: the random subset the noisy taste score ranks
POLICY_NOISE = 1.0             # std of the noise added to the true click logit by the policy
EXAM_DECAY = 0.35              # examination probability (1 + position) ** -EXAM_DECAY
SESSION_LEN = (6, 15)          # slots per session, uniform in [lo, hi): mean 10
COLD_WINDOW = 2.0              # cold items are created in (t_end - 2, t_end]
PREEXISTING_SHARE = 0.75       # of the non-cold items: created before the log starts

_CHUNK = 1 << 20               # (user, item) pairs per vectorised block


class WorldTruth:
    """The oracle. Conditional logits per task from user taste, item quality and category affinity."""

    def __init__(self, user_latent: np.ndarray, user_affinity: np.ndarray, item_latent: np.ndarray,
                 finish_projection: np.ndarray, item_quality: np.ndarray, item_category: np.ndarray,
                 author_quality: np.ndarray | None = None):
        k = user_affinity.shape[1]
        scale = np.float32(1 / np.sqrt(user_latent.shape[1]))
        self.user_latent = user_latent
        self.user_log_aff = np.log((1 - AFFINITY_FLOOR) * user_affinity + AFFINITY_FLOOR / k).astype(np.float32)
        self.item_latent = item_latent * scale
        self.item_finish = (item_latent @ finish_projection).astype(np.float32) * scale
        self.item_quality = item_quality
        self.author_quality = author_quality    # per item: its author's quality, all an item's author tells
        self.item_category = item_category

    def conditional(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """float32 [n, 3]: p(click), p(like | click), p(finish | click) for aligned index arrays."""
        out = np.empty((len(users), 3), np.float32)
        for s in _blocks(len(users)):
            u, i = users[s], items[s]
            ul = self.user_latent[u]
            out[s] = self._conditional(np.einsum("nd,nd->n", ul, self.item_latent[i]),
                                       np.einsum("nd,nd->n", ul, self.item_finish[i]),
                                       self.item_quality[i], self.user_log_aff[u, self.item_category[i]])
        return out

    def probs(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return _unconditional(self.conditional(users, items))

    def user_probs(self, user: int) -> np.ndarray:
        ul = self.user_latent[user]
        return _unconditional(self._conditional(self.item_latent @ ul, self.item_finish @ ul, self.item_quality,
                                                self.user_log_aff[user, self.item_category]))

    def click_logit(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """What the logging policy ranks by (plus its own noise)."""
        taste = np.einsum("nd,nd->n", self.user_latent[users], self.item_latent[items])
        return (CLICK_TASTE * taste + CLICK_QUALITY * self.item_quality[items]
                + CLICK_AFFINITY * self.user_log_aff[users, self.item_category[items]] + CLICK_BIAS)

    @staticmethod
    def _conditional(taste: np.ndarray, finish_taste: np.ndarray, quality: np.ndarray,
                     log_aff: np.ndarray) -> np.ndarray:
        click = CLICK_TASTE * taste + CLICK_QUALITY * quality + CLICK_AFFINITY * log_aff + CLICK_BIAS
        like = LIKE_QUALITY * quality + LIKE_TASTE * taste + LIKE_BIAS
        finish = FINISH_AFFINITY * log_aff + FINISH_QUALITY * quality + FINISH_TASTE * finish_taste + FINISH_BIAS
        return _sigmoid(np.stack([click, like, finish], axis=1)).astype(np.float32)


def world_parts(cfg: DataConfig) -> tuple[dict, dict, WorldTruth, np.random.Generator]:
    """The users, items and truth of the world for cfg.seed, and the generator the log draws from."""
    rng_cat, rng_users, rng_items, rng_log = (np.random.default_rng(s)
                                              for s in np.random.SeedSequence(cfg.seed).spawn(4))
    centroids, cat_weight = _categories(rng_cat, cfg)
    users = _users(rng_users, cfg, centroids, cat_weight)
    items = _items(rng_items, cfg, centroids, cat_weight)
    truth = WorldTruth(users["latent"], users["affinity"], items["latent"], items["finish_projection"],
                       items["quality"], items["category"], items["author_quality"])
    return users, items, truth, rng_log


def make_world(cfg: DataConfig) -> Dataset:
    """Build users, items and the logged feed; same cfg.seed -> byte-identical arrays."""
    users, items, truth, rng_log = world_parts(cfg)
    log = _log(rng_log, cfg, users, items, truth)
    days = float(cfg.days)
    return Dataset(
        name=f"synthetic-{cfg.seed}", tasks=TASKS,
        user_ids=_ids("u", cfg.n_users), item_ids=_ids("i", cfg.n_items),
        user_profile=users["profile"], profile_fields=PROFILE_FIELDS, profile_cardinality=PROFILE_CARDINALITY,
        context_fields=CONTEXT_FIELDS, context_cardinality=CONTEXT_CARDINALITY,
        item_category=items["category"], n_categories=cfg.n_categories,
        item_author=items["author"], n_authors=cfg.n_authors,
        item_content=items["content"], item_created=items["created"],
        **log,
        t_history=cfg.history_frac * days, t_valid=(1 - cfg.valid_frac) * days, t_end=days, truth=truth)


def _categories(rng: np.random.Generator, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Category centroids in latent space and Zipf-like category sizes."""
    centroids = rng.standard_normal((cfg.n_categories, cfg.latent_dim))
    weight = 1 / np.arange(1, cfg.n_categories + 1) ** 0.8
    return centroids, rng.permutation(weight / weight.sum())


def _users(rng: np.random.Generator, cfg: DataConfig, centroids: np.ndarray,
           cat_weight: np.ndarray) -> dict[str, np.ndarray]:
    """Taste = affinity-weighted category centroids + noise; profile fields are noisy views of taste/activity."""
    n, d = cfg.n_users, cfg.latent_dim
    affinity = rng.dirichlet(0.15 * cfg.n_categories * cat_weight, n)
    latent = (affinity @ centroids + 0.7 * rng.standard_normal((n, d))).astype(np.float32)
    activity = np.minimum(rng.pareto(2.0, n) + 1, 30.0)        # power-law impressions per user
    age_score = latent @ rng.standard_normal(d) / np.sqrt(d) + 0.7 * rng.standard_normal(n)
    age = np.searchsorted(np.quantile(age_score, np.linspace(0, 1, 7)[1:-1]), age_score)
    region = np.argmax(latent @ rng.standard_normal((d, 8)) / np.sqrt(d) + rng.gumbel(size=(n, 8)), axis=1)
    act_bucket = np.searchsorted(np.quantile(activity, [0.4, 0.7, 0.9]), activity)
    # device preference leans on age: young -> mobile (0), older -> desktop (1) / tablet (2)
    p_dev = np.stack([0.75 - 0.1 * age, 0.15 + 0.07 * age, 0.1 + 0.03 * age], axis=1)
    device = (rng.random(n)[:, None] > np.cumsum(p_dev, axis=1)[:, :2]).sum(axis=1)
    peak_hour = np.where(rng.random(n) < 0.7, rng.integers(19, 23, n), rng.integers(0, 24, n))
    return {"latent": latent, "affinity": affinity, "activity": activity, "device": device, "peak_hour": peak_hour,
            "profile": np.stack([age, region, act_bucket], axis=1).astype(np.int32)}


def _items(rng: np.random.Generator, cfg: DataConfig, centroids: np.ndarray,
           cat_weight: np.ndarray) -> dict[str, np.ndarray]:
    """Authors (home category, quality, taste offset) write items; popularity is Zipf, leaning on quality."""
    n, d, k, a = cfg.n_items, cfg.latent_dim, cfg.n_categories, cfg.n_authors
    home = rng.choice(k, a, p=cat_weight)
    author_quality = 0.6 * rng.standard_normal(a)
    author_offset = 0.5 * rng.standard_normal((a, d))
    author_cum = np.cumsum(rng.pareto(1.5, a) + 1)
    author = _pick(author_cum, rng.random(n) * author_cum[-1])
    category = np.where(rng.random(n) < 0.85, home[author], rng.choice(k, n, p=cat_weight))
    latent = (centroids[category] + author_offset[author] + 0.5 * rng.standard_normal((n, d))).astype(np.float32)
    quality = (author_quality[author] + ITEM_QUALITY_NOISE * rng.standard_normal(n)).astype(np.float32)
    rank = np.argsort(np.argsort(-(0.5 * quality + rng.standard_normal(n))))
    popularity = 1 / (rank + 1.0) ** 0.9
    content = latent @ rng.standard_normal((d, cfg.content_dim)) / np.sqrt(d)
    content = (content + 0.5 * rng.standard_normal((n, cfg.content_dim))).astype(np.float32)
    finish_projection = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
    days = float(cfg.days)
    cold = np.zeros(n, bool)
    cold[rng.permutation(n)[:round(cfg.cold_share * n)]] = True
    created = np.where(rng.random(n) < PREEXISTING_SHARE, -3 * days * rng.random(n), days * rng.random(n))
    created = np.where(cold, days - min(COLD_WINDOW, days) * rng.random(n), created)
    return {"category": category.astype(np.int32), "author": author.astype(np.int32), "latent": latent,
            "quality": quality, "author_quality": author_quality[author].astype(np.float32), "popularity": popularity, "content": content, "cold": cold,
            "created": created.astype(np.float32), "finish_projection": finish_projection}


def _log(rng: np.random.Generator, cfg: DataConfig, users: dict, items: dict,
         truth: WorldTruth) -> dict[str, np.ndarray]:
    """Sessions of ~10 slots filled by popularity, noisy-taste and uniform sampling; clicks under position bias."""
    n_items, days = cfg.n_items, float(cfg.days)
    mean_len = sum(SESSION_LEN) / 2 - 0.5
    per_user = cfg.impressions_per_user * users["activity"] / users["activity"].mean()
    n_sess = 1 + rng.poisson(np.maximum(per_user / mean_len - 1, 0))
    s_user = np.repeat(np.arange(cfg.n_users), n_sess)
    hour = (users["peak_hour"][s_user] + np.rint(3 * rng.standard_normal(len(s_user)))) % 24
    s_time = np.floor(rng.random(len(s_user)) * days) + (hour + rng.random(len(s_user))) / 24
    s_time = np.where(s_time >= days, s_time - 1, s_time)
    order = np.argsort(s_time, kind="stable")                  # time-sorted sessions -> time-sorted log
    s_user, s_time = s_user[order], s_time[order]
    s_len = rng.integers(*SESSION_LEN, len(s_user))
    start = np.cumsum(s_len) - s_len
    sess = np.repeat(np.arange(len(s_user)), s_len)
    n = len(sess)
    position = np.arange(n) - start[sess]
    user, time = s_user[sess], s_time[sess]

    servable = ~items["cold"]
    noncold = np.flatnonzero(servable)
    preexisting = np.flatnonzero(servable & (items["created"] <= 0))
    pop_cum = np.cumsum(items["popularity"] * servable)
    source = np.digitize(rng.random(n), [EXPLORE_SHARE, EXPLORE_SHARE + POPULAR_SHARE])  # 0 explore, 1 pop, 2 taste
    item = np.empty(n, np.int64)
    explore, popular = source == 0, source == 1
    item[explore] = noncold[rng.integers(len(noncold), size=explore.sum())]
    item[popular] = _pick(pop_cum, rng.random(popular.sum()) * pop_cum[-1])
    item[source == 2] = _taste_slots(rng, cfg, users, items, truth, s_user, s_time, source, start, sess)

    # Not-yet-created items and in-session repeats are redrawn uniformly, finally from pre-existing items.
    def bad() -> np.ndarray:
        return items["cold"][item] | (items["created"][item] > time) | _repeats(sess, item, n_items)

    for attempt in range(4):
        redo = bad()
        pool = preexisting if attempt == 3 else noncold
        item[redo] = pool[rng.integers(len(pool), size=redo.sum())]
    keep = ~bad()
    user, item, time, position, sess = user[keep], item[keep], time[keep], position[keep], sess[keep]

    labels = np.zeros((len(user), 3), np.int8)
    for s in _blocks(len(user), "labels"):
        p = truth.conditional(user[s], item[s])
        examined = rng.random(len(p)) < (1 + position[s]) ** -EXAM_DECAY
        click = examined & (rng.random(len(p)) < p[:, 0])
        labels[s] = np.stack([click, click & (rng.random(len(p)) < p[:, 1]),
                              click & (rng.random(len(p)) < p[:, 2])], axis=1)
    device = np.where(rng.random(len(user)) < 0.85, users["device"][user], rng.integers(0, 3, len(user)))
    log_time = np.minimum(time.astype(np.float32), np.nextafter(np.float32(days), np.float32(0)))
    return {"log_user": user.astype(np.int32), "log_item": item.astype(np.int32), "log_time": log_time,
            "log_position": position.astype(np.int16),
            "log_context": np.stack([np.floor(time % 1 * 24), device], axis=1).astype(np.int32),
            "log_labels": labels}


def _taste_slots(rng: np.random.Generator, cfg: DataConfig, users: dict, items: dict, truth: WorldTruth,
                 s_user: np.ndarray, s_time: np.ndarray, source: np.ndarray, start: np.ndarray,
                 sess: np.ndarray) -> np.ndarray:
    """Items for the taste slots: per session, the top by noisy true score among candidates drawn
    from the user's favourite categories (2/3) and by popularity (1/3)."""
    m = TASTE_CANDIDATES
    taste = source == 2
    rank = np.cumsum(taste) - taste                        # taste slots before this one...
    rank = rank - np.concatenate([[0], np.cumsum(taste)])[start][sess]   # ...within its session
    k_sess = np.bincount(sess[taste], minlength=len(s_user))
    sampler = TasteCandidates(cfg, users, items, truth)
    chosen = np.empty((len(s_user), int(k_sess.max(initial=0))), np.int64)
    for s in _blocks(len(s_user), "logging policy", _CHUNK // m):
        cand, score = sampler.draw(rng, np.repeat(s_user[s], m), np.repeat(s_time[s], m))
        cand, score = cand.reshape(-1, m), score.reshape(-1, m)
        top = np.argsort(-score, axis=1, kind="stable")[:, :chosen.shape[1]]
        chosen[s] = np.take_along_axis(cand, top, axis=1)
    return chosen[sess[taste], rank[taste]]


class TasteCandidates:
    """The logging policy's taste-slot candidates: drawn from the user's favourite categories (2/3,
    by sqrt popularity within the category) and by popularity (1/3), scored by the noisy true click
    logit (-inf for items not created yet or cold). Also what model_export.world_bounds simulates."""

    def __init__(self, cfg: DataConfig, users: dict, items: dict, truth: WorldTruth):
        self.n_cat, self.truth, self.items = cfg.n_categories, truth, items
        # category sampling by inverse CDF over every user's affinity row at once
        aff_cum = np.cumsum(users["affinity"], axis=1)
        aff_cum[:, -1] = 1.0
        self.aff_flat = (aff_cum + np.arange(cfg.n_users)[:, None]).ravel()
        self.by_cat = np.argsort(items["category"], kind="stable")
        self.weight_cum = np.cumsum((np.sqrt(items["popularity"]) * ~items["cold"])[self.by_cat])
        self.bounds = np.concatenate([[0], self.weight_cum])[np.searchsorted(items["category"][self.by_cat],
                                                                             np.arange(self.n_cat + 1))]
        self.pop_cum = np.cumsum(items["popularity"] * ~items["cold"])

    def draw(self, rng: np.random.Generator, u: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One candidate per entry of `u` (users) at times `t`, and its policy score."""
        n_cat = self.n_cat
        r = rng.random(len(u))
        cat = np.minimum(np.searchsorted(self.aff_flat, u + r, side="right") - u * n_cat, n_cat - 1)
        w = self.bounds[cat] + rng.random(len(u)) * (self.bounds[cat + 1] - self.bounds[cat])
        cand = self.by_cat[_pick(self.weight_cum, w)]
        by_pop = rng.random(len(u)) < 1 / 3
        cand[by_pop] = _pick(self.pop_cum, rng.random(by_pop.sum()) * self.pop_cum[-1])
        score = self.truth.click_logit(u, cand) + POLICY_NOISE * rng.standard_normal(len(u))
        score[(self.items["created"][cand] > t) | self.items["cold"][cand]] = -np.inf
        return cand, score


def _pick(cum: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Inverse CDF: the index whose cumulative-weight interval holds each value (zero weights never hit)."""
    return np.minimum(np.searchsorted(cum, values, side="right"), len(cum) - 1)


def _repeats(sess: np.ndarray, item: np.ndarray, n_items: int) -> np.ndarray:
    """True for every occurrence of an item after its first in the same session."""
    key = sess.astype(np.int64) * n_items + item
    order = np.argsort(key, kind="stable")
    dup = np.zeros(len(key), bool)
    dup[order[1:]] = key[order[1:]] == key[order[:-1]]
    return dup


def _blocks(n: int, desc: str | None = None, size: int = _CHUNK) -> Iterator[slice]:
    """Slices of at most `size`; a progress bar when described and more than one block."""
    starts = range(0, n, size)
    blocks = bar(starts, desc=desc or "", unit="block", disable=not desc or len(starts) < 2)
    return (slice(i, min(i + size, n)) for i in blocks)


def _ids(prefix: str, n: int) -> np.ndarray:
    """'<U' ids as narrow as the largest index needs (1M items: 32 bytes each, not 88)."""
    return np.char.add(prefix, np.arange(n).astype(f"<U{len(str(max(n - 1, 0)))}"))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _unconditional(cond: np.ndarray) -> np.ndarray:
    return np.concatenate([cond[:, :1], cond[:, :1] * cond[:, 1:]], axis=1)
