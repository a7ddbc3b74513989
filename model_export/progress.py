"""Progress of long loops: a tqdm bar on a terminal, a few summary lines in a log file.

tqdm redraws its bar with a carriage return; in a file (a CI log, `make demo > log`, a server's
redirected stderr) every redraw becomes a line, one per batch. So `bar()` draws tqdm only when
the stream is a terminal; otherwise it writes a line at 25/50/75 % (only if at least
`every_s` passed since the last line; with the postfix, e.g. the running loss) and a summary
line at the end: count, seconds and rate. A loop done within `quiet_s` leaves no line, as a
bar with leave=False leaves none on a terminal.

Every progress display of the project goes through `bar`; indexes, which imports nothing of
the project, takes it as a parameter (indexes.build_index(progress=...)).
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

QUARTERS = (0.25, 0.5, 0.75)
EVERY_S = 10.0
QUIET_S = 1.0


def bar(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it",
        leave: bool = False, disable: bool = False, stream: IO[str] | None = None,
        every_s: float = EVERY_S, quiet_s: float = QUIET_S) -> Any:
    """A tqdm bar on a terminal, else a `LogProgress` with the same surface the project uses:
    iteration, len(), update(n), set_postfix(**kw), close() and `with`."""
    stream = stream or sys.stderr
    if not disable and _is_tty(stream):
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=stream)
    return LogProgress(iterable, desc, total, unit, None if disable else stream, every_s, quiet_s)


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):      # no isatty, or a closed stream
        return False


class LogProgress:
    """Progress as at most four lines: 25/50/75 % when slow enough, then a summary."""

    def __init__(self, iterable: Iterable | None, desc: str, total: int | None, unit: str,
                 stream: IO[str] | None, every_s: float, quiet_s: float):
        self.iterable, self.desc, self.unit, self.stream = iterable, desc, unit, stream
        self.every_s, self.quiet_s = every_s, quiet_s
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.postfix = total, 0, ""
        self.t0 = self.last = time.monotonic()
        self._quarter, self._closed = 0, False

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError(f"{self.desc}: progress over an iterable without a length")
        return self.total

    def __iter__(self) -> Iterator:
        try:
            for x in self.iterable:
                yield x
                self.update(1)
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.total or self._quarter >= len(QUARTERS) or self.n < QUARTERS[self._quarter] * self.total:
            return
        while self._quarter < len(QUARTERS) and self.n >= QUARTERS[self._quarter] * self.total:
            self._quarter += 1
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            extra = f" {self.postfix}" if self.postfix else ""
            self._write(f"{self.n / self.total:.0%} ({self.n}/{self.total} {self.unit}, "
                        f"{self._rate(now)}, {now - self.t0:.0f} s){extra}")

    def set_postfix(self, **kw: object) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        now = time.monotonic()
        if now - self.t0 < self.quiet_s:
            return
        of = f"/{self.total}" if self.total is not None and self.n != self.total else ""
        self._write(f"{self.n}{of} {self.unit} in {now - self.t0:.1f} s ({self._rate(now)})")

    def _rate(self, now: float) -> str:
        dt = now - self.t0
        return f"{self.n / dt:.1f} {self.unit}/s" if dt > 0 else f"- {self.unit}/s"

    def _write(self, text: str) -> None:
        if self.stream is not None:
            print(f"{self.desc}: {text}", file=self.stream, flush=True)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
