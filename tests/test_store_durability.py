"""What 'accepted' means on the embedded store: the event log, snapshots, SIGKILL, the state dir.

The store logs (and fsyncs) every batch before apply() returns, so an acknowledged event is in
the state after any crash: checked here on the log's file format (torn records), its group
commit, the snapshot/rotation protocol under concurrent writes, and on the real server killed
with SIGKILL, one worker and then the whole process group.
"""
from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import wait_for

from engine.app.client import RecServeClient
from engine.core.bundle import load_bundle
from engine.core.features import ResolvedEvent
from engine.store import statedir
from engine.store.embedded import EmbeddedStore
from engine.store.eventlog import DURABLE, GEN, LAST, MAGIC, EventLog, new_meta
from test_store import _same_state, bundle  # noqa: F401 - module fixture reused

REPO = Path(__file__).absolute().parents[1]
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]   # a new TCP connection (so a worker) per client


class _Log(EventLog):
    """An EventLog in one process, with the write lock its store would hold around append."""

    def __init__(self, directory: Path):
        self.lock = threading.Lock()
        super().__init__(directory, "t", new_meta(), lambda: self.lock, None)
        with self.lock:
            self.start(0)

    def append(self, payload: bytes) -> int:
        with self.lock:
            return super().append(payload)


# ------------------------------------------------------------------ the log file

def test_records_replay_in_order_and_a_torn_tail_is_dropped(tmp_path):
    log = _Log(tmp_path)
    for i in range(3):
        log.commit(log.append(f"batch {i}".encode()))
    path = tmp_path / f"t.{log.meta[GEN]:010d}.log"
    whole = path.read_bytes()
    with open(path, "ab") as f:                  # SIGKILL mid-write: half a record at the end
        f.write(whole[len(MAGIC):len(MAGIC) + 20])
    assert [(s, p) for s, p in log.replay(0)] == [(1, b"batch 0"), (2, b"batch 1"), (3, b"batch 2")]
    assert [s for s, _ in log.replay(2)] == [3]
    bad = bytearray(whole)
    bad[-1] ^= 0xFF                              # a flipped bit in the last record: its checksum fails
    path.write_bytes(bytes(bad))
    assert [s for s, _ in log.replay(0)] == [1, 2]
    log.close()


def test_a_writer_killed_mid_append_is_cut_back(tmp_path):
    """A record left half-written mid-file (its worker died holding the lock) is truncated by
    the next append, so the records after it stay readable."""
    log = _Log(tmp_path)
    log.commit(log.append(b"first"))
    with open(tmp_path / f"t.{log.meta[GEN]:010d}.log", "ab") as f:
        f.write(b"\x10\x00\x00\x00torn")
    log.commit(log.append(b"second"))
    assert [p for _, p in log.replay(0)] == [b"first", b"second"]
    log.close()


