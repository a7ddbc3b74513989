"""Coarse phase 1 budget: a LightGBM binary model must score 3000 rows on ONE core in <= 3 ms.

For a few (trees, leaves) shapes trained on synthetic data, times one predict call of 3000 rows
with every runtime at hand: native LightGBM (plain and without the shape check), lleaves
(LLVM-compiled, fp64 and fp32, with its compile time, the reload time from its object-file
cache and the share of rows whose fp32 score moves by > 1e-4) and,
when onnxmltools is installed, ONNX Runtime. All on one thread.

    python -m loadtest.bench_trees [--rows 3000] [--features 12]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightgbm as lgb
import numpy as np

SHAPES = ((30, 15), (50, 15), (40, 31), (100, 15))


def synthetic(n: int, f: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features with interactions and noise, so every tree uses all its leaves."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, f)).astype(np.float32)
    w = rng.standard_normal(f)
    logit = x @ w * 0.5 + np.sin(2 * x[:, 0]) * x[:, 1] + (x[:, 2] > 0.5) * x[:, 3]
    return x, (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)


def timed_ms(fn: Callable[[], object], reps: int) -> tuple[float, float, float]:
    """Wall p50, wall p99 and CPU p50 in ms of `fn()` after a warm-up.

    Every runtime here computes on the calling thread, so its CPU time is the cost even when
    other processes share the cores and stretch the wall clock.
    """
    for _ in range(10):
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.thread_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
    return float(np.percentile(wall, 50) * 1e3), float(np.percentile(wall, 99) * 1e3), float(np.median(cpu) * 1e3)


def onnx_predictor(booster: lgb.Booster, f: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """ORT session over the onnxmltools conversion, or None if onnxmltools is missing."""
    try:
        import onnxmltools
        from onnxmltools.convert.common.data_types import FloatTensorType
    except ImportError:
        return None
    import onnxruntime as ort

    model = onnxmltools.convert_lightgbm(booster, initial_types=[("x", FloatTensorType([None, f]))],
                                         zipmap=False, target_opset=15)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = sess.get_outputs()[1].name  # probabilities [n, 2]
    return lambda x: sess.run([out], {"x": x})[0][:, 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--features", type=int, default=12)
    ap.add_argument("--train-rows", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=300)
    args = ap.parse_args()
    import lleaves

    x_train, y_train = synthetic(args.train_rows, args.features)
    x = synthetic(args.rows, args.features, seed=1)[0]
    train = lgb.Dataset(x_train, y_train, free_raw_data=False)
    print(f"{args.rows} rows x {args.features} float32 features, one thread; ms wall p50 / wall p99 / cpu p50")
    print(f"{'trees':>5}{'leaves':>7}{'native':>19}{'no check':>19}{'lleaves':>19}{'lleaves fp32':>19}"
          f"{'onnxrt':>19}{'compile s':>10}{'cache load s':>13}{'fp32 diff':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for trees, leaves in SHAPES:
            params = {"objective": "binary", "num_leaves": leaves, "learning_rate": 0.1, "min_data_in_leaf": 20,
                      "num_threads": 2, "verbose": -1, "seed": 0}
            booster = lgb.train(params, train, num_boost_round=trees)
            model_file = Path(tmp) / f"gbdt_{trees}_{leaves}.txt"
            booster.save_model(model_file)
            ref = booster.predict(x, num_threads=1)

            native = timed_ms(lambda: booster.predict(x, num_threads=1), args.reps)
            nocheck = timed_ms(lambda: booster.predict(x, num_threads=1, predict_disable_shape_check=True),
                               args.reps)

            cache = Path(tmp) / f"gbdt_{trees}_{leaves}.o"
            t = time.perf_counter()
            ll = lleaves.Model(model_file=str(model_file))
            ll.compile(cache=str(cache))
            compile_s = time.perf_counter() - t
            t = time.perf_counter()
            ll = lleaves.Model(model_file=str(model_file))
            ll.compile(cache=str(cache))
            load_s = time.perf_counter() - t
            np.testing.assert_allclose(ll.predict(x, n_jobs=1), ref, rtol=1e-6, atol=1e-9)
            lleaves_ms = timed_ms(lambda: ll.predict(x, n_jobs=1), args.reps)
            ll32 = lleaves.Model(model_file=str(model_file))
            ll32.compile(use_fp64=False)  # float32 in and out: no input copy; thresholds rounded to float32
            flips = float(np.mean(np.abs(ll32.predict(x, n_jobs=1) - ref) > 1e-4))
            lleaves32_ms = timed_ms(lambda: ll32.predict(x, n_jobs=1), args.reps)

            ort_fn = onnx_predictor(booster, args.features)
            if ort_fn is not None:
                np.testing.assert_allclose(ort_fn(x), ref, atol=1e-4)
            ort_ms = timed_ms(lambda: ort_fn(x), args.reps) if ort_fn else (float("nan"),) * 3
            cells = "".join(f"{a:>9.2f} /{b:>5.2f} /{c:>5.2f}" for a, b, c in (native, nocheck, lleaves_ms, lleaves32_ms, ort_ms))
            print(f"{trees:>5}{leaves:>7}{cells}{compile_s:>10.2f}{load_s:>13.3f}{flips:>10.1%}", flush=True)


if __name__ == "__main__":
    main()
