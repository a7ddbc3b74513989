"""Stall probe for any recserve process tree: put this folder on PYTHONPATH.

Every Python process started with it (the server, its spawned workers, the load generator) runs
a thread that wakes every 2 ms and re-arms `faulthandler.dump_traceback_later(STALL_S)`: if the
interpreter cannot run that thread for STALL_S (one thread holding the interpreter lock, or the
process not scheduled), faulthandler's own C thread dumps every thread's stack. Wake-ups later
than GAP_S are logged as `GAP <ms>`. Output: `$RECSERVE_STALL_DIR/<pid>.txt` (default
/tmp/recserve-stall). A thread blocked on I/O while holding a lock leaves the interpreter free:
this probe does not see that. The wake-ups cost every process some CPU: compare stalls, not latency.

    PYTHONPATH=loadtest/stallprobe python -m loadtest soak ...   (BENCHMARKS.md, issue 15 stalls)
"""
import faulthandler
import os
import threading
import time

STALL_S, GAP_S, WAKE_S = 0.08, 0.04, 0.002


def _start() -> None:
    d = os.environ.get("RECSERVE_STALL_DIR", "/tmp/recserve-stall")
    os.makedirs(d, exist_ok=True)
    f = open(os.path.join(d, f"{os.getpid()}.txt"), "a", buffering=1)
    f.write(f"START pid={os.getpid()} ppid={os.getppid()} t={time.time():.3f}\n")

    def loop() -> None:
        last = time.perf_counter()
        while True:
            faulthandler.dump_traceback_later(STALL_S, repeat=False, file=f)
            time.sleep(WAKE_S)
            now = time.perf_counter()
            if now - last > GAP_S:
                f.write(f"GAP {(now - last) * 1e3:.1f} ms at {time.time():.3f}\n")
            last = now

    threading.Thread(target=loop, daemon=True, name="stallprobe").start()


_start()
os.register_at_fork(after_in_child=_start)
