"""Ray Serve backend: `recserve serve --backend ray`.

The engine runs as a Ray Serve application on a Ray cluster; Ray's gRPC proxy answers the
same `recserve.v1` services, so clients and load tests need no change. Each `RecServe`
replica is one engine.app.service.Service, the same code a native gRPC worker runs: validation,
status codes, the bearer token and hot reload through the bundle root's CURRENT pointer,
which every node must be able to read (a shared filesystem). A new version rolls through
the replicas as each one's tick swaps it in while it keeps serving the old one, so no
request fails; `Admin.ReloadBundle` reaches one replica, which loads the version and then
writes CURRENT for the others. Replicas share live feature state only through Redis
(`--feature-store redis://` or `rediscluster://`); the embedded store is per replica, so
it is refused with more than one.

Optional split placement (`ray.split_fine`): the fine ranker is its own deployment (e.g. on
accelerator nodes) and `serve.batch` concatenates the candidates of concurrent requests
into one ONNX call. The engine calls it through `engine.core.models.Models(remote=...)`, waiting
no longer than the request's remaining time; if it fails or is late, the fine stage fails open
like any other stage.

What Ray's proxy does differently from the native server, and what this module does about it:
- it binds every interface ([::]:PORT): the CLI asks for `--host 0.0.0.0` to say so;
- it has no TLS: `--tls-*` is refused (terminate TLS in front of it);
- it does not forward the client's deadline: requests get `serving.deadline_ms`;
- it has no grpc.health.v1 service: ray.serve.RayServeAPIService/Healthz answers instead;
- overload is `ray.max_queued_requests` per proxy, answered RESOURCE_EXHAUSTED.

Ray is an optional extra (`pip install ".[ray]"`); nothing else in recserve imports it.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from ray import serve
from ray.serve.config import AutoscalingConfig, gRPCOptions

from engine.core.bundle import config_file, load_bundle
from engine.core.config import Config, load_config
from engine.core.errors import BundleError
from engine.core.models import session_options
from engine.app.ready import free_port, print_ready
from engine.app.service import POLL_S, Service
from protos import pb2

log = logging.getLogger("recserve.ray")

APP = "recserve"
SERVICERS = ["protos.recserve_pb2_grpc.add_RecServeServicer_to_server",
             "protos.recserve_pb2_grpc.add_AdminServicer_to_server"]
FINE_VERSIONS = 2           # fine ranker sessions kept per replica: the serving version and the next
FINE_STARTUP_S = 300.0      # a RecServe replica waits this long for the FineRanker deployment


class _Refused(Exception):
    """Raised after setting a status on Ray's gRPC context: the proxy answers with that code."""


class _Context:
    """The part of grpc.ServicerContext engine.app.service uses, over Ray's RayServegRPCContext."""

    def __init__(self, ctx: Any):
        self.ctx = ctx

    def time_remaining(self) -> None:
        return None               # Ray's proxy does not forward the client's deadline

    def waited_s(self) -> float:
        return 0.0                # Ray queues calls in its proxy and router, out of our sight

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.ctx.invocation_metadata()

    def abort(self, code: grpc.StatusCode, msg: str) -> None:
        self.ctx.set_code(code)
        self.ctx.set_details(msg)
        raise _Refused(msg)


class _RemoteFine:
    """engine.core.models.RemoteModel over the FineRanker deployment's handle: waits no longer
    than the request's remaining time, then cancels the call and raises TimeoutError, so a
    hung or overloaded FineRanker replica costs the fine stage (failed open), not the request."""

    def __init__(self, handle: Any):
        self.handle = handle

    def __call__(self, version: str, feeds: dict[str, np.ndarray], timeout_s: float | None) -> np.ndarray:
        response = self.handle.score.remote(version, feeds)
        try:
            return response.result(timeout_s=timeout_s)
        except TimeoutError:
            response.cancel()
            raise TimeoutError(f"FineRanker deployment gave no answer within {timeout_s * 1e3:.0f} ms") from None


