"""The engine: turns a Request into a Response by running the configured pipeline.

It owns everything a stage should not: validating the request once, hydrating the user once
(feature store + user tower), running recall routes concurrently with per-route timeouts,
merging, running the stages in order under the deadline (skipping skippable stages when
time is short, stopping when it is gone), fail-open on a broken stage, tracing,
experiments, events and the atomic swap of a new bundle. What it may do with a stage comes
from the stage kind's registration (engine.core.registry.Policy), never from the stage.

Public seams for offline tools and tests: `hydrate` (the context a request's stages see),
`pipeline` (an experiment's steps), `models`, `store`, `item_index`, and `smoke=False`.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from engine.core import featurize
from engine.core.bundle import Bundle
from engine.core.errors import BundleError, ConfigError, DeadlineExceeded
from engine.core.candidates import Candidates, Guarantee, merge
from engine.core.config import Config
from engine.core.context import RequestContext
from engine.core.pipelines import Assignment, Live, Pipeline, Step
from engine.core.request import Event, Request, Response, ServedInputs, StageTrace
from engine.core.features import ResolvedEvent
from engine.core.validation import checked_request, event_fault

log = logging.getLogger("recserve.engine")


class Engine:
    def __init__(self, config: Config, bundle: Bundle, make_store=None, *, store=None,
                 remote_models: dict | None = None, smoke: bool = True):
        """`make_store(bundle)` builds the feature store for a bundle (engine.store.factory), again
        for a bundle over another catalog; or `store`, one store kept across every bundle.
        `remote_models`: models served out of process (engine.core.models.RemoteModel by name).
        `smoke=False` skips the smoke request (tests of deliberately broken pipelines)."""
        if (make_store is None) == (store is None):
            raise TypeError("Engine needs exactly one of make_store and store")
        self._make_store = make_store
        self._external_store = store is not None
        self._pool = ThreadPoolExecutor(config.serving.route_threads, thread_name_prefix="recall")
        self._swap_lock = threading.Lock()
        self._remote = remote_models
        self._live = Live(config, bundle, store or self._make_store(bundle), remote_models)
        if smoke:
            try:
                self._smoke(self._live)
            except BaseException:   # stop what an engine that never serves started; a passed-in store is the caller's
                self._live.close()
                if not self._external_store:
                    self._live.store.close()
                self._pool.shutdown(wait=False)
                raise

    # -- public API -------------------------------------------------------------------
    @property
    def config(self) -> Config:
        """The config serving now: the loaded one with the live arms (Engine.set_arms)."""
        return self._live.arms.config

    @property
    def bundle_version(self) -> str:
        return self._live.bundle.version

    @property
    def store(self):
        """The serving bundle's feature store (engine.store.FeatureStore): for its stats."""
        return self._live.store

    @property
    def models(self):
        """The serving bundle's model runtimes (engine.core.models.Models): for offline scoring."""
        return self._live.models

    @property
    def item_index(self) -> dict[str, int]:
        """External item id -> catalog index in the serving bundle."""
        return self._live.item_index

    @property
    def tasks(self) -> tuple[str, ...]:
        return self._live.bundle.tasks

    def pipeline(self, experiment: str = "") -> Pipeline:
        """The steps an experiment's requests run ("" = control), over the serving bundle."""
        return self._live.pipelines[experiment]

    def hydrate(self, req: Request) -> RequestContext:
        """What a request's stages would see (validated, experiment assigned, user hydrated),
        without running them: for tools that score items the way the stages do."""
        live = self._live
        arms = live.arms
        req = self._checked(req, live, arms.config)
        return self._hydrate(req, live, req.experiment or arms.config.experiment_for(req.user_id),
                             time.perf_counter())

    def recommend(self, req: Request, observer=None) -> Response:
        """Serve one request. `observer(stage_name, candidates)`, if given, sees the batch
        after the merge and after every stage: for tests and "why was X dropped?" debugging."""
        t0 = time.perf_counter()
        live = self._live  # one bundle for the whole request, even if a swap lands meanwhile
        arms = live.arms   # and one set of arms
        s = self.config.serving
        req = self._checked(req, live, arms.config)
        exp = req.experiment or arms.assign(req.user_id)
        pipe = arms.pipelines[exp]
        live.store.fell_back()  # reset: only this request's reads count
        ctx = self._hydrate(req, live, exp, t0)
        trace: list[StageTrace] = [StageTrace("hydrate", (time.perf_counter() - t0) * 1e3, 0, 1)]
        cands = self._recall(ctx, pipe, trace, live)
        if observer:
            observer("merge", cands)
        degraded = False
        for st in pipe.stages:
            remaining = ctx.remaining_ms()
            out_of_time = remaining <= 0 and not st.spec.policy.guard
            if out_of_time or (st.budget_ms is not None and remaining < st.budget_ms):
                if s.on_deadline == "error":
                    raise DeadlineExceeded(f"deadline of {req.deadline_ms:.0f} ms cannot be met before stage "
                                           f"{st.name}")
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
        return self._respond(ctx, live, cands, degraded, trace, t0)

    def report_events(self, events: list[Event]) -> tuple[int, list[tuple[int, str]]]:
        live = self._live
        ok: list[ResolvedEvent] = []
        rejected: list[tuple[int, str]] = []
        now = time.time()
        items = live.item_index.rows([e.item_id for e in events])
        users = live.user_index.rows([e.user_id for e in events])
        for i, e in enumerate(events):
            reason = event_fault(e, items[i] >= 0, now)
            if reason:
                rejected.append((i, reason))
                continue
            t = live.store.clock.days(e.timestamp if e.timestamp > 0 else None)
            ok.append(ResolvedEvent(e.kind, int(users[i]), e.user_id, int(items[i]), t))
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
                live = Live(self.config, bundle, store, self._remote)
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

    def set_arms(self, config: Config) -> None:
        """Serve `config`'s experiments (and control's stage settings) from now on: `config` is
        the loaded one with other arms (engine.core.arms.config_with_arms, already validated).
        Stages an arm leaves alone are shared, new ones smoke-tested before anything changes;
        on a fault keep the running arms and raise ConfigError (a stage refuses its settings
        for this bundle) or BundleError (the smoke request failed)."""
        with self._swap_lock:
            live = self._live
            try:
                arms = live.build_arms(config)       # a stage's check against the bundle: ConfigError
                self._smoke(live, arms)
            except Exception as e:
                live.prune()
                if isinstance(e, ConfigError):
                    raise
                reason = str(e) if isinstance(e, BundleError) else f"smoke request failed: {e!r}"
                raise BundleError(f"arms refused: {reason}") from None
            live.arms = arms
            live.prune()

    def close(self) -> None:
        """Stop background work; the feature store writes its last snapshot / flushes its buffer."""
        self._live.close()
        self._live.store.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- request steps ----------------------------------------------------------------
    def _checked(self, req: Request, live: Live, config: Config) -> Request:
        """The request validated against the config and the serving bundle's context fields: a
        normalised copy (engine.core.validation)."""
        return checked_request(req, config, live.bundle.manifest["schema"]["context_fields"],
                               live.bundle.tables.context_cardinality)

    def _hydrate(self, req: Request, live: Live, exp: str, t0: float) -> RequestContext:
        """`req` already checked; its deadline counts from `t0` (time.perf_counter())."""
        t = live.bundle.tables
        uidx = live.user_index.get(req.user_id, -1)
        user = live.store.user(req.user_id, uidx, t.default_profile, t.user_profile)
        names = live.bundle.manifest["schema"]["context_fields"]
        context = np.array([[req.context.get(n, 0) for n in names]], np.int32)
        x = featurize.user_tower_input(t, np.array([uidx]), user.profile, context, user.recent)
        user_e = live.models.run("user_tower", {"x": x})
        exclude = live.item_index.known(req.exclude_item_ids)
        return RequestContext(req, user, context, user_e, exclude, live.store.clock.days(),
                              t0 + req.deadline_ms / 1000.0, exp, t)

    def _recall(self, ctx: RequestContext, pipe: Pipeline, trace: list, live: Live) -> Candidates:
        """Pool routes start first; inline routes run meanwhile on this thread; then the pool
        routes are collected, each waited for no longer than its timeout and the deadline."""
        t0 = time.perf_counter()
        futures = {st.name: self._pool.submit(self._timed, st.fn, ctx) for st in pipe.recall if not st.inline}
        results: dict[str, tuple] = {}
        for st in pipe.recall:
            if st.inline:
                try:
                    cands, ms = self._timed(st.fn, ctx)
                    results[st.name] = (cands, ms, "ok" if ms <= st.timeout_ms else "late")
                except Exception:  # fail-open per route
                    log.exception("recall route %s failed; skipped", st.name)
                    results[st.name] = (None, (time.perf_counter() - t0) * 1e3, "failed")
        for st in pipe.recall:
            if st.inline:
                continue
            left = max(min(st.timeout_ms / 1000.0 - (time.perf_counter() - t0), ctx.remaining_ms() / 1000.0), 0.0)
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

    def _respond(self, ctx: RequestContext, live: Live, c: Candidates, degraded: bool, trace: list,
                 t0: float) -> Response:
        names = live.route_names
        bits = c.routes[:, None] & (1 << np.arange(len(names), dtype=np.uint8))[None, :]
        routes = [[names[j] for j in np.flatnonzero(row)] for row in bits]  # <= count rows
        return Response(live.item_ids[c.item].tolist(), c.scores[c.primary].astype(np.float32), c.task_scores(),
                        routes, degraded, ctx.experiment, live.bundle.version, ctx.request.request_id, trace,
                        (time.perf_counter() - t0) * 1e3, _served_inputs(ctx, c))

    def _smoke(self, live: Live, arms: Assignment | None = None) -> None:
        """One real request through every experiment's pipeline before a bundle (or a set of
        arms) serves; it also holds every stage to its declaration: a stage writes all it
        declares and nothing else."""
        arms = arms or live.arms
        for exp, pipe in arms.pipelines.items():
            req = self._checked(Request(user_id="__smoke__", count=min(5, self.config.serving.max_count),
                                        deadline_ms=10_000), live, arms.config)
            ctx = self._hydrate(req, live, exp, time.perf_counter())
            c = merge([st.fn(ctx) for st in pipe.recall])
            for st in pipe.stages:
                before = c
                c = st.fn(ctx, c)
                _check_writes(st, before, c)
            if len(c) == 0:
                raise BundleError(f"smoke request through experiment '{exp or 'control'}' returned no items")


