"""The online funnel on the real tiny bundle: routes, guarantees, filters, fail-open,
deadlines, experiments, events and bundle swap."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from engine.core import registry
from engine.core.bundle import load_bundle
from engine.core.errors import BundleError, DeadlineExceeded, InvalidRequest
from engine.core.candidates import Candidates
from engine.core.config import load_config, parse_config
from engine.core.registry import RouteParams
from engine.core.runner import Engine
from engine.core.request import Event, Request
from engine.store.embedded import EmbeddedStore
from stages.rerank_beam import fuse

pytestmark = pytest.mark.slow


class _Raises:
    def __init__(self, p, env):
        pass

    def __call__(self, ctx):
        raise RuntimeError("route down")


class _Blocks:
    """A route that answers only once the test releases it, so "the engine did not wait for it"
    is a fact of ordering (it had not finished when the response came back), not of timing."""

    def __init__(self, p, env):
        self.bit = env.route_bit
        self.release, self.finished = threading.Event(), threading.Event()
        _Blocks.last = self

    def __call__(self, ctx):
        self.release.wait(30)
        self.finished.set()
        return Candidates.from_route(np.arange(10), np.ones(10), self.bit)


@dataclass
class _NoParams:
    pass


class _Undeclared:
    """A stage that writes a score column its kind does not declare."""

    def __init__(self, p, env):
        pass

    def __call__(self, ctx, c):
        return c.with_columns({"surprise": np.zeros(len(c))})


@pytest.fixture
def own_kinds():
    """The test's own stage kinds, registered for one test and removed after it."""
    kinds = {"test_raises": (_Raises, True), "test_blocks": (_Blocks, True), "test_undeclared": (_Undeclared, False)}
    for name, (factory, recall) in kinds.items():
        registry.register(name, RouteParams if recall else _NoParams, recall=recall)(factory)
    yield
    for name in kinds:
        registry.unregister(name)


@pytest.fixture(scope="module")
def cfg(tiny_config):
    return load_config(tiny_config)


@pytest.fixture(scope="module")
def engine(cfg, tiny_bundle):
    e = Engine(cfg, load_bundle(tiny_bundle), make_store=EmbeddedStore)
    yield e
    e.close()


def _traced(engine, req):
    seen = {}
    resp = engine.recommend(req, observer=lambda name, c: seen.__setitem__(name, c))
    return resp, seen


def test_all_routes_contribute_and_list_is_full(engine, cfg):
    resp, stages = _traced(engine, Request(user_id="u7", count=20, debug=True))
    assert len(resp.item_ids) == 20 and not resp.degraded
    merged = stages["merge"]
    for bit, name in enumerate(["ann", "hot", "cold_start", "whitelist"]):
        assert (merged.routes & (1 << bit)).any(), f"route {name} contributed nothing"
    assert {t.name for t in resp.trace} >= {"ann", "hot", "cold_start", "whitelist", "fine", "rerank"}
    assert set(resp.task_scores) == {"click", "like", "finish"}
    rerank = cfg.stage["rerank"][1]      # the served score is the configured fusion of the served predictions
    fused = fuse(resp.task_scores, rerank.weights, rerank.fusion, rerank.eps)
    assert np.allclose(resp.scores, fused, rtol=1e-5)


def test_whitelist_guarantees_hold_to_their_stage(engine, cfg):
    ids = engine.item_index
    for user in ("u1", "u2", "u3", "nobody-new"):
        resp, stages = _traced(engine, Request(user_id=user, count=5))
        assert "i10" in resp.item_ids                               # final
        assert ids["i11"] in stages["fine"].item                   # fine: reaches the reranker
        assert ids["i12"] in stages["coarse_dnn"].item             # coarse: survives both cuts


def test_seen_and_excluded_never_come_back(engine):
    first = engine.recommend(Request(user_id="u11", count=20)).item_ids
    excluded = [x for x in first[:5] if x != "i10"]
    seen = [x for x in first[5:10] if x != "i10"]
    accepted, rejected = engine.report_events([Event("impression", "u11", i, 0) for i in seen])
    assert accepted == len(seen) and not rejected
    again = engine.recommend(Request(user_id="u11", count=20, exclude_item_ids=excluded)).item_ids
    assert not set(again) & (set(excluded) | set(seen))
    assert len(again) == 20