@serve.deployment(name="RecServe")
class RecServeDeployment:
    """One Service per replica; method names are the proto's RPC names (Ray's gRPC routing)."""

    def __init__(self, config: str, overrides: list[str], bundle: str, feature_store: str, token: str | None,
                 fine: Any = None):
        from engine.app.arms import board_for
        from engine.store.factory import store_factory

        cfg = load_config(config, overrides)
        s = cfg.serving
        self.fine = fine

        def start() -> Service:
            remote = None
            if fine is not None:
                # a FineRanker replica up and loaded before the engine's smoke request, whose own
                # budget (10 s) would otherwise include the other deployment's start
                fine.stats.remote().result(timeout_s=FINE_STARTUP_S)
                remote = {"fine": _RemoteFine(fine)}
            return Service(cfg, Path(bundle), store_factory(feature_store, event_buffer=s.event_buffer), token,
                           remote_models=remote, board=board_for(feature_store, None))

        # off Serve's event loop: waiting on a handle blocks
        with ThreadPoolExecutor(1) as ex:
            self.svc = ex.submit(start).result()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="recserve-tick", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.svc.tick()
            except Exception:    # noqa: BLE001 - the reload loop must outlive any bug
                log.exception("tick failed")

    def Recommend(self, request: pb2.RecommendRequest, grpc_context) -> pb2.RecommendResponse:
        return self.svc.rpcs.Recommend(request, _Context(grpc_context))

    def ReportEvents(self, request: pb2.ReportEventsRequest, grpc_context) -> pb2.ReportEventsResponse:
        return self.svc.rpcs.ReportEvents(request, _Context(grpc_context))

    def ReloadBundle(self, request: pb2.ReloadBundleRequest, grpc_context) -> pb2.ReloadBundleResponse:
        return self.svc.admin.ReloadBundle(request, _Context(grpc_context))

    def SetArms(self, request: pb2.SetArmsRequest, grpc_context) -> pb2.ArmsResponse:
        return self.svc.admin.SetArms(request, _Context(grpc_context))

    def GetArms(self, request: pb2.GetArmsRequest, grpc_context) -> pb2.ArmsResponse:
        return self.svc.admin.GetArms(request, _Context(grpc_context))

    def GetStatus(self, request: pb2.GetStatusRequest, grpc_context) -> pb2.GetStatusResponse:
        resp = self.svc.admin.GetStatus(request, _Context(grpc_context))
        if self.fine is not None:       # one FineRanker replica's batching: requests / batches
            for k, v in self.fine.stats.remote().result(timeout_s=5).items():
                resp.counters[f"fine.{k}"] = v
        return resp

    def __del__(self):                  # Serve calls it when it stops the replica
        if hasattr(self, "svc"):         # not if __init__ failed
            self._stop.set()
            self.svc.close()


