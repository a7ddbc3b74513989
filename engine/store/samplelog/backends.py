"""Which reader a log spec names: a folder of segments, or Redis streams."""
from __future__ import annotations

from engine.store.samplelog.source import LogReader, SegmentLog


def open_reader(spec: str, stream: str, group: str = "joiner", consumer: str = "joiner-1") -> LogReader:
    """A reader of one stream: `spec` is a log folder, or redis://HOST:PORT/DB[?prefix=P]."""
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from engine.store.samplelog.streams import StreamLog

        return StreamLog(spec, stream, group, consumer)
    return SegmentLog(spec, stream)
