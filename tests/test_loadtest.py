"""Load generators, report and kernel floor against the real server on the tiny bundle."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loadtest.cli import demo_summary, main
from loadtest.generator import Users
from loadtest.target import Server

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server(tiny_config, tiny_bundle, tmp_path_factory):
    with Server(tiny_config, tiny_bundle, workers=1, log=tmp_path_factory.mktemp("loadtest") / "server.stderr") as s:
        yield s


def _load(server: Server, bundle: Path, out: Path, *argv: str) -> dict:
    assert main([*argv, "--target", server.target, "--bundle", str(bundle), "--server-pid", str(server.pid),
                 "--duration", "2", "--warmup", "0.5", "--out", str(out)]) == 0
    for name in ("latency_vs_qps.png", "stages.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert "| load |" in (out / "report.md").read_text()
    return json.loads((out / "report.json").read_text())


def _check_counts(r: dict) -> None:
    assert r["sent"] > 0 and r["sent"] == r["ok"] + sum(r["errors"].values())
    assert r["sent"] == sum(m["sent"] for m in r["methods"].values())
    for m in r["methods"].values():
        assert m["sent"] == m["ok"] + sum(m["errors"].values())
    lat = [r["latency_ms"][k] for k in ("p50", "p90", "p99", "p99.9", "max")]
    assert 0 < lat[0] and lat == sorted(lat)
    assert r["server"]["cpu_cores"] > 0 and r["server"]["rss_mb_peak"] > 0


@pytest.mark.slow
def test_closed_loop_with_events_and_metrics(server, tiny_bundle, tmp_path):
    rep = _load(server, tiny_bundle, tmp_path, "closed", "--concurrency", "2", "--event-ratio", "0.2",
                "--metrics-url", server.metrics_url)
    (t,) = rep["targets"]
    (r,) = t["runs"]
    _check_counts(r)
    assert r["mode"] == "closed" and r["concurrency"] == 2 and r["achieved_qps"] > 0
    assert r["methods"]["ReportEvents"]["ok"] > 0 and r["methods"]["Recommend"]["ok"] > 0
    assert r["server_workers_seen"] == 1
    names = [s["name"] for s in r["stages"]]
    assert {"ann", "coarse_trees", "fine", "rerank"} <= set(names)
    assert {s["source"] for s in r["stages"]} == {"prometheus"}


@pytest.mark.slow
def test_open_loop_poisson_with_traces(server, tiny_bundle, tmp_path):
    rep = _load(server, tiny_bundle, tmp_path, "open", "--qps", "50", "--trace-sample", "0.5")
    r = rep["targets"][0]["runs"][0]
    _check_counts(r)
    assert r["mode"] == "open" and r["offered_qps"] == 50
    assert 50 <= r["sent"] <= 170                        # Poisson(100) over the 2 s window
    assert r["send_lag_ms"]["p50"] >= 0
    assert r["stages"] and {s["source"] for s in r["stages"]} == {"trace"}


@pytest.mark.slow
def test_overload_times_refusals_from_the_schedule_and_from_the_send(tiny_config, tiny_bundle, tmp_path):
    # admission refuses every call that finds the one worker busy (no burst allowance): at 400 QPS most are refused
    with Server(tiny_config, tiny_bundle, workers=1, log=tmp_path / "server.stderr",
                extra=("--set", "serving.max_queue_ms=0.001", "--set", "serving.queue_burst_ms=0")) as s:
        rep = _load(s, tiny_bundle, tmp_path / "out", "open", "--qps", "400")
    r = rep["targets"][0]["runs"][0]
    _check_counts(r)
    by = r["latency_by_outcome_ms"]
    assert r["errors"]["RESOURCE_EXHAUSTED"] > 0 and {"ok", "refused", "refused_from_send"} <= set(by)
    for k in ("p50", "p99", "max"):         # per call, the send is never before its scheduled time
        assert 0 < by["refused_from_send"][k] <= by["refused"][k]
    assert "from the actual send" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.slow
def test_sweep_reports_highest_sustainable_qps(server, tiny_bundle, tmp_path):
    rep = _load(server, tiny_bundle, tmp_path, "sweep", "--qps-start", "20", "--qps-step", "20",
                "--qps-max", "40", "--slo-ms", "2000")
    t = rep["targets"][0]
    assert [r["offered_qps"] for r in t["runs"]][:1] == [20]
    assert t["sweep"]["max_sustainable_qps"] in (None, 20, 40)
    for r in t["runs"]:
        _check_counts(r)


@pytest.mark.slow
def test_soak_reports_every_interval_with_rss_and_a_verdict(server, tiny_bundle, tmp_path):
    assert main(["soak", "--target", server.target, "--bundle", str(tiny_bundle), "--server-pid", str(server.pid),
                 "--qps", "40", "--event-ratio", "0.333", "--duration", "3", "--interval", "1", "--warmup", "0.5",
                 "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "report.json").read_text())["targets"][0]["runs"][0]
    _check_counts(r)
    rows = r["intervals"]
    assert [row["interval"] for row in rows] == [0, 1, 2]
    assert sum(row["ok"] + sum(row["errors"].values()) for row in rows) == r["methods"]["Recommend"]["sent"]
    assert all(row["server"]["rss_mb"] > 0 and row["latency_ms"]["p99"] > 0 for row in rows[:2])
    assert all(0 < row["server"]["private_mb"] <= row["server"]["pss_mb"] <= row["server"]["rss_mb"] for row in rows[:2])
    assert r["methods"]["ReportEvents"]["ok"] > 0
    from loadtest.soak import verdict

    v = verdict(r)
    assert v["errors"] == 0 and v["rss_growth"] is not None and v["passed"] == (v["rss_growth"] <= 0.05)
    md = (tmp_path / "report.md").read_text()
    assert "### Soak: 40 calls/s" in md and ("**passed**" in md or "**FAILED**" in md)
    assert (tmp_path / "soak.png").read_bytes()[:8] == PNG


@pytest.mark.slow
def test_demo_summary_prints_five_lines(server, tiny_bundle, capsys):
    r = demo_summary(server.target, tiny_bundle, seconds=1.0, concurrency=2, server_pid=server.pid)
    assert r["sent"] == r["ok"] + sum(r["errors"].values())
    assert len(capsys.readouterr().out.strip().splitlines()) == 5


@pytest.mark.slow
def test_kernel_floor(tiny_config, tiny_bundle):
    from loadtest.floor import format_floor, measure

    f = measure(tiny_config, tiny_bundle, requests=10, reps=1)
    kernels = {k["kernel"].split(" k=")[0] for k in f["kernels"]}
    assert kernels == {"faiss search", "lightgbm predict", "onnx user_tower", "onnx coarse_dnn", "onnx fine",
                       "beam search"}
    assert 0 < f["floor_ms"] and f["engine_ms"]["p50"] > 0
    assert "sum of kernel p50s" in format_floor(f)


@pytest.mark.slow
def test_in_process_ab_runs_each_arm_with_its_own_overrides(tiny_config, tiny_bundle):
    from loadtest.inproc_ab import format_ab, measure

    r = measure(tiny_config, tiny_bundle, {"a": [], "b": ["stage.coarse_trees.keep=150"]}, requests=20, block=5)
    a, b = r["arms"]["a"], r["arms"]["b"]
    assert a["requests"] == b["requests"] == 20
    assert b["stages_rows_out"]["coarse_trees"] == 150 < a["stages_rows_out"]["coarse_trees"]
    assert 0 < a["p50"] <= a["p99"] and 0 < b["p50"] <= b["p99"]
    assert "b / a" in format_ab(r)


def test_ab_report_gives_the_refusals_p99_of_the_rounds_that_refused():
    import argparse

    from loadtest.ab import _markdown

    def row(p50, refused):
        return {"round": 0, "load": 1.0, "p50": p50, "p99": 2 * p50, "qps": 10.0, "cores": 0.5,
                "errors": {"RESOURCE_EXHAUSTED": 3} if refused else {}, "refused": refused}

    results = {"a": {"open:9": [row(10, {"refused": 6.0, "refused_from_send": 5.0}), row(12, {}),
                                row(11, {"refused": 8.0, "refused_from_send": 7.0})]},
               "b": {"open:9": [row(5, {}), row(6, {}), row(7, {})]}}
    md = _markdown(results, argparse.Namespace(rounds=3, duration=1.0, config="c", bundle="b", level=[("open:9", {})]))
    a_line, b_line = (next(x for x in md.splitlines() if x.startswith(f"| open:9 | {n} ")) for n in "ab")
    assert "| 6 | 7.00 (6.00) |" in a_line         # errors summed; the median of the two refusing rounds
    assert "| 0 |  | 0.55 | 0.55 |" in b_line                          # none refused: blank; ratios vs a


def test_users_are_zipf_skewed_with_unknown_share():
    ids = np.array([f"u{i}" for i in range(1000)])
    users = Users(ids, s=1.1, unknown_share=0.1, seed=0, stream=0)
    draws = [users.next() for _ in range(20_000)]
    known = set(ids.tolist())
    new = [u for u in draws if u not in known]
    assert 0.08 < len(new) / len(draws) < 0.12 and len(set(new)) == len(new)
    counts = np.sort(np.unique([u for u in draws if u.startswith("u")], return_counts=True)[1])[::-1]
    assert counts[0] > 20 * np.median(counts)            # a heavy head, a long tail
    same = Users(ids, s=1.1, unknown_share=0.1, seed=0, stream=1)
    assert same.ids[0] == users.ids[0]                   # every process shares the popularity order
