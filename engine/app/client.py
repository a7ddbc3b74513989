"""Python client of the recserve gRPC API and the `recserve recommend` / `events` / `reload` commands."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from engine.core.request import EVENT_KINDS
from protos import pb2, pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"


class RecServeClient:
    """One channel to a server; the token (sent as `authorization: Bearer T`) and TLS are set once.

    Workers share the port per connection, not per call: to spread load over them, use several
    clients with `options=[("grpc.use_local_subchannel_pool", 1)]` so each opens its own connection.
    """

    def __init__(self, target: str, token: str | None = None, tls_ca: str | Path | bytes | None = None,
                 timeout: float | None = 5.0, options: Sequence[tuple[str, Any]] = ()):
        if tls_ca is None:
            self.channel = grpc.insecure_channel(target, options=list(options))
        else:
            ca = tls_ca if isinstance(tls_ca, bytes) else Path(tls_ca).read_bytes()
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca),
                                               options=list(options))
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self._rec = pb2_grpc.RecServeStub(self.channel)
        self._admin = pb2_grpc.AdminStub(self.channel)

    def recommend(self, user_id: str, count: int = 0, context: Mapping[str, int] | None = None,
                  exclude: Iterable[str] = (), experiment: str = "", debug: bool = False,
                  request_id: str = "", timeout: float | None = None) -> pb2.RecommendResponse:
        """count 0: the server's default. The timeout becomes the server-side deadline."""
        req = pb2.RecommendRequest(user_id=user_id, count=count, context=dict(context or {}),
                                   exclude_item_ids=list(exclude), experiment=experiment, debug=debug,
                                   request_id=request_id)
        return self._rec.Recommend(req, timeout=timeout or self.timeout, metadata=self.metadata)

    def report_events(self, events: Iterable[Mapping[str, Any] | Any],
                      timeout: float | None = None) -> pb2.ReportEventsResponse:
        """Events as dicts or engine.core.request.Event: kind (a name in EVENT_KINDS), user_id, item_id,
        optional timestamp (unix s, 0 = now) and request_id."""
        req = pb2.ReportEventsRequest(events=[_event(e) for e in events])
        return self._rec.ReportEvents(req, timeout=timeout or self.timeout, metadata=self.metadata)

    def reload(self, path: str | None = None, timeout: float | None = 60.0) -> pb2.ReloadBundleResponse:
        """Load a version folder of the served bundle root (or re-read CURRENT) on the worker reached.
        A refusal raises grpc.RpcError: INVALID_ARGUMENT (no such version folder) or
        FAILED_PRECONDITION (it does not load; the old version keeps serving), the reason in details()."""
        req = pb2.ReloadBundleRequest() if path is None else pb2.ReloadBundleRequest(path=path)
        return self._admin.ReloadBundle(req, timeout=timeout, metadata=self.metadata)

    def status(self, timeout: float | None = None) -> pb2.GetStatusResponse:
        return self._admin.GetStatus(pb2.GetStatusRequest(), timeout=timeout or self.timeout,
                                     metadata=self.metadata)

    def arms(self, timeout: float | None = None) -> pb2.ArmsResponse:
        """The experiment arms the worker reached serves (Admin.GetArms)."""
        return self._admin.GetArms(pb2.GetArmsRequest(), timeout=timeout or self.timeout, metadata=self.metadata)

    def set_arms(self, arms: Iterable[tuple], control: Mapping[str, Any] | None = None,
                 expect_version: int | None = None, salt: str = "",
                 timeout: float | None = None) -> pb2.ArmsResponse:
        """Replace the arms: (name, share, {dotted key: value}[, cap]) in hash order, and control's
        stage.* overrides; values are Python values (sent as TOML text); a true `cap` makes the
        arm's share a hard traffic bound (Experiment.cap). A refusal raises
        grpc.RpcError: INVALID_ARGUMENT with the validator's reason, FAILED_PRECONDITION for a
        stale expect_version or an arm that fails its smoke request."""
        from engine.core.arms import toml_value as text

        req = pb2.SetArmsRequest(arms=[pb2.Arm(name=n, share=sh, set={k: text(v) for k, v in st.items()},
                                               cap=bool(cap and cap[0])) for n, sh, st, *cap in arms],
                                 control={k: text(v) for k, v in (control or {}).items()}, salt=salt)
        if expect_version is not None:
            req.expect_version = expect_version
        return self._admin.SetArms(req, timeout=timeout or self.timeout, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RecServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _event(e: Mapping[str, Any] | Any) -> pb2.Event:
    d = dict(e) if isinstance(e, Mapping) else dataclasses.asdict(e)
    kind = d.get("kind", "")
    if kind not in EVENT_KINDS:
        raise ValueError(f"kind: '{kind}' is not one of {', '.join(EVENT_KINDS)}")
    return pb2.Event(kind=pb2.EventKind.Value(f"EVENT_KIND_{kind.upper()}"), user_id=str(d.get("user_id", "")),
                     item_id=str(d.get("item_id", "")), timestamp=float(d.get("timestamp") or 0.0),
                     request_id=str(d.get("request_id") or ""))


# ----------------------------------------------------------------------------- CLI

def _add_conn_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=os.environ.get("RECSERVE_TARGET", DEFAULT_TARGET),
                   help=f"server host:port (default $RECSERVE_TARGET or {DEFAULT_TARGET})")
    p.add_argument("--token", default=os.environ.get("RECSERVE_TOKEN") or None,
                   help="bearer token (default $RECSERVE_TOKEN)")
    p.add_argument("--tls-ca", type=Path, help="PEM CA certificate: connect with TLS")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds; also the server-side deadline")


