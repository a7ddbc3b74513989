"""The baseline: the same models behind the same proto, served the way a first version would be.

The load test reports recserve beside it (`python -m loadtest sweep ... --baseline`), so the
gain of the engine's serving work (ONNX Runtime, compiled trees, concurrent routes, worker
processes, tuned thread pools, deadlines) is a measured ratio, not a claim. Deliberately
untuned: torch eager models from the training checkpoints under `torch.no_grad()`,
LightGBM's own `Booster.predict`, the bundle's faiss index, every library at its default
thread count; the recall routes run one after another; one process, grpc's sync server with
its default thread pool, no in-flight limit, no deadlines, no experiments.

It runs the config's funnel with the config's sizes, and its features come from
engine/featurize.py over the bundle's tables and end-of-log state, so its lists are
comparable with the engine's. Where it differs on purpose: hot recall is the global top
only (no favourite-category slices), cold start has no exploration share, whitelisted items
are plain candidates (no segments, no guarantees), and rerank is a sort by the same fused
score (stages.rerank_beam.fuse) without beam search or diversity terms. The feature state
is frozen (ReportEvents answers UNIMPLEMENTED), so the hot list and the cold pool are
computed once at start.

    python -m loadtest.baseline --config configs/default.toml --bundle bundles/default --port 0
    # prints "baseline serving on HOST:PORT" when ready
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import faiss
import grpc
import lightgbm as lgb
import numpy as np
import torch

from engine.app.ready import print_ready
from engine.core import featurize
from engine.core.bundle import load_bundle
from engine.core.errors import BundleError, ConfigError
from engine.core.candidates import Candidates, Guarantee, merge, task_column
from engine.core.config import Config, load_config
from engine.core.context import RequestContext
from engine.core.registry import StageEnv
from engine.core.request import Request
from engine.core.state import decay
from engine.core.features import BundleClock
from engine.core.ids import IdIndex
from engine.store.common import new_user, state_user, top_hot
from indexes import load_index
from loadtest.target import Server
from model_export.models import load_checkpoints
from protos import pb2, pb2_grpc
from stages.filter import Filter
from stages.rerank_beam import fuse

Route = Callable[[RequestContext], Candidates]
Stage = Callable[[RequestContext, Candidates], Candidates]


def _ms_since(t: float) -> float:
    return (time.perf_counter() - t) * 1e3


class Baseline:
    """The config's funnel over one bundle, every step on the calling thread."""

    def __init__(self, config: Config, bundle: str | Path):
        b = self.bundle = load_bundle(bundle)
        self.cfg, self.t, self.st = config, b.tables, b.state
        nets = load_checkpoints(b.path.parent / "checkpoints" / b.version)   # written beside the bundle
        self.nets = {"user_tower": nets["two_tower"].user_tower, "coarse_dnn": nets["coarse_dnn"],
                     "fine": nets["fine"]}
        self.trees = lgb.Booster(model_file=str(b.file("models/coarse_trees.txt")))
        self.index = load_index(b.file("index/items.faiss"), b.manifest["index"].get("nprobe"),
                                threads=faiss.omp_get_max_threads())   # faiss's default
        self.clock = BundleClock(b.manifest)
        self.half_life = float(b.manifest["state"]["half_life_days"])
        self.state_arrays = b.state.arrays()
        self.user_index, self.item_index = IdIndex(b.user_ids), IdIndex(b.item_ids)   # what the stages take
        self.item_ids = np.asarray(b.item_ids)
        self.context_fields = list(b.manifest["schema"]["context_fields"])
        self.route_names = list(config.pipeline.recall)
        self.routes = [(n, self._route(n, 1 << i)) for i, n in enumerate(self.route_names)]
        self.stages = [(n, self._stage(n)) for n in config.pipeline.stages]

    # -- building the funnel from the config ------------------------------------------
    def _route(self, name: str, bit: int) -> Route:
        kind, p = self.cfg.stage[name]
        if kind == "recall_ann":
            def ann(ctx: RequestContext) -> Candidates:
                scores, ids = self.index.search(ctx.user_e, p.k)
                ok = ids[0] >= 0
                return Candidates.from_route(ids[0][ok], scores[0][ok], bit)
            return ann
        if kind == "recall_hot":
            top, hot = top_hot(np.asarray(self.st.item_hot), p.k)
            hot_now = Candidates.from_route(top, np.log1p(hot * self._hot_decay(self.clock.days())), bit)
            return lambda ctx: hot_now
        if kind == "recall_cold_start":
            young = self.clock.days() - np.asarray(self.t.item_created) <= p.max_age_days
            pool = np.flatnonzero(young & (np.asarray(self.st.item_n_imp) < p.max_impressions))

            def cold(ctx: RequestContext) -> Candidates:
                sim = self.t.item_emb[pool] @ ctx.user_e[0]
                best = np.argsort(-sim)[:p.k]
                return Candidates.from_route(pool[best], sim[best], bit)
            return cold
        if kind == "recall_i2i":
            return lambda ctx: Candidates.from_route(*ctx.i2i.top(p.k), bit)
        if kind == "recall_whitelist":
            ids = [e.get("id") for e in self._env(name).read_sidecar("file", p.file).get("item", [])[:p.k]]
            items = self.item_index.known(ids)
            pinned = Candidates.from_route(items, np.ones(items.size), bit)
            return lambda ctx: pinned
        raise ConfigError(f"stage.{name}: the baseline has no recall route of kind {kind}")

    def _stage(self, name: str) -> Stage:
        kind, p = self.cfg.stage[name]
        if kind == "filter":   # the engine's own filters
            return Filter(p, self._env(name))
        if kind == "rank_trees":
            return lambda ctx, c: self._trees(ctx, c, p.keep)
        if kind == "rank_dnn":
            return lambda ctx, c: self._dnn(ctx, c, p.keep)
        if kind == "rank_multitask":
            return lambda ctx, c: self._fine(ctx, c, p.keep)
        if kind == "rerank_beam":
            def rerank(ctx: RequestContext, c: Candidates) -> Candidates:
                return c.with_columns({"fused": fuse(c.task_scores(), p.weights, p.fusion, p.eps)}, primary="fused")
            return rerank
        raise ConfigError(f"stage.{name}: the baseline has no stage of kind {kind}")

    def _env(self, name: str) -> StageEnv:
        """What Filter and the side-file reader use: no models, and of the store only its clock."""
        return StageEnv(name, self.bundle, None, SimpleNamespace(clock=self.clock), self.cfg,
                        item_index=self.item_index)

    # -- the steps --------------------------------------------------------------------
    def _hot_decay(self, now: float) -> float:
        return float(decay(self.st.t_ref, now, self.half_life))

    def _torch(self, name: str, *inputs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.nets[name](*(torch.from_numpy(x) for x in inputs)).numpy()

    def _trees(self, ctx: RequestContext, c: Candidates, keep: int) -> Candidates:
        item_e = self.t.item_emb[c.item]
        hot = (self.st.item_hot[c.item] * self._hot_decay(ctx.now)).astype(np.float32)
        x = featurize.coarse_features(
            self.t, c.item, ctx.user_e, item_e, ctx.user.recent, np.float32(ctx.user.n_imp),
            np.float32(ctx.user.n_pos), self.st.item_n_imp[c.item], self.st.item_n_pos[c.item], hot,
            ctx.context, ctx.now, ctx.i2i.lookup(c.item))
        score = self.trees.predict(x).astype(np.float32)
        c = c.with_columns({"trees": score}, {"coarse_x": x, "item_e": item_e}, primary="trees")
        return c.keep_top(score, keep, Guarantee.COARSE)

    def _dnn(self, ctx: RequestContext, c: Candidates, keep: int) -> Candidates:
        item = featurize.ranker_item_input(c.feats["item_e"], c.feats["coarse_x"])
        score = self._torch("coarse_dnn", ctx.ranker_user, item)
        c = c.with_columns({"dnn": score}, {"ranker_item": item}, primary="dnn")
        return c.keep_top(score, keep, Guarantee.COARSE)

    def _fine(self, ctx: RequestContext, c: Candidates, keep: int) -> Candidates:
        seq, mask = featurize.sequence_input(self.t, ctx.user.recent)
        probs = self._torch("fine", ctx.ranker_user, c.feats["ranker_item"], seq, mask)
        tasks = self.bundle.tasks
        c = c.with_columns({task_column(t): probs[:, i] for i, t in enumerate(tasks)}, primary=task_column(tasks[0]))
        return c.keep_top(probs[:, 0], keep, Guarantee.FINE) if keep else c

    def _hydrate(self, m: pb2.RecommendRequest) -> RequestContext:
        uidx = self.user_index.get(m.user_id, -1)
        user = (state_user(self.state_arrays, uidx, self.t.user_profile[uidx]) if uidx >= 0 else
                new_user(self.t.default_profile, self.st.user_recent.shape[1], self.st.user_seen.shape[1]))
        context = np.array([[m.context.get(n, 0) for n in self.context_fields]], np.int32)
        x = featurize.user_tower_input(self.t, np.array([uidx]), user.profile, context, user.recent)
        exclude = self.item_index.known(list(m.exclude_item_ids))
        req = Request(m.user_id, m.count or self.cfg.serving.default_count, request_id=m.request_id)
        return RequestContext(req, user, context, self._torch("user_tower", x), exclude, self.clock.days(),
                              deadline=float("inf"), experiment="", tables=self.t)

    def recommend(self, m: pb2.RecommendRequest) -> pb2.RecommendResponse:
        t0 = time.perf_counter()
        ctx = self._hydrate(m)
        trace = [("hydrate", _ms_since(t0), 0, 1)]
        parts = []
        for name, route in self.routes:
            ts = time.perf_counter()
            parts.append(route(ctx))
            trace.append((name, _ms_since(ts), 0, len(parts[-1])))
        ts = time.perf_counter()
        c = merge(parts)
        trace.append(("merge", _ms_since(ts), sum(map(len, parts)), len(c)))
        for name, stage in self.stages:
            ts = time.perf_counter()
            out = stage(ctx, c)
            trace.append((name, _ms_since(ts), len(c), len(out)))
            c = out
        c = c.keep_top(c.scores[c.primary], ctx.request.count, Guarantee.FINAL)
        scores, routes = c.scores[c.primary].tolist(), c.routes.tolist()
        tasks = {k: v.tolist() for k, v in c.task_scores().items()}
        items = [pb2.Item(item_id=item, score=scores[k], predictions={t: v[k] for t, v in tasks.items()},
                          routes=[n for j, n in enumerate(self.route_names) if routes[k] >> j & 1])
                 for k, item in enumerate(self.item_ids[c.item].tolist())]
        steps = [pb2.StageTrace(name=n, ms=ms, count_in=i, count_out=o, status="ok")
                 for n, ms, i, o in trace] if m.debug else []
        return pb2.RecommendResponse(items=items, bundle_version=self.bundle.version, request_id=m.request_id,
                                     trace=steps, total_ms=_ms_since(t0))


class _RecServe(pb2_grpc.RecServeServicer):
    """Recommend only; the base class answers ReportEvents with UNIMPLEMENTED."""

    def __init__(self, baseline: Baseline):
        self.baseline = baseline

    def Recommend(self, request: pb2.RecommendRequest, context: grpc.ServicerContext) -> pb2.RecommendResponse:
        return self.baseline.recommend(request)


class BaselineServer(Server):
    """`python -m loadtest.baseline` on loopback as a subprocess (stop, pid and `with` are Server's)."""

    def __init__(self, config: str | Path, bundle: str | Path, log: Path | None = None, timeout_s: float = 300.0):
        self.metrics_url = None   # no /metrics: the report takes its stage times from traced samples
        cmd = [sys.executable, "-m", "loadtest.baseline", "--config", str(config), "--bundle", str(bundle),
               "--port", "0"]
        self.target = self._start(cmd, "baseline", log, timeout_s).target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.baseline", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, type=Path, help="pipeline TOML (routes, sizes, fusion weights)")
    p.add_argument("--bundle", required=True, type=Path, help="bundle root or version folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50052, help="0: pick a free port, shown in the ready line")
    args = p.parse_args(argv)
    try:
        baseline = Baseline(load_config(args.config), args.bundle)
    except (ConfigError, BundleError) as e:
        print(f"baseline: {e}", file=sys.stderr)
        return 2
    server = grpc.server(ThreadPoolExecutor())
    pb2_grpc.add_RecServeServicer_to_server(_RecServe(baseline), server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: server.stop(grace=2))
    print_ready(f"{args.host}:{port}", "baseline")
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