def test_group_commit_shares_fsyncs(tmp_path, monkeypatch):
    """Callers arriving while an fsync runs wait for it, then one fsync covers all of them."""
    log = _Log(tmp_path)
    started, go, calls = threading.Event(), threading.Event(), []
    real = os.fsync

    def slow_fsync(fd):
        calls.append(fd)
        if len(calls) == 1:
            started.set()
            go.wait(10)
        real(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    first = threading.Thread(target=lambda: log.commit(log.append(b"a")))
    first.start()
    assert started.wait(10)
    rest = [threading.Thread(target=lambda: log.commit(log.append(b"b"))) for _ in range(8)]
    for t in rest:
        t.start()
    deadline = time.monotonic() + 10
    while log.meta[LAST] < 9 and time.monotonic() < deadline:   # all 8 appended, now waiting to commit
        time.sleep(0.01)
    go.set()
    for t in (first, *rest):
        t.join()
    assert log.meta[DURABLE] == 9 and len(calls) == 2 and log.fsyncs == 2
    log.close()


# ------------------------------------------------------------------ snapshots + log in the store

def _events(bundle, rng: np.random.Generator, n: int, t: float) -> list[ResolvedEvent]:
    users = rng.integers(-30, 40, n)   # negative: guests
    kinds = rng.choice(["impression", bundle.tasks[0], "like"], n)
    return [ResolvedEvent(str(k), int(u) if u >= 0 else -1, str(bundle.user_ids[u]) if u >= 0 else f"g{-u}",
                          int(i), t) for u, k, i in zip(users, kinds, rng.integers(0, 200, n))]


def test_a_crash_after_a_snapshot_replays_the_log_after_it(bundle, tmp_path):
    s = EmbeddedStore(bundle, state_dir=tmp_path, snapshot_s=3600)
    rng = np.random.default_rng(0)
    s.apply(_events(bundle, rng, 50, s.clock.days()))
    s.save()
    for _ in range(5):
        s.apply(_events(bundle, rng, 50, s.clock.days()))
    logs = sorted(tmp_path.glob("embedded-*.log"))
    assert len(logs) == 1 and logs[0].stat().st_size > len(MAGIC)   # the snapshot dropped the older generation
    again = EmbeddedStore(bundle, state_dir=tmp_path)                 # s never closed: a crash
    assert _same_state(s, again) and not _same_state(again, EmbeddedStore(bundle))
    again.close()


def test_snapshots_during_writes_lose_nothing(bundle, tmp_path):
    """Two workers on shared arrays: one writes batches, the other snapshots (rotating the log)
    as fast as it can; a server restarted from the files without any close() has every batch."""
    state = tmp_path / "state"
    writer = EmbeddedStore(bundle, tmp_path / "shm1", state, snapshot_s=3600, snapshot_writer=True)
    other = EmbeddedStore(bundle, tmp_path / "shm1", state, snapshot_writer=False)
    done = threading.Event()

    def write() -> None:
        rng = np.random.default_rng(1)
        for _ in range(200):
            other.apply(_events(bundle, rng, 20, other.clock.days()))
        done.set()

    t = threading.Thread(target=write)
    t.start()
    while not done.is_set():
        writer.save()
    t.join()
    assert writer.snapshots > 1
    restarted = EmbeddedStore(bundle, tmp_path / "shm2", state)
    assert _same_state(writer, restarted)
    restarted.close()


# ------------------------------------------------------------------ the state dir

def test_state_dir_resolution(tmp_path, monkeypatch):
    root = tmp_path / "bundles"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(statedir.ENV, raising=False)
    default = statedir.resolve(None, root, embedded=True)
    assert Path(default).parent == tmp_path / "xdg" / "recserve" and Path(default).name.startswith("bundles-")
    assert statedir.resolve(None, root, embedded=False) is None          # Redis persists itself
    assert statedir.resolve("none", root, embedded=True) is None
    assert statedir.resolve(str(tmp_path / "s"), root, embedded=True) == str(tmp_path / "s")
    monkeypatch.setenv(statedir.ENV, "NONE")
    assert statedir.resolve(None, root, embedded=True) is None
    assert statedir.resolve(str(tmp_path / "s"), root, embedded=True) == str(tmp_path / "s")  # the flag wins
    monkeypatch.setenv(statedir.ENV, str(tmp_path / "env"))
    assert statedir.resolve(None, root, embedded=True) == str(tmp_path / "env")
    assert statedir.resolve(None, root, embedded=False) is None


class _Serve:
    """`recserve serve` in its own process group, so one SIGKILL takes the whole server."""

    def __init__(self, tmp: Path, config: Path, bundle: Path, *args: str, env: dict | None = None):
        self.err = tmp / f"server-{time.monotonic_ns()}.stderr"
        cmd = [sys.executable, "-m", "engine.cli.main", "serve", "--config", str(config), "--bundle", str(bundle),
               "--port", "0", *args]
        with open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True,
                                         start_new_session=True, env=env)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        end = time.monotonic() + 180
        self.target = ""
        while not self.target:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None or time.monotonic() > end:
                    self.kill()
                    raise AssertionError(f"server did not start:\n{self.err.read_text()}") from None
                continue
            if line.startswith("recserve serving on "):
                self.target = line.split()[3]

    def client(self) -> RecServeClient:
        return RecServeClient(self.target, options=OWN_CONNECTION)

    def kill(self) -> None:
        """SIGKILL to the server's process group: the parent and every worker at once. Returns
        once every process of the group is gone: a worker still exiting holds its files' locks."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

        def group_gone() -> bool:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return True
            return False
        wait_for(group_gone, timeout=30, what="every process of the killed server to exit")

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def _hidden(c: RecServeClient, user: str, n: int = 3) -> list[str]:
    return [it.item_id for it in c.recommend(user, count=10).items if it.item_id != "i10"][:n]   # i10: pinned


@pytest.mark.slow
def test_acknowledged_events_survive_sigkill(tiny_bundle, tiny_config, tmp_path):
    """Events acknowledged through a worker that is then SIGKILLed are still served; events
    acknowledged under concurrent load up to the SIGKILL of the whole server are all in the
    state it restarts with (and nothing is counted twice)."""
    state = tmp_path / "state"
    args = ("--workers", "2", "--state-dir", str(state), "--set", "serving.snapshot_s=0.3")
    server = _Serve(tmp_path, tiny_config, tiny_bundle, *args)
    quiet: dict[str, list[str]] = {}                  # user -> impressions acked before any kill
    acked: dict[str, list[list[str]]] = {}           # user -> batches acked under load
    clicks: dict[str, int] = {}
    try:
        with server.client() as c:
            victim = c.status().pid
            for user in ("u5", "u17", "guest-kill-1", "guest-kill-2"):
                quiet[user] = _hidden(c, user)
                events = [{"kind": "impression", "user_id": user, "item_id": x} for x in quiet[user]]
                assert c.report_events(events + [{"kind": "click", "user_id": user, "item_id": quiet[user][0]}]
                                       ).accepted == 4
        os.kill(victim, signal.SIGKILL)                  # one worker; the other serves, the parent restarts it
        wait_for(lambda: not Path(f"/proc/{victim}").exists(), what="the worker gone")   # (a connection made
        with server.client() as c:                                                       # before, it resets)
            for user, items in quiet.items():
                assert not set(items) & {it.item_id for it in c.recommend(user, count=10).items}, user

        stop = threading.Event()

        def load(k: int) -> None:
            user, batches, n = f"guest-load-{k}", acked.setdefault(f"guest-load-{k}", []), 0
            with server.client() as c:
                while not stop.is_set():
                    items = [f"i{100 + (n * 4 + j) % 150}" for j in range(4)]
                    try:
                        c.report_events([{"kind": "impression", "user_id": user, "item_id": x} for x in items]
                                        + [{"kind": "click", "user_id": user, "item_id": items[0]}])
                    except grpc.RpcError:
                        return                            # the server is gone: this batch was not acknowledged
                    batches.append(items)
                    clicks[user] = clicks.get(user, 0) + 1
                    n += 1

        threads = [threading.Thread(target=load, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(2.0)                                   # a few snapshots (log rotations) meanwhile
        server.kill()                                     # under load
        stop.set()
        for t in threads:
            t.join()
        assert all(len(b) > 5 for b in acked.values()), {u: len(b) for u, b in acked.items()}
        shared = Path((state / statedir.SHM_RECORD).read_text().strip())
        assert shared.is_dir()                            # SIGKILL: nobody cleaned up the shared arrays

        server = _Serve(tmp_path, tiny_config, tiny_bundle, *args)
        assert not shared.exists()                        # ... the next server on the state dir did
        assert "feature state: replayed" in server.err.read_text()   # the log had what no snapshot had
        with server.client() as c:
            for user, items in quiet.items():
                assert not set(items) & {it.item_id for it in c.recommend(user, count=10).items}, user
    finally:
        if server.proc.poll() is None:
            assert server.terminate() == 0

    b = load_bundle(tiny_bundle)
    store = EmbeddedStore(b, state_dir=state)             # what the stopped server left: snapshot + log
    index = {x: i for i, x in enumerate(b.item_ids.tolist())}
    prof, profiles = b.tables.default_profile, b.tables.user_profile
    try:
        for user, items in quiet.items():                 # exactly once: before both kills
            u = int(np.flatnonzero(b.user_ids == user)[0]) if user in set(b.user_ids.tolist()) else -1
            f = store.user(user, u, prof, profiles)
            base = (b.state.user_n_imp[u], b.state.user_n_pos[u]) if u >= 0 else (0, 0)
            assert (f.n_imp, f.n_pos) == (base[0] + 3, base[1] + 1), user
            assert f.seen[:3].tolist() == [index[x] for x in reversed(items)], user
        for user, batches in acked.items():               # every acked batch, at most one unacked one more
            f = store.user(user, -1, prof, profiles)
            extra = int(f.n_pos) - len(batches)
            assert extra in (0, 1) and f.n_imp == 4 * (len(batches) + extra), (user, f.n_imp, len(batches))
            want = [index[x] for items in reversed(batches) for x in reversed(items)] + [-1] * f.seen.size
            got = f.seen[4 * extra:].tolist()
            assert got == want[:len(got)], user
        imp, pos, _ = store.item_stats(np.arange(len(index), dtype=np.int32))
        users_imp = sum(store.user(u, -1, prof, profiles).n_imp for u in acked) + 3 * len(quiet)
        assert imp.sum() - b.state.item_n_imp.sum() == users_imp      # every impression counted once
    finally:
        store.close()


@pytest.mark.slow
def test_the_default_state_dir_belongs_to_one_server(tiny_bundle, tiny_config, tmp_path, monkeypatch):
    """Without --state-dir a server persists under $XDG_STATE_HOME/recserve/ (here a tmp dir);
    a second server on the same bundle root refuses to start instead of sharing the files."""
    monkeypatch.delenv(statedir.ENV)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    env = dict(os.environ)
    state = statedir.default_state_dir(tiny_bundle)
    server = _Serve(tmp_path, tiny_config, tiny_bundle, "--workers", "1", env=env)
    try:
        with server.client() as c:
            assert c.report_events([{"kind": "impression", "user_id": "u3", "item_id": "i5"}]).accepted == 1
        assert list(state.glob("embedded-*.log")) and (state / statedir.SERVER_LOCK).exists()
        second = subprocess.run([sys.executable, "-m", "engine.cli.main", "serve", "--config", str(tiny_config),
                                 "--bundle", str(tiny_bundle), "--port", "0"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert f"state dir {state} is in use by another recserve server (pid {server.proc.pid})" in second.stderr
    finally:
        assert server.terminate() == 0
    assert list(state.glob("embedded-*.msgpack"))   # the last snapshot, at the clean stop