def test_unknown_user_gets_a_full_list_and_builds_history(engine):
    resp = engine.recommend(Request(user_id="fresh-user-1", count=30))
    assert len(resp.item_ids) == 30 and len(set(resp.item_ids)) == 30
    engine.report_events([Event("click", "fresh-user-1", resp.item_ids[3], 0)])
    assert resp.item_ids[3] not in engine.recommend(Request(user_id="fresh-user-1", count=30)).item_ids


def test_bad_events_are_rejected_with_reasons(engine):
    n, rejected = engine.report_events([Event("click", "u1", "i1", 0), Event("clack", "u1", "i1", 0),
                                        Event("click", "u1", "nope", 0), Event("click", "", "i1", 0)])
    assert n == 1 and [i for i, _ in rejected] == [1, 2, 3]
    assert "kind" in rejected[0][1] and "item_id" in rejected[1][1] and "user_id" in rejected[2][1]


def _with(cfg, recall=(), stages=(), sections=None):
    """The tiny config with extra routes/stages appended and no experiments."""
    raw = dict(cfg.raw)
    raw["pipeline"] = {"recall": [*raw["pipeline"]["recall"], *recall],
                       "stages": [*raw["pipeline"]["stages"], *stages]}
    raw["stage"] = {**raw["stage"], **(sections or {})}
    raw.pop("experiments")
    return parse_config(raw, str(cfg.path))


def test_route_that_raises_or_is_late_is_skipped(cfg, tiny_bundle, own_kinds):
    c = _with(cfg, ["broken", "slow"], sections={"broken": {"kind": "test_raises"},
                                                 "slow": {"kind": "test_blocks", "timeout_ms": 20.0}})
    e = Engine(c, load_bundle(tiny_bundle), make_store=EmbeddedStore, smoke=False)  # smoke would hit `broken`
    slow = _Blocks.last
    try:
        resp = e.recommend(Request(user_id="u3", count=10, debug=True))
        assert not slow.finished.is_set()      # answered while the late route was still running
    finally:
        slow.release.set()
        e.close()
    status = {t.name: t.status for t in resp.trace}
    assert status["broken"] == "failed" and status["slow"] == "timeout"
    assert len(resp.item_ids) == 10
    assert slow.finished.wait(30)              # released, the abandoned route ends on its pool thread


def test_passed_deadline_runs_only_the_filters(engine, cfg, tiny_bundle):
    """A deadline that has passed by the time recall ends: the filters (guards) still run, so
    nothing excluded or already seen is served; every other stage is skipped and the answer is
    the filtered candidates by recall score, degraded (or DEADLINE_EXCEEDED when configured so)."""
    stages = cfg.pipeline.stages
    guards = [n for n in stages if cfg.stage[n][0] == "filter"]
    full = engine.recommend(Request(user_id="u5", count=10, deadline_ms=1e-6))
    exclude = full.item_ids[:3]
    resp = engine.recommend(Request(user_id="u5", count=10, deadline_ms=1e-6, exclude_item_ids=exclude))
    assert resp.degraded and len(resp.item_ids) == 10
    status = {t.name: t.status for t in resp.trace if t.name in stages}
    assert status == {n: "ok" if n in guards else "skipped" for n in stages}
    served = {engine.item_index[i] for i in resp.item_ids}
    seen = engine.hydrate(Request(user_id="u5")).user.seen
    assert not served & set(seen[seen >= 0].tolist()) and not set(exclude) & set(resp.item_ids)
    strict = Engine(load_config(cfg.path, ["serving.on_deadline='error'"]), load_bundle(tiny_bundle),
                    make_store=EmbeddedStore)
    first_ranker = next(n for n in stages if n not in guards)
    try:
        with pytest.raises(DeadlineExceeded, match=f"before stage {first_ranker}"):
            strict.recommend(Request(user_id="u5", count=10, deadline_ms=1e-6))
        with pytest.raises(DeadlineExceeded, match="no time to serve"):
            strict.recommend(Request(user_id="u5", count=10, deadline_ms=-3.0))
    finally:
        strict.close()


