"""Shared fixtures: one tiny bundle per test session, built by the real offline pipeline."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The servers tests start keep their feature state in memory unless a test passes --state-dir
# (a tmp dir): the default state dir is under the user's home (engine.store.statedir).
os.environ["RECSERVE_STATE_DIR"] = "none"


@pytest.fixture(scope="session")
def tiny_config() -> Path:
    return ROOT / "configs" / "tiny.toml"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_config) -> Path:
    """Bundle root built from configs/tiny.toml. RECSERVE_TEST_BUNDLE=DIR reuses (or fills) DIR."""
    from engine.core.config import load_config
    from model_export.build import build_bundle

    root = Path(os.environ.get("RECSERVE_TEST_BUNDLE") or tmp_path_factory.mktemp("bundles") / "tiny")
    build_bundle(load_config(tiny_config), root)
    return root
