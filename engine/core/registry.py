"""Stage kinds: each module in stages/ registers one kind with everything the engine needs.

Like product-mixer's component kinds and Merlin's operator schemas: `register()` carries a
kind's Params dataclass, its policy (may the engine skip it under deadline pressure, may it
run on the request thread) and the columns it reads and writes, so a pipeline is checked
whole when the config loads (`check_pipeline`), not when a request fails. The engine never
asks a stage object what to do; of its Params it reads only the typed fields of the bases
the registration requires (RouteParams: k, timeout_ms, inline; BudgetParams: budget_ms;
CutParams: keep, for the size check).

Columns are typed names in three spaces:
  score:<name>   a float32 score column of the batch (`Candidates.scores`); `score:task:*`
                 is one column per model task (engine.core.candidates.task_scores)
  feat:<name>    a 2-D feature column of the batch (`Candidates.feats`)
  ctx:<name>     a per-request value on the RequestContext: a hydrated field (`user_e`) or a
                 lazily computed one (`ranker_user`); always available, declared for the record
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from engine.core.candidates import TASK_PREFIX
from engine.core.context import RequestContext
from engine.core.errors import ConfigError
from engine.core.ids import IdIndex

SPACES = ("score", "feat", "ctx")
TASK_SCORES = f"score:{TASK_PREFIX}*"     # one score column per model task


@dataclass(frozen=True)
class Column:
    space: str          # score | feat | ctx
    name: str

    @classmethod
    def parse(cls, text: str) -> "Column":
        space, _, name = text.partition(":")
        if space not in SPACES or not name:
            raise ValueError(f"column {text!r}: expected <{'|'.join(SPACES)}>:<name>")
        if space == "ctx" and name not in _ctx_values():
            raise ValueError(f"column {text!r}: RequestContext has no value '{name}'")
        return cls(space, name)

    def matches(self, space: str, name: str) -> bool:
        """Whether a concrete column (e.g. score 'task:click') is this one (e.g. score 'task:*')."""
        if space != self.space:
            return False
        return name.startswith(self.name[:-1]) if self.name.endswith("*") else name == self.name

    def __str__(self) -> str:
        return f"{self.space}:{self.name}"


def _ctx_values() -> set[str]:
    """What a stage may read off the RequestContext: its fields and its lazily computed properties."""
    return ({f.name for f in dataclasses.fields(RequestContext) if not f.name.startswith("_")}
            | {n for n, v in vars(RequestContext).items() if isinstance(v, property)})


@dataclass(frozen=True)
class Policy:
    """What the engine may do with a stage; the framework owns it, the stage never sees it.

    skippable: under deadline pressure the engine skips it when less time is left than its
      `budget_ms` (its Params extend BudgetParams; no other kind has a budget) and answers
      degraded. Any stage is skipped once the deadline has passed.
    inline (recall routes): "never" (always on the pool, where a late route is abandoned),
      "allowed" (on the pool unless its config says `inline = true`) or "default" (on the
      request thread unless its config says `inline = false`): for routes cheaper than a
      thread hand-off. An inline route's timeout is checked after it returns.
    guard: runs on every answer, even past the deadline (filters): what it removes (excluded,
      already seen, blocked items) must never be served, and a degraded answer is no excuse.
    """

    skippable: bool = False
    inline: Literal["never", "allowed", "default"] = "never"
    guard: bool = False


@dataclass(frozen=True)
class KindSpec:
    kind: str
    params: type
    factory: Callable[..., Any]        # (params, env) -> stage callable
    is_recall: bool
    policy: Policy
    reads: tuple[Column, ...]          # must exist before it runs (written by an earlier, unskippable stage)
    reads_if_present: tuple[Column, ...]   # used when an earlier stage wrote them, never required
    writes: tuple[Column, ...]         # every one exists after it ran

    def settle(self, params) -> None:
        """Resolve and check the policy-owned fields of a stage's Params (`inline` of a route)."""
        if isinstance(params, RouteParams):
            if params.inline is None:
                params.inline = self.policy.inline == "default"
            elif params.inline and self.policy.inline == "never":
                raise ConfigError(f"inline: kind '{self.kind}' never runs inline (a late one must be abandonable)")


_KINDS: dict[str, KindSpec] = {}
_loaded = False