def test_fine_ranking_skipped_when_its_budget_does_not_fit(cfg, tiny_bundle):
    raw = dict(cfg.raw)
    raw["stage"] = {**raw["stage"], "fine": {**raw["stage"]["fine"], "budget_ms": 1e9}}
    c = parse_config(raw, str(cfg.path))
    e = Engine(c, load_bundle(tiny_bundle), make_store=EmbeddedStore)
    try:
        resp, seen = _traced(e, Request(user_id="u5", count=10, deadline_ms=600_000))
    finally:
        e.close()
    status = {t.name: t.status for t in resp.trace}
    assert resp.degraded and status["fine"] == "skipped" and status["rerank"] == "ok"
    assert resp.task_scores == {} and len(resp.item_ids) == 10
    coarse = seen["coarse_dnn"]          # without task scores the rerank fuses the coarse score
    dnn = dict(zip(coarse.item.tolist(), coarse.scores["dnn"].tolist()))
    assert np.allclose(resp.scores, [dnn[i] for i in seen["rerank"].item.tolist()])


def test_experiment_overrides_take_effect(engine):
    resp = engine.recommend(Request(user_id="u9", count=10, experiment="clicks_only"))
    assert resp.experiment == "clicks_only"
    assert np.allclose(resp.scores, resp.task_scores["click"])
    with pytest.raises(InvalidRequest, match="experiment"):
        engine.recommend(Request(user_id="u9", experiment="nope"))


_ASSIGN = """
import json, sys
from engine.core.config import load_config
cfg = load_config(sys.argv[1])
print(json.dumps([cfg.experiment_for(f"user-{i}") for i in range(int(sys.argv[2]))]))
"""


