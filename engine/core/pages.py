"""Which pages of a file-backed array this process has mapped: all of them, or none.

The bundle's tables and the store's shared arrays are mmaps read a few rows at a time. Left
to fault in on demand, a table becomes resident as distinct users and items come by (16 pages
per fault, each fault on some request's path), so a worker's RSS climbs for as long as new ids
arrive, up to the files' sizes. `populate` maps a whole array at once instead: the pages are
in the page cache already (loading verified every file's checksum), so it costs page-table
entries, not memory or reads. `drop` is the reverse, for an array read once.
"""
from __future__ import annotations

import mmap

import numpy as np

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)   # Linux >= 5.14; Python names it from 3.13


def _mapping(a: np.ndarray | None) -> mmap.mmap | None:
    """The mmap behind a file-backed array or view (a view's base chain leads to the memmap)."""
    while a is not None and not isinstance(a, np.memmap):
        a = a.base if isinstance(a, np.ndarray) else None
    return a._mmap if a is not None else None


def populate(a: np.ndarray) -> None:
    """Map every page of a file-backed array into this process now (an in-memory array: nothing)."""
    m = _mapping(a)
    if m is not None:
        try:
            m.madvise(MADV_POPULATE_READ)
        except OSError:     # an older kernel: the pages fault in on first use, as before
            pass


def drop(a: np.ndarray) -> None:
    """Unmap this process's pages of a file-backed array it has read once (the page cache keeps
    them; a later read faults them back). Copying the bundle's ~100 MB of state into the store
    otherwise leaves them in the copying worker's RSS for as long as the bundle is loaded."""
    m = _mapping(a)
    if m is not None:
        m.madvise(mmap.MADV_DONTNEED)