def _served_inputs(ctx: RequestContext, c: Candidates) -> ServedInputs:
    """The ranker inputs of the served rows; phase 2 keeps its item rows as feat:ranker_item,
    else they are rebuilt by the same concatenation the fine ranker does (bit-identical)."""
    item = c.feats.get("ranker_item")
    if item is None and "item_e" in c.feats and "coarse_x" in c.feats:
        item = featurize.ranker_item_input(c.feats["item_e"], c.feats["coarse_x"])
    return ServedInputs(c.item, ctx.user.index, ctx.ranker_user[0], item, ctx.user.recent[0], ctx.now)


def _check_writes(st: Step, before: Candidates, after: Candidates) -> None:
    added = [("score", k) for k in after.scores.keys() - before.scores.keys()]
    added += [("feat", k) for k in after.feats.keys() - before.feats.keys()]
    for space, name in added:
        if not any(col.matches(space, name) for col in st.spec.writes):
            raise BundleError(f"smoke request: stage '{st.name}' ({st.spec.kind}) wrote {space}:{name}, "
                              "which its kind does not declare")
    have = [("score", k) for k in after.scores] + [("feat", k) for k in after.feats]
    for col in st.spec.writes:
        if not any(col.matches(space, name) for space, name in have):
            raise BundleError(f"smoke request: stage '{st.name}' ({st.spec.kind}) declares {col} but did not write it")
