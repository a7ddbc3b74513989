"""The simulated users at work: paced Recommend calls, the same user and context to every arm
at the same moment (a paired design: the arms differ only in their models), each list answered
from the ground truth through ReportEvents quoting its request_id.

Each call is recorded (time, arm, version served, utility, oracle, uniform expectation, events
and when they were acknowledged); the report is computed from these records afterwards.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np

from engine.app.client import RecServeClient
from loadtest.simulate.world import Seen, SimWorld, scores
from model_export.world import TASKS


@dataclass(slots=True)
class Served:
    t: float                 # wall time the list came back
    pair: int                # the same number for the calls of one simulated moment, one per arm
    arm: int
    user: int
    version: str
    request_id: str
    n: int                   # items served
    utility: float
    oracle: float
    uniform: float
    positives: int           # clicks drawn
    acked: float             # wall time ReportEvents returned (0: no events or not acknowledged)
    n_events: int
    ms: float                # Recommend round trip
    drifted: bool
    shifted: bool            # the user's interests shifted at the drift
    launched: int            # launched items (the world's cold items) in the served list
    oracle_launched: int     # and in the oracle's
    experiment: str = ""     # the arm that served the list (the response names it)


class Driver:
    """`threads` simulated users in flight, `qps` Recommend calls per second to each arm."""

    def __init__(self, world: SimWorld, targets: list[str], seen: list[Seen], item_ids: np.ndarray,
                 qps: float, threads: int, count: int, seed: int):
        self.world, self.seen = world, seen
        self.index = {str(i): k for k, i in enumerate(item_ids)}
        self.targets, self.qps, self.n_threads, self.count, self.seed = targets, qps, threads, count, seed
        self.records: list[Served] = []
        self.errors: dict[str, int] = {}
        self._lock = threading.Lock()
        self._next = 0.0
        self._pairs = 0

    def run(self, seconds: float, on_tick=None) -> None:
        """Drive for `seconds` of wall time; `on_tick(elapsed)` is called about every second."""
        stop = threading.Event()
        self._next = time.monotonic()
        threads = [threading.Thread(target=self._user_loop, args=(k, stop), daemon=True) for k in range(self.n_threads)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        try:
            while (elapsed := time.monotonic() - t0) < seconds:
                if on_tick is not None:
                    on_tick(elapsed)
                time.sleep(min(1.0, max(0.0, seconds - elapsed)))
        finally:
            stop.set()
            for t in threads:
                t.join(30)

    def _slot(self, stop: threading.Event) -> int | None:
        """Wait for the next paced slot: its number, or None when stopping."""
        with self._lock:
            at = self._next = max(self._next + 1.0 / self.qps, time.monotonic() - 1.0)
            self._pairs += 1
            pair = self._pairs
        delay = at - time.monotonic()
        stopped = stop.wait(delay) if delay > 0 else stop.is_set()
        return None if stopped else pair

    def _user_loop(self, k: int, stop: threading.Event) -> None:
        rng = np.random.default_rng([self.seed, k])
        clients = [RecServeClient(t, timeout=10.0) for t in self.targets]
        try:
            while (pair := self._slot(stop)) is not None:
                u, ctx = self.world.user(rng)
                for arm, c in enumerate(clients):
                    self._serve(pair, arm, c, u, ctx, rng)
        finally:
            for c in clients:
                c.close()

    def _count(self, what: str) -> None:
        with self._lock:
            self.errors[what] = self.errors.get(what, 0) + 1

    def _serve(self, pair: int, arm: int, c: RecServeClient, u: int, ctx: dict[str, int], rng: np.random.Generator) -> None:
        uid = str(self.world.ds.user_ids[u])
        drifted = self.world.drifted
        t = time.monotonic()
        try:
            r = c.recommend(uid, self.count, ctx)
        except grpc.RpcError as e:
            self._count(f"recommend {e.code().name}")
            return
        ms = (time.monotonic() - t) * 1000
        done = time.time()
        items = np.fromiter((self.index[i.item_id] for i in r.items), np.int64, len(r.items))
        eligible = self.seen[arm].eligible(u, self.world.ds.n_items)
        value = self.world.value(u)
        utility, oracle, uniform, top = scores(value, items, eligible)
        labels = self.world.respond(u, items, rng)
        events = [{"kind": "impression", "user_id": uid, "item_id": i.item_id, "request_id": r.request_id}
                  for i in r.items]
        events += [{"kind": kind, "user_id": uid, "item_id": r.items[p].item_id, "request_id": r.request_id}
                   for k, kind in enumerate(TASKS) for p in np.flatnonzero(labels[:, k])]
        acked = 0.0
        try:
            if events and c.report_events(events).accepted == len(events):
                acked = time.time()
            else:
                self._count("events rejected")
        except grpc.RpcError as e:
            self._count(f"events {e.code().name}")
        self.seen[arm].add(u, items)
        rec = Served(done, pair, arm, u, r.bundle_version, r.request_id, int(items.size), utility, oracle, uniform,
                     int(labels[:, 0].sum()), acked, len(events), ms, drifted, self.world.is_shifted(u),
                     int(self.world.cold[items].sum()), int(self.world.cold[top].sum()), r.experiment)
        with self._lock:
            self.records.append(rec)
