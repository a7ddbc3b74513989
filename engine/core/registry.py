"""Stage kinds: each module in stages/ registers one kind with its Params dataclass.

Like product-mixer's component identifiers and Merlin's operator schemas: a kind declares
its config (Params), whether it is a recall route, which score columns it needs and which
it adds, so a pipeline is checked when the config loads, not when a request fails.
"""
from __future__ import annotations

import importlib
import pkgutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from engine.core.errors import ConfigError


@dataclass(frozen=True)
class KindSpec:
    kind: str
    params: type
    factory: Callable[..., Any]        # (name, params, bundle, config) -> stage callable
    is_recall: bool
    requires: tuple[str, ...]          # score columns that must exist before it runs
    provides: tuple[str, ...]          # score columns it adds ("tasks" = one per model task)


_KINDS: dict[str, KindSpec] = {}
_loaded = False


def register(kind: str, params: type, *, recall: bool = False,
             requires: tuple[str, ...] = (), provides: tuple[str, ...] = ()):
    def deco(factory):
        _KINDS[kind] = KindSpec(kind, params, factory, recall, requires, provides)
        factory.kind = kind
        return factory
    return deco


# Packages whose modules register stage kinds, found by name: stages depend on the core,
# never the reverse. A deployment's own kinds can live in another package listed here.
STAGE_PACKAGES = ("stages",)


def _load() -> None:
    global _loaded
    if not _loaded:
        for name in STAGE_PACKAGES:
            pkg = importlib.import_module(name)
            for m in pkgutil.iter_modules(pkg.__path__):
                importlib.import_module(f"{name}.{m.name}")
        _loaded = True


def kind(name: str) -> KindSpec | None:
    _load()
    return _KINDS.get(name)


def kinds() -> list[str]:
    _load()
    return sorted(_KINDS)


def check_sizes(cfg) -> None:
    """Refuse impossible sizes and missing score columns along the declared pipeline."""
    size = 0
    for name in cfg.pipeline.recall:
        _, p = cfg.stage[name]
        size += p.k
    have = {"recall"}
    for name in cfg.pipeline.stages:
        k, p = cfg.stage[name]
        spec = _KINDS[k]
        for col in spec.requires:
            if col not in have:
                raise ConfigError(f"pipeline.stages: '{name}' needs score '{col}' which no earlier stage adds")
        have.update(spec.provides)
        keep = getattr(p, "keep", 0)
        if keep:
            if keep > size:
                raise ConfigError(f"stage.{name}.keep: {keep} exceeds the {size} candidates it can receive")
            size = keep
    if cfg.serving.max_count > size:
        raise ConfigError(f"serving.max_count: {cfg.serving.max_count} exceeds the {size} "
                          "candidates the last stage keeps")


@dataclass
class StageEnv:
    """What a stage is built from besides its Params: the loaded bundle and shared runtimes."""

    name: str
    bundle: Any            # engine.core.bundle.Bundle
    models: Any            # engine.core.models.Models
    store: Any             # engine.store.FeatureStore
    config: Any            # engine.core.config.Config (the experiment's variant)
    route_bit: int = 0     # recall routes only: this route's bit in Candidates.routes
    item_index: dict[str, int] | None = None   # external item id -> catalog index, built once per bundle

    def read_sidecar(self, param: str, rel: str) -> dict[str, Any]:
        """A stage's TOML side file (whitelist, blocklist), relative to the config; errors name the key."""
        path = Path(self.config.path).parent / rel
        try:
            return tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"stage.{self.name}.{param}: {path}: {e}") from None


@dataclass
class RouteParams:
    """Fields every recall route has; a route's Params extends it.

    `inline` routes run on the request thread: for routes cheaper than a thread hand-off
    (~0.5 ms under the GIL). Their timeout is checked after they return. Routes that spend
    their time outside the GIL (faiss, ORT) run on the pool, where a late one is abandoned.
    """

    k: int = 100
    timeout_ms: float = 20.0
    inline: bool = False

    def check(self) -> None:
        if self.k <= 0:
            raise ConfigError("k: must be > 0")
        if self.timeout_ms <= 0:
            raise ConfigError("timeout_ms: must be > 0")


@dataclass
class CutParams:
    """Fields of a ranking stage that truncates: how many it keeps and its expected cost."""

    keep: int = 1000
    budget_ms: float = 10.0

    def check(self) -> None:
        if self.keep <= 0 or self.budget_ms <= 0:
            raise ConfigError("keep, budget_ms: must be > 0")