def test_experiment_split_is_stable_across_processes_and_matches_shares(engine, cfg):
    """Another process (another hash seed) assigns every user as this one does, the engine
    serves each user the arm the config assigns, and arm sizes follow the configured shares."""
    n = 20_000
    here = [cfg.experiment_for(f"user-{i}") for i in range(n)]
    out = subprocess.run([sys.executable, "-c", _ASSIGN, str(cfg.path), str(n)], check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert json.loads(out) == here
    for i in range(0, 400, 10):
        assert engine.recommend(Request(user_id=f"user-{i}", count=5)).experiment == here[i]
    for name, e in cfg.experiments.items():        # greedy 0.25, clicks_only 0.0 (explicit requests only)
        assert here.count(name) / n == pytest.approx(e.share, abs=0.01)
    assert here.count("") / n == pytest.approx(1 - sum(e.share for e in cfg.experiments.values()), abs=0.01)


@pytest.mark.parametrize("req,field", [
    (Request(user_id="", count=5), "user_id"),
    (Request(user_id="u1", count=-1), "count"),
    (Request(user_id="u1", count=10_000), "count"),
    (Request(user_id="u1", exclude_item_ids=["i1"] * 2000), "exclude_item_ids"),
    (Request(user_id="u1", exclude_item_ids=[""]), "exclude_item_ids"),
    (Request(user_id="u1", context={"hour": 99}), "context.hour"),
    (Request(user_id="u1", context={"weather": 1}), "context.weather"),
])
def test_bad_requests_name_the_field(engine, req, field):
    with pytest.raises(InvalidRequest) as e:
        engine.recommend(req)
    assert e.value.field == field and str(e.value).startswith(f"{field}: ")


def test_request_is_validated_into_a_copy(engine, cfg):
    req = Request(user_id="u7")
    resp = engine.recommend(req)
    assert len(resp.item_ids) == cfg.serving.default_count
    assert req.count == 0 and req.deadline_ms is None        # the caller's request is left as it was


def test_hydrate_seam_gives_what_stages_see(engine, cfg):
    ctx = engine.hydrate(Request(user_id="u7", count=5, context={"hour": 3}))
    assert ctx.request.count == 5 and ctx.experiment == cfg.experiment_for("u7")
    assert ctx.context[0, 0] == 3 and ctx.user_e.shape[0] == 1
    row = ctx.ranker_user                       # computed on first use, then the same array
    assert row.shape[0] == 1 and row.dtype == np.float32 and ctx.ranker_user is row
    assert [s.name for s in engine.pipeline().stages] == cfg.pipeline.stages
    assert engine.pipeline("greedy").stages[-1].fn is not engine.pipeline().stages[-1].fn   # its own rerank


def test_non_finite_event_times_are_refused_and_never_reach_the_counters(engine):
    item = "i20"
    before = [x.copy() for x in engine.store.item_stats(np.array([engine.item_index[item]]))]
    events = [Event("click", "u-nan", item, math.nan), Event("click", "u-nan", item, math.inf),
              Event("click", "u-nan", item, -math.inf), Event("click", "u-nan", item, 0)]
    accepted, rejected = engine.report_events(events)
    assert accepted == 1 and [i for i, _ in rejected] == [0, 1, 2]
    assert all(reason.startswith("timestamp: ") for _, reason in rejected)
    after = engine.store.item_stats(np.array([engine.item_index[item]]))
    assert all(np.isfinite(a).all() for a in after)
    assert after[0][0] == before[0][0] and after[1][0] == before[1][0] + 1     # one click counted, no impression
    top, hot = engine.store.hot_top(50)
    assert np.isfinite(hot).all()


def test_smoke_request_holds_stages_to_their_declared_writes(cfg, tiny_bundle, own_kinds):
    c = _with(cfg, stages=["liar"], sections={"liar": {"kind": "test_undeclared"}})
    with pytest.raises(BundleError, match="stage 'liar' .*wrote score:surprise, which its kind does not declare"):
        Engine(c, load_bundle(tiny_bundle), make_store=EmbeddedStore)


def test_swap_refuses_a_bad_bundle_and_keeps_serving(engine, tiny_bundle, tmp_path):
    import shutil
    good = load_bundle(tiny_bundle)
    bad_dir = tmp_path / "bad"
    shutil.copytree(good.path, bad_dir)
    (bad_dir / "models" / "fine.onnx").write_bytes(b"not a model")
    with pytest.raises(BundleError):
        engine.swap_bundle(load_bundle(bad_dir, verify=False))
    assert engine.bundle_version == good.version
    assert len(engine.recommend(Request(user_id="u1", count=5)).item_ids) == 5


def test_compiled_trees_match_lightgbm(tiny_bundle):
    """lleaves (served) and LightGBM's own predict agree on real coarse features."""
    from engine.core.sections import ServingConfig
    from engine.core.models import Models

    b = load_bundle(tiny_bundle)
    x = np.random.default_rng(0).random((500, len(b.manifest["schema"]["coarse_features"]))).astype(np.float32)
    fast = Models(b, ServingConfig(tree_runtime="lleaves")).predict_trees(x)
    ref = Models(b, ServingConfig(tree_runtime="native")).predict_trees(x)
    assert np.allclose(fast, ref, atol=1e-5)


def test_the_fresh_content_slot_pins_a_young_item_and_favours_the_clicked_ones(cfg, tiny_bundle):
    """stage.cold_start.pin = 1: every list holds one of the user's matched young items, and the
    Thompson draw over the counters pins the one whose impressions were clicked nearly every time."""
    bundle = load_bundle(tiny_bundle)
    e = Engine(load_config(cfg.path, ["stage.cold_start.pin=1"]), bundle, make_store=EmbeddedStore)
    try:
        for k in range(30):
            resp = e.recommend(Request(user_id=f"u{k}", count=20))
            assert any("cold_start" in r for r in resp.routes), f"u{k}: no young item in the list"
        seen = {}
        e.recommend(Request(user_id="u3", count=20, request_id="probe"), observer=lambda name, c: seen.setdefault(name, c))
        m = seen["merge"]
        only_young = np.flatnonzero(m.routes == 1 << 2)          # found by cold_start alone (bits as above)
        matched = only_young[np.argsort(-m.scores["recall"][only_young])]
        good = str(bundle.item_ids[m.item[matched[3]]])            # a good content match, not the best one
        def served() -> int:
            return sum(good in e.recommend(Request(user_id="u3", count=20, request_id=f"r{j}")).item_ids
                       for j in range(30))

        before = served()
        now = time.time()
        e.report_events([Event(kind, f"v{j}", good, now) for j in range(8) for kind in ("impression", "click")])
        after = served()      # its draw from Beta(9, 19) beats the ~80 unclicked ones' Beta(1, 19) most times
        assert before <= 5 and after >= 20, (before, after)
    finally:
        e.close()
