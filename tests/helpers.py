"""Small helpers shared by test modules (pytest puts tests/ on sys.path)."""
from __future__ import annotations

import time


def wait_for(pred, timeout: float = 20, what: str = "condition", every: float = 0.05) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)
