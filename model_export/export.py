"""ONNX export (one self-contained file per model) and the parity check that gates it.

dynamo=False with opset 17 writes a single .onnx file (the dynamo exporter needs onnxscript
and splits weights into .onnx.data). Every batch dimension is dynamic; parity is checked in
serving shapes (user/seq batch 1 broadcast over N candidates) and in training shapes.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from engine.core.featurize import Tables, sequence_input

if TYPE_CHECKING:
    from model_export.train import RankerRows

OPSET = 17
PARITY_ROWS = 256           # candidates (N) in the parity cases
_BATCH_AXIS = {"x": "B", "user": "Bu", "item": "N", "seq": "Bs", "seq_mask": "Bs",
               "emb": "B", "p": "N", "probs": "N"}


def parity_cases(name: str, rows: "RankerRows", tables: Tables) -> list[dict[str, np.ndarray]]:
    """The shapes a ranker is checked in: what the server feeds (one user row broadcast over N
    candidates, an empty history) and the training shapes."""
    n = min(PARITY_ROWS, len(rows.user))
    u, i = rows.user[:n], rows.item[:n]
    if name == "coarse_dnn":
        return [{"user": u[:1], "item": i}, {"user": u, "item": i}]
    seq, mask = sequence_input(tables, rows.recent[:n])
    return [{"user": u[:1], "item": i, "seq": seq[:1], "seq_mask": mask[:1]},
            {"user": u[:1], "item": i, "seq": seq[:1] * 0, "seq_mask": mask[:1] * 0},
            {"user": u, "item": i, "seq": seq, "seq_mask": mask}]


class ParityError(RuntimeError):
    """ONNX Runtime and torch disagree beyond tolerance: the exported graph must not ship."""


def ort_session(path: str | Path) -> ort.InferenceSession:
    """A one-thread CPU session that does not spin between calls, as the server configures it."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def export_onnx(model: nn.Module, path: Path, example: dict[str, np.ndarray]) -> None:
    """Trace `model` (inputs/outputs named by its onnx_inputs/onnx_outputs) to one ONNX file."""
    model.eval()
    names, outs = list(model.onnx_inputs), list(model.onnx_outputs)
    args = tuple(torch.from_numpy(example[n]) for n in names)
    with warnings.catch_warnings():   # the TorchScript exporter is deprecated, and chosen on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=OPSET, input_names=names,
                          output_names=outs, dynamic_axes={n: {0: _BATCH_AXIS[n]} for n in names + outs})


def check_parity(name: str, model: nn.Module, path: Path, cases: list[dict[str, np.ndarray]],
                 tol: float) -> float:
    """Max |ORT - torch| over `cases`; raises ParityError naming the model beyond `tol`."""
    sess = ort_session(path)
    worst = 0.0
    for feeds in cases:
        with torch.no_grad():
            want = model(*(torch.from_numpy(feeds[n]) for n in model.onnx_inputs)).numpy()
        got = sess.run(None, feeds)[0]
        if got.shape != want.shape:
            raise ParityError(f"{name}: ONNX output shape {got.shape} != torch {want.shape} "
                              f"for inputs {({k: v.shape for k, v in feeds.items()})}")
        worst = max(worst, float(np.abs(got - want).max(initial=0.0)))
    if not worst <= tol:
        raise ParityError(f"{name}: ONNX Runtime differs from torch by {worst:.3g} > parity_tol {tol:g} ({path})")
    return worst


def export_checked(name: str, model: nn.Module, path: Path, cases: list[dict[str, np.ndarray]],
                   tol: float) -> float:
    """Export with the first case as the tracing example, then check parity on all cases."""
    export_onnx(model, path, cases[0])
    worst = check_parity(name, model, path, cases, tol)
    print(f"  {name}: exported {path.name}, parity max|diff| {worst:.2e} over {len(cases)} shape cases")
    return worst
