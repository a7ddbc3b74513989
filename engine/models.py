"""The bundle's runtimes, loaded once per bundle and shared by every stage and experiment.

Thread pools are set for a 2-core machine running one worker process per core: ONNX
Runtime, faiss and LightGBM each get `serving.*_threads` (default 1) and ORT's intra-op
pool does not spin between calls (DESIGN.md: spinning burned 1.5 cores and doubled p99).
"""
from __future__ import annotations

import threading

import lightgbm as lgb
import numpy as np
import onnxruntime as ort

from engine.bundle import Bundle, BundleError
from engine.config import ServingConfig
from indexes import load_index

ONNX_MODELS = ("user_tower", "coarse_dnn", "fine")


def session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class Models:
    def __init__(self, bundle: Bundle, serving: ServingConfig):
        self.bundle = bundle
        so = session_options(serving.ort_threads)
        self.sessions: dict[str, ort.InferenceSession] = {}
        for name in ONNX_MODELS:
            path = bundle.file(f"models/{name}.onnx")
            try:
                self.sessions[name] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own exception types
                raise BundleError(f"{path}: ONNX Runtime refused it: {str(e).splitlines()[0]}") from None
        trees = bundle.file("models/coarse_trees.txt")
        try:
            self.trees = lgb.Booster(model_file=str(trees))
        except lgb.basic.LightGBMError as e:
            raise BundleError(f"{trees}: LightGBM refused it: {e}") from None
        self.tree_threads = serving.lgbm_threads
        idx = bundle.manifest["index"]
        self.index = load_index(str(bundle.file("index/items.faiss")), nprobe=idx.get("nprobe"),
                                threads=serving.faiss_threads)
        self._lock = threading.Lock()

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """First output of an ONNX model (ORT releases the GIL while it runs)."""
        return self.sessions[name].run(None, feeds)[0]

    def predict_trees(self, x: np.ndarray) -> np.ndarray:
        return self.trees.predict(x, num_threads=self.tree_threads).astype(np.float32)
