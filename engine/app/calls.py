"""The wire between the gRPC front and a worker process: calls out, answers back by call id.

The front never parses a request: it forwards the serialized proto with what a worker needs
to answer it as gRPC would (the method, when the call arrived, the client's remaining time,
its bearer token), and sends the worker's answer back as it came (status code, message,
serialized response). Both sides are this package's own processes over a private pipe.
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc
import msgpack

from protos import pb2


IO_SLOTS = 4     # calls of an `io` method a worker runs at once, beside its one CPU-bound call


@dataclass(frozen=True)
class Method:
    service: str        # full proto service name, e.g. recserve.v1.RecServe
    name: str           # RPC name, e.g. Recommend
    request: type       # the request message class
    admitted: bool      # subject to admission control (Admin calls are not: operators need them under load)
    io: bool            # mostly waits on I/O (ReportEvents: the event log's fsync): runs on a worker's
                        # side thread, so a disk's latency never holds a worker's CPU slot

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


IO_METHODS = ("ReportEvents",)


def _methods() -> tuple[Method, ...]:
    out = []
    for svc in ("RecServe", "Admin"):
        d = pb2.DESCRIPTOR.services_by_name[svc]
        for m in d.methods:
            out.append(Method(d.full_name, m.name, getattr(pb2, m.input_type.name), svc == "RecServe",
                              m.name in IO_METHODS))
    return tuple(out)


METHODS = _methods()
SERVICES = tuple(dict.fromkeys(m.service for m in METHODS))
_CODES = {c.value[0]: c for c in grpc.StatusCode}


@dataclass(frozen=True)
class Call:
    id: int                     # the front's number for it; the answer carries it back
    method: int                 # index into METHODS
    arrived: float              # time.monotonic() when the front accepted it (one clock for all processes)
    remaining: float | None     # the client's deadline, seconds left at arrival; None: no deadline
    auth: str                   # the authorization metadata ("" if none)
    payload: bytes              # the serialized request

    def encode(self) -> bytes:
        return msgpack.packb((self.id, self.method, self.arrived, self.remaining, self.auth, self.payload),
                             use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> "Call":
        return cls(*msgpack.unpackb(data, raw=False))


@dataclass(frozen=True)
class Answer:
    id: int                     # the call's
    code: grpc.StatusCode
    message: str = ""
    payload: bytes = b""
    work_ms: float = 0.0        # the worker's time on the call: what admission control learns from
                                # (not the time it sat behind a hot reload between calls)

    def encode(self) -> bytes:
        return msgpack.packb((self.id, self.code.value[0], self.message, self.payload, self.work_ms),
                             use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> "Answer":
        id_, code, message, payload, work_ms = msgpack.unpackb(data, raw=False)
        return cls(id_, _CODES.get(code, grpc.StatusCode.UNKNOWN), message, payload, work_ms)