def add_recommend_args(p: argparse.ArgumentParser) -> None:
    _add_conn_args(p)
    p.add_argument("--user", required=True, help="user id")
    p.add_argument("--count", type=int, default=0, help="items to return (0: server default)")
    p.add_argument("--context", action="append", default=[], metavar="KEY=INT", help="e.g. hour=21 device=1")
    p.add_argument("--exclude", action="append", default=[], metavar="ITEM", help="item id not to return")
    p.add_argument("--experiment", default="", help="experiment name (default: by user hash)")
    p.add_argument("--debug", action="store_true", help="also print per-stage timings and counts")


def add_events_args(p: argparse.ArgumentParser) -> None:
    _add_conn_args(p)
    p.add_argument("--user", action="append", default=[], help="repeat per event, or once for all")
    p.add_argument("--item", action="append", default=[], help="repeat per event")
    p.add_argument("--kind", action="append", default=[], choices=EVENT_KINDS,
                   help="repeat per event, or once for all")
    p.add_argument("--file", help="JSON lines with kind, user_id, item_id[, timestamp, request_id]; - for stdin")


def add_reload_args(p: argparse.ArgumentParser) -> None:
    _add_conn_args(p)
    p.add_argument("version", nargs="?", default=None,
                   help="version folder of the served bundle root (name or absolute path); "
                        "default: re-read CURRENT, retrying a version refused before")
    p.set_defaults(timeout=60.0)


def main_reload(args: argparse.Namespace) -> int:
    """Exit 0 when the worker reached serves the version, 1 with the server's reason when refused."""
    with _connect(args) as c:
        try:
            r = c.reload(args.version, timeout=args.timeout)
        except grpc.RpcError as e:
            return _rpc_failed("reload", e)
    print(f"{r.message} (bundle {r.version})")
    return 0


def main_recommend(args: argparse.Namespace) -> int:
    try:
        context = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.context)}
    except ValueError:
        print(f"recserve recommend: --context takes KEY=INT, got {args.context}", file=sys.stderr)
        return 2
    with _connect(args) as c:
        try:
            r = c.recommend(args.user, args.count, context, args.exclude, args.experiment, args.debug)
        except grpc.RpcError as e:
            return _rpc_failed("recommend", e)
    print(format_response(r, args.user))
    return 0


def format_response(r: pb2.RecommendResponse, user: str = "") -> str:
    """The readable table `recserve recommend` prints."""
    tasks = sorted(r.items[0].predictions) if r.items else []
    rows = [["rank", "item", "score", *tasks, "routes"]]
    rows += [[str(k + 1), it.item_id, f"{it.score:.4f}", *(f"{it.predictions[t]:.3f}" for t in tasks),
              ",".join(it.routes)] for k, it in enumerate(r.items)]
    lines = _table(rows, left=(1, len(rows[0]) - 1))
    lines.append(f"user {user}  experiment {r.experiment or '-'}  bundle {r.bundle_version}  "
                 f"total {r.total_ms:.2f} ms  degraded {'YES' if r.degraded else 'no'}  "
                 f"request {r.request_id or '-'}")
    if r.trace:
        lines += ["", *_table([["stage", "ms", "in", "out", "status"]]
                              + [[t.name, f"{t.ms:.2f}", str(t.count_in), str(t.count_out), t.status]
                                 for t in r.trace], left=(0, 4))]
    return "\n".join(lines)


def main_events(args: argparse.Namespace) -> int:
    try:
        events = _events_from_args(args)
    except (OSError, ValueError) as e:
        print(f"recserve events: {e}", file=sys.stderr)
        return 2
    with _connect(args) as c:
        try:
            r = c.report_events(events)
        except grpc.RpcError as e:
            return _rpc_failed("events", e)
    print(f"accepted {r.accepted}, rejected {len(r.rejected)}")
    for rej in r.rejected:
        e = events[rej.index]
        print(f"  #{rej.index} {e.get('kind')} user={e.get('user_id')} item={e.get('item_id')}: {rej.reason}")
    return 0 if not r.rejected else 1


def _events_from_args(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.file:
        if args.item:
            raise ValueError("give events either with --file or with --user/--item/--kind, not both")
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        events = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                e = json.loads(line)
                if not isinstance(e, dict):
                    raise ValueError("expected a JSON object")
                _event(e)         # refuse a bad line before sending anything
            except ValueError as x:
                raise ValueError(f"{args.file}:{n}: {x}") from None
            events.append(e)
        return events
    n = len(args.item)
    if n == 0:
        raise ValueError("no events: give --item (with --user and --kind) or --file")
    for name, vals in (("--user", args.user), ("--kind", args.kind)):
        if len(vals) not in (1, n):
            raise ValueError(f"{name} given {len(vals)} times for {n} --item: give it once or once per item")
    users = args.user * n if len(args.user) == 1 else args.user
    kinds = args.kind * n if len(args.kind) == 1 else args.kind
    return [{"kind": k, "user_id": u, "item_id": i} for k, u, i in zip(kinds, users, args.item)]


def _connect(args: argparse.Namespace) -> RecServeClient:
    try:
        return RecServeClient(args.target, args.token, args.tls_ca, args.timeout)
    except OSError as e:
        raise SystemExit(f"recserve: --tls-ca: {e}") from None


def _rpc_failed(what: str, e: grpc.RpcError) -> int:
    print(f"recserve {what}: {e.code().name}: {e.details()}", file=sys.stderr)
    return 1


def _table(rows: list[list[str]], left: tuple[int, ...]) -> list[str]:
    """Align columns; the `left` columns flush left, numbers right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]
