"""The untuned baseline server: same proto, same models and features as the engine, and the
load test's side-by-side run against it."""
from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from engine.core.bundle import load_bundle
from engine.core.config import load_config
from engine.core.runner import Engine
from engine.core.request import Request
from engine.store.embedded import EmbeddedStore
from loadtest.baseline import BaselineServer
from loadtest.cli import main
from protos import pb2, pb2_grpc

# Top-20 overlap with the engine's served list, mean over users. Measured 0.79 on the tiny
# bundle (30 users, min 0.45) and 0.81 on the default one (40 users, min 0.5): the rest
# is the engine's beam search and diversity terms, its whitelist guarantees and its hot
# and cold-start variants, as the scores of the items both lists hold agree to ~1e-7.
MIN_MEAN_OVERLAP = 0.6


@pytest.fixture(scope="module")
def baseline(tiny_config, tiny_bundle):
    with BaselineServer(tiny_config, tiny_bundle) as b, grpc.insecure_channel(b.target) as channel:
        yield pb2_grpc.RecServeStub(channel)


@pytest.mark.slow
def test_baseline_answers_through_the_proto(baseline):
    resp = baseline.Recommend(pb2.RecommendRequest(user_id="loadtest-new-user", count=7, debug=True), timeout=30)
    assert len(resp.items) == 7 and resp.bundle_version and resp.total_ms > 0
    scores = [it.score for it in resp.items]
    assert scores == sorted(scores, reverse=True)
    assert all(set(it.predictions) == {"click", "like", "finish"} and it.routes for it in resp.items)
    assert [t.name for t in resp.trace][:2] == ["hydrate", "ann"] and resp.trace[-1].name == "rerank"
    with pytest.raises(grpc.RpcError) as e:
        baseline.ReportEvents(pb2.ReportEventsRequest(), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.slow
def test_baseline_list_overlaps_the_engines(baseline, tiny_config, tiny_bundle):
    """Same models and features: the items both lists hold score alike, and most items are shared."""
    bundle = load_bundle(tiny_bundle)
    engine = Engine(load_config(tiny_config), bundle, make_store=EmbeddedStore)
    try:
        users = np.asarray(bundle.user_ids)[np.random.default_rng(0).choice(len(bundle.user_ids), 20, replace=False)]
        overlaps = []
        for user in users.tolist():
            ref = engine.recommend(Request(user_id=user, count=20))
            got = baseline.Recommend(pb2.RecommendRequest(user_id=user, count=20), timeout=30)
            ref_scores = dict(zip(ref.item_ids, ref.scores.tolist()))
            shared = [it for it in got.items if it.item_id in ref_scores]
            assert all(abs(it.score - ref_scores[it.item_id]) < 1e-4 for it in shared)
            overlaps.append(len(shared) / 20)
    finally:
        engine.close()
    assert np.mean(overlaps) >= MIN_MEAN_OVERLAP, overlaps


@pytest.mark.slow
def test_side_by_side_closed_loop_reports_both(tiny_config, tiny_bundle, tmp_path):
    assert main(["closed", "--config", str(tiny_config), "--bundle", str(tiny_bundle), "--baseline",
                 "--workers", "1", "--concurrency", "2", "--duration", "2", "--warmup", "0.5",
                 "--trace-sample", "0.2", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert [t["name"] for t in rep["targets"]] == ["recserve", "baseline"]
    for t in rep["targets"]:
        (r,) = t["runs"]
        assert r["ok"] > 0 and r["sent"] == r["ok"] + sum(r["errors"].values())
        assert r["server"]["cpu_cores"] > 0
    assert {"coarse_trees", "fine"} <= {s["name"] for s in rep["targets"][1]["runs"][0]["stages"]}
    assert "## Side by side" in (tmp_path / "report.md").read_text()


def test_sweep_ratio_compares_highest_sustainable_qps():
    from loadtest.report import sweep_ratio

    def target(name: str, best: float | None) -> dict:
        return {"name": name, "sweep": {"slo_ms": 50.0, "max_sustainable_qps": best}}

    assert sweep_ratio({"targets": [target("recserve", 300), target("baseline", 100)]}).endswith("ratio 3.0x")
    assert "n/a" in sweep_ratio({"targets": [target("recserve", 300), target("baseline", None)]})
    assert sweep_ratio({"targets": [target("recserve", 300)]}) is None
