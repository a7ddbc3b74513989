"""The bundle's runtimes, loaded once per bundle and shared by every stage and experiment.

Thread pools are set for a 2-core machine running one worker process per core: ONNX
Runtime, faiss and LightGBM each get `serving.*_threads` (default 1) and ORT's intra-op
pool does not spin between calls: measured on this 2-core machine (MLP on 1000 rows, 2 intra-op
threads), the spinning pool burned 1.5 cores between calls and `allow_spinning=0` cut that to
0.86 cores and p99 from 7.5 to 3.8 ms.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Callable

import lightgbm as lgb
import numpy as np
import onnxruntime as ort

from engine.core.bundle import Bundle
from engine.core.errors import BundleError
from engine.core.sections import ServingConfig
from indexes import load_index

ONNX_MODELS = ("user_tower", "coarse_dnn", "fine")

# (bundle version, feeds, timeout s or None) -> first output; TimeoutError once the timeout passed
RemoteModel = Callable[[str, dict[str, np.ndarray], float | None], np.ndarray]


def session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class Models:
    def __init__(self, bundle: Bundle, serving: ServingConfig, remote: dict[str, RemoteModel] | None = None):
        """`remote`: models served elsewhere (e.g. the fine ranker as its own Ray deployment,
        batched across requests); they are not loaded here."""
        self.bundle = bundle
        self.remote = remote or {}
        so = session_options(serving.ort_threads)
        self.sessions: dict[str, ort.InferenceSession] = {}
        for name in ONNX_MODELS:
            if name in self.remote:
                continue
            path = bundle.file(f"models/{name}.onnx")
            try:
                self.sessions[name] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own exception types
                raise BundleError(f"{path}: ONNX Runtime refused it: {str(e).splitlines()[0]}") from None
        self._predict_trees = _tree_runtime(bundle, serving.tree_runtime, serving.lgbm_threads)
        idx = bundle.manifest["index"]
        self.index = load_index(str(bundle.file("index/items.faiss")), nprobe=idx.get("nprobe"),
                                threads=serving.faiss_threads)

    def run(self, name: str, feeds: dict[str, np.ndarray], timeout_s: float | None = None) -> np.ndarray:
        """First output of an ONNX model (ORT releases the GIL while it runs). `timeout_s`: how
        long a remote model may take, the request's remaining time: a hung one raises
        TimeoutError, and the stage fails open, instead of holding the request past its deadline."""
        if name in self.remote:
            return self.remote[name](self.bundle.version, feeds, timeout_s)
        return self.sessions[name].run(None, feeds)[0]

    def predict_trees(self, x: np.ndarray) -> np.ndarray:
        """Coarse phase-1 probabilities; both runtimes release the GIL."""
        return self._predict_trees(x).astype(np.float32)


def _tree_runtime(bundle: Bundle, runtime: str, threads: int):
    """lleaves compiles the LightGBM text model to native code: ~4.7x faster than LightGBM's
    own predict for 3000 rows on one core (loadtest/bench_trees.py). The compiled object is
    built on this host from the verified model text and cached outside the bundle, keyed by
    the model's sha256 and the CPU, so a bundle never carries executable code."""
    path = bundle.file("models/coarse_trees.txt")
    try:
        booster = lgb.Booster(model_file=str(path))   # also validates the file for lleaves
    except lgb.basic.LightGBMError as e:
        raise BundleError(f"{path}: LightGBM refused it: {e}") from None
    if runtime == "native":
        return lambda x: booster.predict(x, num_threads=threads)
    import lleaves
    import llvmlite.binding as llvm

    sha = bundle.manifest["files"]["models/coarse_trees.txt"]["sha256"][:16]
    cache_dir = Path(os.environ.get("RECSERVE_CACHE", Path.home() / ".cache" / "recserve")) / "lleaves"
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache = cache_dir / f"{sha}-{llvm.get_host_cpu_name()}.o"
    model = lleaves.Model(model_file=str(path))
    with open(cache_dir / ".lock", "a+") as lock:   # workers start together: compile once
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            model.compile(cache=str(cache))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return lambda x: model.predict(x, n_jobs=threads)
