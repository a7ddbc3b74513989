"""The engine: turns a Request into a Response by running the configured pipeline.

It owns everything a stage should not: hydrating the user once (feature store + user
tower), running recall routes concurrently with per-route timeouts, merging, running the
stages in order under the deadline (skipping skippable stages when time is short, stopping
when it is gone), fail-open on a broken stage, tracing, experiments, events and the atomic
swap of a new bundle.
"""
from __future__ import annotations

import logging
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from engine.core import featurize, registry
from engine.core.bundle import Bundle
from engine.core.errors import BundleError, ConfigError, DeadlineExceeded, InvalidRequest
from engine.core.candidates import Candidates, Guarantee, merge
from engine.core.config import Config
from engine.core.context import RequestContext
from engine.core.models import Models
from engine.core.registry import StageEnv
from engine.core.request import EVENT_KINDS, Event, Request, Response, StageTrace
from engine.core.features import ResolvedEvent

log = logging.getLogger("recserve.engine")


@dataclass
class _Step:
    name: str
    fn: object
    budget_ms: float       # recall: timeout; stages: expected cost, used to decide skipping
    skippable: bool
    route_bit: int = 0
    inline: bool = False   # recall: run on the request thread instead of the pool


@dataclass
class _Pipeline:
    recall: list[_Step]
    stages: list[_Step]


class _Live:
    """Everything tied to one bundle version; replaced whole on swap."""

    def __init__(self, config: Config, bundle: Bundle, store, remote_models: dict | None = None):
        self.bundle, self.store = bundle, store
        self.models = Models(bundle, config.serving, remote_models)
        self.user_index = {s: i for i, s in enumerate(np.asarray(bundle.user_ids).tolist())}
        self.item_index = {s: i for i, s in enumerate(np.asarray(bundle.item_ids).tolist())}
        self.item_ids = np.asarray(bundle.item_ids)
        n_pos = np.asarray(bundle.state.item_n_pos)
        self.fallback = np.argsort(-n_pos, kind="stable")[:1000].astype(np.int32)
        self.route_names = list(config.pipeline.recall)
        self._stages: dict[tuple, object] = {}
        self.pipelines = {"": self._build(config)}
        for name in config.experiments:
            self.pipelines[name] = self._build(config.variant(name))

    def close(self) -> None:
        """Stop the stages' background work (refresh threads); in-flight requests still finish."""
        for fn in self._stages.values():
            if hasattr(fn, "close"):
                fn.close()

    def _build(self, cfg: Config) -> _Pipeline:
        def step(name: str, bit: int) -> _Step:
            kind, params = cfg.stage[name]
            key = (name, kind, bit, repr(params))
            fn = self._stages.get(key)
            if fn is None:  # experiments that leave a stage alone share it (and its refresh thread)
                env = StageEnv(name, self.bundle, self.models, self.store, cfg, bit, self.item_index)
                fn = self._stages[key] = registry.kind(kind).factory(params, env)
            budget = getattr(params, "timeout_ms", None) or getattr(params, "budget_ms")
            return _Step(name, fn, budget, getattr(fn, "skippable", False), bit, getattr(params, "inline", False))

        return _Pipeline([step(n, 1 << i) for i, n in enumerate(cfg.pipeline.recall)],
                         [step(n, 0) for n in cfg.pipeline.stages])


