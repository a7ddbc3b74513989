"""A model served out of process (engine.core.models.RemoteModel, e.g. the Ray backend's
FineRanker deployment) is given the request's remaining time and fails open when late."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from engine.core.bundle import load_bundle
from engine.core.config import load_config
from engine.core.models import session_options
from engine.core.request import Request
from engine.core.runner import Engine
from engine.store.embedded import EmbeddedStore

pytestmark = pytest.mark.slow


class _FineOverThere:
    """The bundle's fine ranker behind a call that can hang: what a remote replica does."""

    def __init__(self, bundle):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(bundle.file("models/fine.onnx")), session_options(1),
                                            providers=["CPUExecutionProvider"])
        self.hung = threading.Event()
        self.timeouts: list[float | None] = []

    def __call__(self, version: str, feeds: dict[str, np.ndarray], timeout_s: float | None) -> np.ndarray:
        self.timeouts.append(timeout_s)
        if self.hung.is_set():
            threading.Event().wait(timeout_s)      # a hung replica: the caller's timeout is all that ends it
            raise TimeoutError(f"no answer within {timeout_s * 1e3:.0f} ms")
        return self.session.run(None, feeds)[0]


def test_a_hung_remote_fine_ranker_fails_open_within_the_deadline(tiny_config, tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    fine = _FineOverThere(bundle)
    engine = Engine(load_config(tiny_config), bundle, make_store=EmbeddedStore, remote_models={"fine": fine})
    try:
        req = dict(user_id="u1", count=5, debug=True, deadline_ms=150.0)
        ok = engine.recommend(Request(**req))
        assert {t.name: t.status for t in ok.trace}["fine"] == "ok" and not ok.degraded
        fine.hung.set()
        late = engine.recommend(Request(**req))
        status = {t.name: t.status for t in late.trace}
        assert status["fine"] == "failed" and late.degraded and len(late.item_ids) == 5
        assert all(t is not None and 0 <= t <= 0.150 for t in fine.timeouts[-2:])
    finally:
        engine.close()
