"""What bounds recovery from the drift: the base bundle served in process to the online users
of the drifted world, with parts of its inputs replaced by what a perfect update of that part
would give, each scored as the simulator scores lists (oracle-normalised utility).

- history: the shifted users' recent positives are their donor's (the users whose tastes they
  took): what the live feature store reaches once their clicks have refilled their history.
- id rows: the shifted users' id-embedding rows are their donor's: the best a refresh of the
  user rows could learn (the towers are frozen).
- counters: the launched items carry impressions and clicks at their true click rate: what the
  live counters reach once the items have been shown enough.
Also where the launched items are lost in the funnel (per stage, mean per list).
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import numpy as np

from engine.core.bundle import Bundle
from engine.core.config import Config
from engine.core.request import Request
from engine.core.runner import Engine
from engine.store.embedded import EmbeddedStore
from loadtest.simulate.world import SimWorld, scores, unseen
from model_export.cascade import StoppedClock
from model_export.evaluate import DEADLINE_MS

COUNTER_IMPRESSIONS = 50.0


def bounds(cfg: Config, bundle: Bundle, world: SimWorld, users: int = 300) -> dict[str, Any]:
    """Utility of the online users under each variant, before and after the drift."""
    sc = cfg.simulate
    sample = world.active[:users]
    out: dict[str, Any] = {"users": int(sample.size), "pre_drift": _serve(cfg, bundle, world, sample)}
    out["drift"] = world.drift(sc.launch_quality)
    donor = dict(zip(world.shifted.tolist(), np.roll(world.shifted, 1).tolist()))
    shifted = np.array([u for u in sample if u in donor], np.int64)
    d = np.array([donor[u] for u in shifted], np.int64)
    st, t = bundle.state, bundle.tables
    history = dataclasses.replace(st, user_recent=np.array(st.user_recent))
    history.user_recent[shifted] = st.user_recent[d]
    rows = dataclasses.replace(t, user_id_emb=np.array(t.user_id_emb))
    rows.user_id_emb[shifted] = t.user_id_emb[d]
    launched = world.cold
    p_click = np.mean([world.truth.probs(np.full(int(launched.sum()), u), np.flatnonzero(launched))[:, 0]
                       for u in sample[:50]], axis=0)
    counters = dataclasses.replace(st, item_n_imp=np.array(st.item_n_imp), item_n_pos=np.array(st.item_n_pos))
    counters.item_n_imp[launched] += COUNTER_IMPRESSIONS
    counters.item_n_pos[launched] += COUNTER_IMPRESSIONS * p_click
    out["after_drift"] = {
        "base": _serve(cfg, bundle, world, sample),
        "shifted_users": {
            "users": int(shifted.size),
            "base": _serve(cfg, bundle, world, shifted),
            "donor_id_rows": _serve(cfg, dataclasses.replace(bundle, tables=rows), world, shifted),
            "donor_history": _serve(cfg, dataclasses.replace(bundle, state=history), world, shifted),
        },
        "launched_counters": _serve(cfg, dataclasses.replace(bundle, state=counters), world, sample),
    }
    return out


def _serve(cfg: Config, bundle: Bundle, world: SimWorld, users: np.ndarray) -> dict[str, Any]:
    """The lists the engine serves these users (bundle state, clock stopped), scored."""
    store = EmbeddedStore(bundle)
    store.clock = StoppedClock(float(bundle.state.time))
    engine = Engine(cfg, bundle, store=store)
    ds, launched = world.ds, world.cold
    index = {str(i): k for k, i in enumerate(bundle.item_ids)}
    funnel: dict[str, list[int]] = defaultdict(list)
    got = []
    rng = np.random.default_rng(0)
    try:
        for u in users:
            ctx = world.context(int(u), rng)
            r = engine.recommend(Request(str(ds.user_ids[u]), 20, ctx, deadline_ms=DEADLINE_MS),
                                 observer=lambda name, c: funnel[name].append(int(launched[c.item].sum())))
            eligible = unseen(np.asarray(bundle.state.user_seen[u]), ds.n_items)
            got.append(scores(world.value(int(u)), np.array([index[i] for i in r.item_ids]), eligible)[:3])
    finally:
        engine.close()
    util, oracle, uniform = (np.mean([g[k] for g in got]) for k in range(3))
    return {"utility_norm": float((util - uniform) / (oracle - uniform)),
            "launched_per_list": {k: float(np.mean(v)) for k, v in funnel.items()}}