def register(kind: str, params: type, *, recall: bool = False, policy: Policy = Policy(),
             reads: tuple[str, ...] = (), reads_if_present: tuple[str, ...] = (),
             writes: tuple[str, ...] = ()):
    """Class decorator: `factory(params, env)` builds the stage. Recall routes write `score:recall`
    (their Params extend RouteParams); a skippable kind's Params extend BudgetParams. Raises
    ValueError at import for a declaration the engine could not honour."""
    def deco(factory):
        if kind in _KINDS:
            raise ValueError(f"stage kind '{kind}' is already registered")
        if recall != issubclass(params, RouteParams):
            raise ValueError(f"stage kind '{kind}': recall routes, and only they, have Params extending RouteParams")
        if policy.skippable != issubclass(params, BudgetParams):
            raise ValueError(f"stage kind '{kind}': skippable kinds, and only they, have Params extending "
                             "BudgetParams (the engine reads budget_ms to decide skipping)")
        if recall and policy.skippable:
            raise ValueError(f"stage kind '{kind}': a recall route is bounded by its timeout_ms, not skipped")
        if not recall and policy.inline != "never":
            raise ValueError(f"stage kind '{kind}': only recall routes choose where they run")
        out = ("score:recall",) if recall else writes
        if recall and (writes or any(not c.startswith("ctx:") for c in (*reads, *reads_if_present))):
            raise ValueError(f"stage kind '{kind}': a recall route reads ctx values only and writes score:recall")
        _KINDS[kind] = KindSpec(kind, params, factory, recall, policy, tuple(map(Column.parse, reads)),
                                tuple(map(Column.parse, reads_if_present)), tuple(map(Column.parse, out)))
        return factory
    return deco


def unregister(kind: str) -> None:
    """Remove a kind registered at run time (a test's own kinds), so it leaks into nothing else."""
    _KINDS.pop(kind, None)


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


MAX_ROUTES = 8      # Candidates.routes is a uint8 bitmask, one bit per route


def check_pipeline(cfg) -> None:
    """The stage contract of one config variant, refused with one line naming the culprit:
    the route limit, every column a stage reads along the pipeline, impossible sizes.
    `recserve check-config` and the server run the same check (config load)."""
    recall, stages = cfg.pipeline.recall, cfg.pipeline.stages
    if len(recall) > MAX_ROUTES:
        raise ConfigError(f"pipeline.recall: at most {MAX_ROUTES} routes (uint8 route bitmask), got {len(recall)}")
    size = sum(cfg.stage[name][1].k for name in recall)
    have = {Column("score", "recall")}
    only_skippable: dict[Column, str] = {}     # column -> the skippable stage that writes it
    for name in stages:
        kind, p = cfg.stage[name]
        spec = _KINDS[kind]
        for col in spec.reads:
            if col.space == "ctx" or col in have:
                continue
            if col in only_skippable:
                raise ConfigError(f"pipeline.stages: '{name}' reads {col}, which only the skippable stage "
                                  f"'{only_skippable[col]}' writes")
            raise ConfigError(f"pipeline.stages: '{name}' reads {col}, which no earlier stage writes")
        if spec.policy.skippable:
            only_skippable.update({col: name for col in spec.writes if col not in have})
        else:
            have.update(spec.writes)
        if isinstance(p, CutParams) and p.keep:
            if p.keep > size:
                raise ConfigError(f"stage.{name}.keep: {p.keep} exceeds the {size} candidates it can receive")
            size = p.keep
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
    item_index: IdIndex | None = None   # external item id -> catalog index, built once per bundle

    def read_sidecar(self, param: str, rel: str) -> dict[str, Any]:
        """A stage's TOML side file (whitelist, blocklist), relative to the config; errors name the key."""
        return _read_toml(Path(self.config.path).parent / rel, f"stage.{self.name}.{param}")


def sidecar() -> Any:
    """A Params field naming a TOML side file relative to the config ("" = none). The config
    load parses it, so `recserve check-config` refuses a missing or broken file as the server does."""
    return dataclasses.field(default="", metadata={"sidecar": True})


def check_sidecars(name: str, params, config_path: str) -> None:
    for f in dataclasses.fields(params):
        rel = getattr(params, f.name)
        if f.metadata.get("sidecar") and rel:
            _read_toml(Path(config_path).parent / rel, f"stage.{name}.{f.name}")


def _read_toml(path: Path, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{where}: {path}: {e}") from None


@dataclass
class RouteParams:
    """Fields every recall route has; a route's Params extends it. `inline` unset: the kind's
    policy decides (Policy.inline); the config may override it where the policy allows."""

    k: int = 100
    timeout_ms: float = 20.0
    inline: bool | None = None

    def check(self) -> None:
        if self.k <= 0:
            raise ConfigError("k: must be > 0")
        if self.timeout_ms <= 0:
            raise ConfigError("timeout_ms: must be > 0")


@dataclass
class CutParams:
    """A ranking stage that truncates: how many candidates it keeps."""

    keep: int = 1000

    def check(self) -> None:
        if self.keep <= 0:
            raise ConfigError("keep: must be > 0")


@dataclass
class BudgetParams:
    """A skippable stage's expected cost: with less time left the engine skips it."""

    budget_ms: float = 10.0

    def check(self) -> None:
        if self.budget_ms <= 0:
            raise ConfigError("budget_ms: must be > 0")