@serve.deployment(name="FineRanker")
class FineRankerDeployment:
    """The fine ranker alone, one ONNX call per batch of concurrent requests.

    A request brings user [1, Du], item [n, Di], seq [1, L, d], seq_mask [1, L]; the batch
    repeats each request's user and sequence over its n rows (the model accepts Bu = Bs = N)
    and concatenates, so the answer per row equals the unbatched one. Sessions are keyed by
    bundle version, so replicas mid-roll get the model they were built with."""

    def __init__(self, bundle: str, ort_threads: int, max_batch: int, wait_ms: float):
        self.root = Path(bundle)
        self.opts = session_options(ort_threads)
        self.sessions: dict[str, Any] = {}
        self.counts = {"requests": 0, "batches": 0, "rows": 0}
        self.score.set_max_batch_size(max_batch)
        self.score.set_batch_wait_timeout_s(wait_ms / 1000)
        self._session(load_bundle(self.root, verify=False).version)   # ready means ready to score

    def _session(self, version: str) -> Any:
        sess = self.sessions.get(version)
        if sess is None:
            import onnxruntime as ort

            path = self.root / version if (self.root / version).is_dir() else self.root
            b = load_bundle(path)       # verifies the manifest's checksums
            if b.version != version:
                raise ValueError(f"fine ranker: {path} holds {b.version}, asked for {version}")
            sess = ort.InferenceSession(str(b.file("models/fine.onnx")), self.opts,
                                        providers=["CPUExecutionProvider"])
            self.sessions[version] = sess
            while len(self.sessions) > FINE_VERSIONS:
                self.sessions.pop(next(iter(self.sessions)))
        return sess

    def stats(self) -> dict[str, int]:
        return dict(self.counts)

    def _run(self, versions: list[str], feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        c = self.counts
        c["requests"] += len(feeds)
        c["batches"] += 1
        c["rows"] += sum(f["item"].shape[0] for f in feeds)
        out: list[np.ndarray | None] = [None] * len(feeds)
        for version in dict.fromkeys(versions):
            idx = [i for i, v in enumerate(versions) if v == version]
            n = [feeds[i]["item"].shape[0] for i in idx]
            batch = {"item": np.concatenate([feeds[i]["item"] for i in idx])}
            for key in ("user", "seq", "seq_mask"):
                batch[key] = np.concatenate([np.repeat(feeds[i][key], k, axis=0) for i, k in zip(idx, n)])
            probs = self._session(version).run(None, batch)[0]
            for i, part in zip(idx, np.split(probs, np.cumsum(n)[:-1])):
                out[i] = part
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def score(self, versions: list[str], feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        return await asyncio.to_thread(self._run, versions, feeds)


def low_overhead_env(split_fine: bool) -> dict[str, str]:
    """Ray Serve's lower-overhead request path (Ray 2.60 settings, read by every Serve process
    at start): set for the local Ray instance `recserve serve --backend ray` starts, unless the
    operator set them; a cluster of one's own sets them on its nodes (docs/deploy.md).
    Measured against the defaults in BENCHMARKS.md (single-stream p50 over native 1.83x -> 1.46x)."""
    env = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",           # proxy -> replica over gRPC, not an actor call
           "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}   # the proxy's router on its own loop: no hop
    if not split_fine:
        # the handler on the replica's event loop, not a thread of its own: one hop less per call;
        # not with the split fine ranker, whose remote call waits for an answer that loop delivers
        env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] = "0"
    return env


def _logging(cfg: Config) -> dict[str, Any]:
    """Serve writes an access-log line per request in the proxy and in the replica (streamed to
    the driver too): CPU on the request path, off unless `ray.access_log`."""
    return {"enable_access_log": cfg.ray.access_log, "log_level": "INFO" if cfg.ray.access_log else "WARNING"}


def build_app(cfg: Config, config_path: str, overrides: list[str], bundle: str, feature_store: str,
              token: str | None, replicas: int, autoscale: tuple[int, int] | None):
    """The Serve application: RecServe replicas, plus the FineRanker deployment if split."""
    r = cfg.ray
    logging_config = _logging(cfg)
    scale: dict[str, Any] = ({"autoscaling_config": AutoscalingConfig(
        min_replicas=autoscale[0], max_replicas=autoscale[1], target_ongoing_requests=r.target_ongoing_requests)}
        if autoscale else {"num_replicas": replicas})
    fine = None
    if r.split_fine:
        fine = FineRankerDeployment.options(
            num_replicas=r.fine_replicas, ray_actor_options={"num_cpus": r.fine_num_cpus},
            logging_config=logging_config,
            max_ongoing_requests=max(r.fine_max_batch * 2, r.max_ongoing_requests),
        ).bind(bundle, cfg.serving.ort_threads, r.fine_max_batch, r.fine_batch_wait_ms)
    return RecServeDeployment.options(
        ray_actor_options={"num_cpus": r.num_cpus}, max_ongoing_requests=r.max_ongoing_requests,
        max_queued_requests=r.max_queued_requests, graceful_shutdown_timeout_s=10, logging_config=logging_config,
        **scale,
    ).bind(config_path, overrides, bundle, feature_store, token, fine)


# ----------------------------------------------------------------------------- CLI

class Fail(Exception):
    """A startup failure reported as one line on stderr."""


def check_args(args: argparse.Namespace) -> tuple[int, tuple[int, int] | None]:
    """(replicas, autoscale) from the CLI, or Fail naming what cannot work on Ray."""
    if args.tls_cert or args.tls_key:
        raise Fail("--backend ray: Ray Serve's gRPC proxy has no TLS; terminate TLS in front of it "
                   "(docs/deploy.md) or use the native server")
    if args.metrics_port is not None:
        raise Fail("--backend ray: replicas have no /metrics of their own; Ray exports Serve's request "
                   "metrics from every node (docs/deploy.md)")
    if args.state_dir:
        raise Fail("--backend ray: --state-dir persists the embedded store of one machine; "
                   "use --feature-store redis://... or rediscluster://...")
    if args.host not in ("0.0.0.0", "::"):
        raise Fail(f"--backend ray: Ray Serve's gRPC proxy listens on every interface, not {args.host}; "
                   "pass --host 0.0.0.0 to accept that (firewall it), or use the native server")
    return scale(args.replicas, args.autoscale, args.feature_store)


def scale(replicas: int | None, autoscale: str | None, feature_store: str | None) -> tuple[int, tuple[int, int] | None]:
    """(replicas, autoscale (MIN, MAX) or None), or Fail: more than one replica needs a shared store."""
    bounds = None
    if autoscale:
        try:
            lo, hi = (int(x) for x in str(autoscale).split(","))
        except ValueError:
            raise Fail(f"--autoscale {autoscale!r}: expected MIN,MAX") from None
        if not 0 <= lo <= hi or hi < 1:
            raise Fail(f"--autoscale {autoscale!r}: need 0 <= MIN <= MAX and MAX >= 1")
        bounds = (lo, hi)
    n = int(replicas or 1)
    if n < 1:
        raise Fail(f"--replicas must be >= 1, got {n}")
    if (bounds[1] if bounds else n) > 1 and feature_store in (None, "", "embedded"):
        raise Fail("--backend ray with more than one replica needs a shared feature store "
                   "(--feature-store redis://HOST:PORT/DB or rediscluster://HOST:PORT,...): "
                   "the embedded store would give each replica its own state")
    return n, bounds


def app_builder(args: dict[str, Any]):
    """The application for a Serve config file or KubeRay's RayService (serveConfigV2):
    `import_path: engine.app.ray_app:app_builder` with args bundle (a path every node reads),
    config (default: the config the bundle carries), feature_store, replicas or autoscale
    ("MIN,MAX"), set (list of KEY=VALUE). The token comes from $RECSERVE_TOKEN on the nodes,
    never from the config file. docs/deploy.md has an example."""
    unknown = set(args) - {"config", "bundle", "feature_store", "replicas", "autoscale", "set"}
    if unknown or "bundle" not in args:
        raise Fail(f"app_builder args: need bundle; unknown: {sorted(unknown) or 'none'}")
    store = args.get("feature_store", "embedded")
    replicas, autoscale = scale(args.get("replicas"), args.get("autoscale"), store)
    overrides = list(args.get("set", []))
    try:
        config = str(Path(args.get("config") or config_file(args["bundle"])).resolve())
    except BundleError as e:
        raise Fail(str(e)) from None
    return build_app(load_config(config, overrides), config, overrides, str(Path(args["bundle"]).resolve()),
                     store, os.environ.get("RECSERVE_TOKEN") or None, replicas, autoscale)


def serve_ray(args: argparse.Namespace) -> int:
    """Deploy, print the ready line, hold until SIGTERM/SIGINT, then take the app down."""
    import ray

    try:
        cfg = load_config(args.config, args.set)
    except Exception as e:    # noqa: BLE001 - ConfigError and friends: one line
        raise Fail(str(e)) from None
    if not args.bundle.is_dir():
        raise Fail(f"{args.bundle}: no such bundle directory")
    replicas, autoscale = check_args(args)
    from engine.store.factory import store_factory

    try:
        store_factory(args.feature_store)    # checks the URL
    except ValueError as e:
        raise Fail(str(e)) from None
    port = args.port or free_port()
    own = args.ray_address is None
    if own:
        for k, v in low_overhead_env(cfg.ray.split_fine).items():
            os.environ.setdefault(k, v)       # the Ray processes started below inherit them
    ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING,
             configure_logging=False, **({"num_cpus": args.ray_cpus} if own and args.ray_cpus else {}))
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):   # after ray.init, which installs its own handlers
        signal.signal(s, lambda *_: stop.set())
    try:
        serve.start(proxy_location=args.proxy_location, logging_config=_logging(cfg),
                    http_options={"host": "127.0.0.1", "port": free_port()},
                    grpc_options=gRPCOptions(port=port, grpc_servicer_functions=SERVICERS))
        app = build_app(cfg, str(args.config.resolve()), list(args.set), str(args.bundle.resolve()),
                        args.feature_store, args.token, replicas, autoscale)
        try:
            serve.run(app, name=APP, route_prefix="/", blocking=False)
        except RuntimeError as e:        # a replica failed to start: its traceback is in Ray's log above
            serve.delete(APP)
            raise Fail(f"Ray Serve could not deploy {APP}: {str(e).splitlines()[0]}") from None
        version = _status(port, args.token).bundle_version
        scale_info = {"autoscale": f"{autoscale[0]},{autoscale[1]}"} if autoscale else {"replicas": replicas}
        print_ready(f"0.0.0.0:{port}", backend="ray", **scale_info, bundle=version,
                    fine="split" if cfg.ray.split_fine else "local")
        stop.wait()
        log.info("stopping: deleting the Serve application (in-flight calls drain)")
        serve.delete(APP)
        if own:
            serve.shutdown()
    finally:
        ray.shutdown()
    return 0


def _status(port: int, token: str | None, timeout_s: float = 120.0) -> pb2.GetStatusResponse:
    """GetStatus through the proxy once the app answers: the ready line tells the truth."""
    from engine.app.client import RecServeClient

    end = time.monotonic() + timeout_s
    with RecServeClient(f"127.0.0.1:{port}", token=token) as client:
        while True:
            try:
                return client.status(timeout=5)
            except grpc.RpcError as e:
                if time.monotonic() > end:
                    raise Fail(f"Ray Serve app not answering on port {port}: {e.code().name} {e.details()}") from None
                time.sleep(0.5)
