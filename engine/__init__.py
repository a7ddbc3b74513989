"""recserve serving engine: request context, candidates, pipeline runner, bundle, feature store, server.

numpy's BLAS pool is pinned to one thread before numpy loads (an operator's own setting
wins). One worker process per core already uses both cores; a second OpenBLAS thread
busy-waits between the per-request matrix products and burned a whole core while serving
a single stream (BENCHMARKS.md).
"""
import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