class Engine:
    def __init__(self, config: Config, bundle: Bundle, make_store=None, *, store=None,
                 remote_models: dict | None = None, smoke: bool = True):
        """`make_store(bundle)` builds the feature store for a bundle (engine.store.factory), again
        for a bundle over another catalog; or `store`, one store kept across every bundle.
        `remote_models`: models served out of process (engine.core.models.RemoteModel by name).
        `smoke=False` skips the smoke request (tests of deliberately broken pipelines)."""
        if (make_store is None) == (store is None):
            raise TypeError("Engine needs exactly one of make_store and store")
        if len(config.pipeline.recall) > 8:
            raise ConfigError("pipeline.recall: at most 8 routes (uint8 route bitmask)")
        self.config = config
        self._make_store = make_store
        self._external_store = store is not None
        self._pool = ThreadPoolExecutor(config.serving.route_threads, thread_name_prefix="recall")
        self._swap_lock = threading.Lock()
        self._remote = remote_models
        self._live = _Live(config, bundle, store or self._make_store(bundle), remote_models)
        if smoke:
            self._smoke(self._live)

    # -- public API -------------------------------------------------------------------
    @property
    def bundle_version(self) -> str:
        return self._live.bundle.version

    @property
    def store(self):
        """The serving bundle's feature store (engine.store.FeatureStore): for its stats."""
        return self._live.store

    @property
    def tasks(self) -> tuple[str, ...]:
        return self._live.bundle.tasks

    @property
    def stage_names(self) -> list[str]:
        p = self._live.pipelines[""]
        return [s.name for s in p.recall] + [s.name for s in p.stages]

    def recommend(self, req: Request, observer=None) -> Response:
        """Serve one request. `observer(stage_name, candidates)`, if given, sees the batch
        after the merge and after every stage: for tests and "why was X dropped?" debugging."""
        t0 = time.perf_counter()
        live = self._live  # one bundle for the whole request, even if a swap lands meanwhile
        s = self.config.serving
        self._validate(req, live)
        exp = req.experiment or self._assign(req.user_id)
        pipe = live.pipelines[exp]
        deadline_ms = req.deadline_ms if req.deadline_ms > 0 else s.deadline_ms
        live.store.fell_back()  # reset: only this request's reads count
        ctx = self._hydrate(req, live, exp, t0 + deadline_ms / 1000.0)
        trace: list[StageTrace] = [StageTrace("hydrate", (time.perf_counter() - t0) * 1e3, 0, 1)]
        cands = self._recall(ctx, pipe, trace, live)
        if observer:
            observer("merge", cands)
        degraded = False
        for st in pipe.stages:
            remaining = ctx.remaining_ms()
            if remaining <= 0 or (st.skippable and remaining < st.budget_ms):
                if s.on_deadline == "error":
                    raise DeadlineExceeded(f"deadline of {deadline_ms:.0f} ms cannot be met before stage {st.name}")
                degraded = True
                trace.append(StageTrace(st.name, 0.0, len(cands), len(cands), "skipped"))
                continue
            ts = time.perf_counter()
            try:
                out = st.fn(ctx, cands)
                status = "ok"
            except Exception:  # fail-open: a broken stage is skipped, the request still succeeds
                log.exception("stage %s failed; skipped", st.name)
                out, status, degraded = cands, "failed", True
            trace.append(StageTrace(st.name, (time.perf_counter() - ts) * 1e3, len(cands), len(out), status))
            cands = out
            if observer:
                observer(st.name, cands)
        if cands.primary != "fused" or len(cands) > req.count:
            cands = cands.keep_top(cands.scores[cands.primary], req.count, Guarantee.FINAL)
        degraded = live.store.fell_back() or degraded   # features came from the bundle, not the live state
        return self._respond(req, live, cands, exp, degraded, trace, t0)

    def report_events(self, events: list[Event]) -> tuple[int, list[tuple[int, str]]]:
        live = self._live
        ok: list[ResolvedEvent] = []
        rejected: list[tuple[int, str]] = []
        for i, e in enumerate(events):
            reason = self._event_fault(e, live)
            if reason:
                rejected.append((i, reason))
                continue
            t = live.store.clock.days(e.timestamp if e.timestamp > 0 else None)
            ok.append(ResolvedEvent(e.kind, live.user_index.get(e.user_id, -1), e.user_id,
                                    live.item_index[e.item_id], t))
        if ok:
            live.store.apply(ok)
        return len(ok), rejected

    def swap_bundle(self, bundle: Bundle) -> None:
        """Load, smoke-test and swap in a new bundle; on any fault raise BundleError, keep the old."""
        with self._swap_lock:
            old = self._live
            same_shape = (bundle.manifest["schema"]["n_items"] == old.bundle.manifest["schema"]["n_items"]
                          and bundle.manifest["schema"]["n_users"] == old.bundle.manifest["schema"]["n_users"])
            store = old.store if (same_shape or self._external_store) else self._make_store(bundle)
            live = None
            try:
                live = _Live(self.config, bundle, store, self._remote)
                self._smoke(live)
            except Exception as e:
                if live is not None:
                    live.close()
                if store is not old.store:
                    store.close()
                reason = str(e) if isinstance(e, (BundleError, ConfigError)) else f"smoke request failed: {e!r}"
                raise BundleError(f"bundle {bundle.version} refused: {reason}") from None
            self._live = live
            old.close()
            if store is not old.store:
                old.store.close()
            log.info("bundle %s now serving (was %s)", bundle.version, old.bundle.version)

    def close(self) -> None:
        """Stop background work; the feature store writes its last snapshot / flushes its buffer."""
        self._live.close()
        self._live.store.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- request steps ----------------------------------------------------------------
    def _validate(self, req: Request, live: _Live) -> None:
        s = self.config.serving
        if not req.user_id or len(req.user_id) > 256 or not req.user_id.isprintable():
            raise InvalidRequest("user_id", "must be 1-256 printable characters")
        if req.count == 0:
            req.count = s.default_count
        if not 1 <= req.count <= s.max_count:
            raise InvalidRequest("count", f"must be in 1..{s.max_count}, got {req.count}")
        if len(req.exclude) > s.max_excludes:
            raise InvalidRequest("exclude", f"at most {s.max_excludes} items, got {len(req.exclude)}")
        if any(not x for x in req.exclude):
            raise InvalidRequest("exclude", "item ids must be non-empty")
        if req.experiment and req.experiment not in live.pipelines:
            raise InvalidRequest("experiment", f"unknown experiment '{req.experiment}' "
                                               f"(known: {', '.join(sorted(self.config.experiments)) or 'none'})")
        card = live.bundle.tables.context_cardinality
        names = live.bundle.manifest["schema"]["context_fields"]
        for k, v in req.context.items():
            if k not in names:
                raise InvalidRequest(f"context.{k}", f"unknown context field (known: {', '.join(names)})")
            if not 0 <= v < card[names.index(k)]:
                raise InvalidRequest(f"context.{k}", f"must be in 0..{card[names.index(k)] - 1}, got {v}")
        if req.deadline_ms < 0:
            raise InvalidRequest("deadline_ms", "must be >= 0")

    def _assign(self, user_id: str) -> str:
        """Stable traffic split: the same user lands in the same experiment on every worker."""
        u = zlib.crc32(user_id.encode()) / 2**32
        acc = 0.0
        for name, e in self.config.experiments.items():
            acc += e.share
            if u < acc:
                return name
        return ""

    def _hydrate(self, req: Request, live: _Live, exp: str, deadline: float) -> RequestContext:
        t = live.bundle.tables
        uidx = live.user_index.get(req.user_id, -1)
        user = live.store.user(req.user_id, uidx, t.default_profile, t.user_profile)
        names = live.bundle.manifest["schema"]["context_fields"]
        context = np.array([[req.context.get(n, 0) for n in names]], np.int32)
        x = featurize.user_tower_input(t, np.array([uidx]), user.profile, context, user.recent)
        user_e = live.models.run("user_tower", {"x": x})
        exclude = np.fromiter((live.item_index.get(i, -1) for i in req.exclude), np.int32, len(req.exclude))
        return RequestContext(req, user, context, user_e, exclude[exclude >= 0], live.store.clock.days(),
                              deadline, exp)

    def _recall(self, ctx: RequestContext, pipe: _Pipeline, trace: list, live: _Live) -> Candidates:
        """Pool routes start first; inline routes run meanwhile on this thread; then the pool
        routes are collected, each waited for no longer than its timeout and the deadline."""
        t0 = time.perf_counter()
        futures = {st.name: self._pool.submit(self._timed, st.fn, ctx) for st in pipe.recall if not st.inline}
        results: dict[str, tuple] = {}
        for st in pipe.recall:
            if st.inline:
                try:
                    cands, ms = self._timed(st.fn, ctx)
                    results[st.name] = (cands, ms, "ok" if ms <= st.budget_ms else "late")
                except Exception:  # fail-open per route
                    log.exception("recall route %s failed; skipped", st.name)
                    results[st.name] = (None, (time.perf_counter() - t0) * 1e3, "failed")
        for st in pipe.recall:
            if st.inline:
                continue
            left = max(min(st.budget_ms / 1000.0 - (time.perf_counter() - t0), ctx.remaining_ms() / 1000.0), 0.0)
            try:
                cands, ms = futures[st.name].result(timeout=left)
                results[st.name] = (cands, ms, "ok")
            except FutureTimeout:
                results[st.name] = (None, (time.perf_counter() - t0) * 1e3, "timeout")
            except Exception:  # fail-open per route
                log.exception("recall route %s failed; skipped", st.name)
                results[st.name] = (None, (time.perf_counter() - t0) * 1e3, "failed")
        parts = []
        for st in pipe.recall:
            cands, ms, status = results[st.name]
            trace.append(StageTrace(st.name, ms, 0, len(cands) if cands is not None else 0, status))
            if cands is not None:
                parts.append(cands)
        ts = time.perf_counter()
        trace.append(StageTrace("recall", (ts - t0) * 1e3, 0, sum(len(p) for p in parts)))  # wall time, routes overlap
        merged = merge(parts)
        if len(merged) == 0:  # every route failed or came back empty: never serve nothing
            merged = Candidates.from_route(live.fallback, np.zeros(live.fallback.size, np.float32), 0)
        trace.append(StageTrace("merge", (time.perf_counter() - ts) * 1e3,
                                sum(len(p) for p in parts), len(merged)))
        return merged

    @staticmethod
    def _timed(fn, ctx):
        t = time.perf_counter()
        out = fn(ctx)
        return out, (time.perf_counter() - t) * 1e3

    def _respond(self, req, live, c: Candidates, exp, degraded, trace, t0) -> Response:
        names = live.route_names
        bits = c.routes[:, None] & (1 << np.arange(len(names), dtype=np.uint8))[None, :]
        routes = [[names[j] for j in np.flatnonzero(row)] for row in bits]  # <= count rows
        tasks = {k[5:]: v for k, v in c.scores.items() if k.startswith("task:")}
        return Response(live.item_ids[c.item].tolist(), c.scores[c.primary].astype(np.float32), tasks,
                        routes, degraded, exp, live.bundle.version, req.request_id, trace,
                        (time.perf_counter() - t0) * 1e3)

    def _event_fault(self, e: Event, live: _Live) -> str:
        if e.kind not in EVENT_KINDS:
            return f"kind: '{e.kind}' is not one of {', '.join(EVENT_KINDS)}"
        if not e.user_id or len(e.user_id) > 256:
            return "user_id: must be 1-256 characters"
        if e.item_id not in live.item_index:
            return f"item_id: unknown item '{e.item_id}'"
        if e.timestamp < 0 or e.timestamp > time.time() + 3600:
            return f"timestamp: {e.timestamp} is negative or in the future"
        return ""

    def _smoke(self, live: _Live) -> None:
        """One real request through every experiment's pipeline before a bundle serves."""
        for exp, pipe in live.pipelines.items():
            req = Request(user_id="__smoke__", count=min(5, self.config.serving.max_count), deadline_ms=10_000)
            ctx = self._hydrate(req, live, exp, time.perf_counter() + 10.0)
            c = merge([st.fn(ctx) for st in pipe.recall])
            for st in pipe.stages:
                c = st.fn(ctx, c)
            if len(c) == 0:
                raise BundleError(f"smoke request through experiment '{exp or 'control'}' returned no items")
