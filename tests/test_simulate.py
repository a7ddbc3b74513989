"""`recserve simulate` end to end on the tiny world: two real servers, a real joiner and a real
trainer, simulated users answering from the ground truth, the drift, the report and the plot."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO

pytestmark = pytest.mark.slow


def test_a_short_simulation_serves_a_streamed_version_within_the_run(tiny_bundle, tiny_config, tmp_path):
    out = tmp_path / "sim"
    # 40 users online, 2 lists a simulated minute each, 10 calls/s: simulated minutes of 8 s
    run = subprocess.run(
        [sys.executable, "-m", "engine.cli.main", "simulate", "--config", str(tiny_config), "--minutes", "3",
         "--out", str(out), "--bundle", str(tiny_bundle), "--set", "simulate.active_users=40",
         "--set", "simulate.qps=10", "--set", "simulate.window_s=2.0", "--set", "stream.publish_s=3",
         "--set", "stream.holdout_rows=300", "--set", "stream.min_rows=200", "--set", "stream.auc_margin=1.0"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    r = json.loads((out / "simulate.json").read_text())
    assert r["time_scale"]["minute_s"] == 8.0 and len(r["minutes"]) == 3
    assert r["drift"]["shifted_users"] > 0 and r["drift"]["launched_items"] > 0
    for m in r["minutes"]:
        for arm in ("frozen", "streaming"):
            assert m[arm]["requests"] > 0 and np.isfinite(m[arm]["utility_norm"])
    wall = r["time_scale"]["wall_seconds"]
    served = [v for v in r["versions"] if v["first_served_s"] is not None]
    assert served and min(v["first_served_s"] for v in served) < wall       # a streamed version served in the run
    assert all(v["first_served_s"] >= v["published_s"] for v in served)     # and not before it was published
    assert r["freshness"]["events"] > 0 and 0 < r["freshness"]["p50_s"] < wall
    assert r["minutes"][-1]["streaming"]["join_rate"] is not None
    assert (out / "simulate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a busy machine may shed load (admission's RESOURCE_EXHAUSTED, a deadline): counted, never another error
    assert not [k for k in r["load"]["errors"] if not k.endswith(("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"))]


def test_bounds_serve_the_drifted_world_with_each_perfect_update(tiny_bundle, tiny_config):
    """`recserve simulate --bounds` in process: the drift lowers the oracle-normalised utility of
    the base bundle, and every variant is scored over the same users with the launched items
    traced through the funnel."""
    from engine.core.bundle import load_bundle
    from engine.core.config import load_config
    from engine.core.sections import DataConfig
    from loadtest.simulate.bounds import bounds
    from loadtest.simulate.world import SimWorld
    from model_export.data import load_dataset

    cfg = load_config(tiny_config)
    bundle = load_bundle(tiny_bundle)
    ds = load_dataset(DataConfig(**bundle.manifest["config"]["data"]))
    world = SimWorld(ds, cfg.stage["rerank"][1], active=60, seed=0, shift_share=0.5)
    r = bounds(cfg, bundle, world, users=60)
    after = r["after_drift"]
    assert r["drift"]["launched_items"] == int(world.cold.sum()) > 0
    assert after["base"]["utility_norm"] < r["pre_drift"]["utility_norm"]       # the oracle moved, the bundle did not
    shifted = after["shifted_users"]
    assert shifted["users"] > 0
    for variant in ("base", "donor_id_rows", "donor_history"):
        assert np.isfinite(shifted[variant]["utility_norm"])
    funnel = after["launched_counters"]["launched_per_list"]
    assert list(funnel)[-1] == "rerank" and funnel["rerank"] <= funnel[list(funnel)[0]]
