"""Typed TOML configuration, checked whole before any work starts.

Every section is a dataclass (engine.core.sections); `load_config` refuses an unknown key, a wrong type or an
impossible value with one line naming the key (`ConfigError`). Stage sections are checked
against the Params dataclass their kind registers (engine.core.registry), and every experiment's
overrides are applied and re-checked at load, so a bad variant never reaches a request.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import tomllib
import types
import typing
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from engine.core import registry  # stage kinds register their Params here
from engine.core.errors import ConfigError
from engine.core.sections import (DataConfig, I2IConfig, ImplicitConfig, IndexConfig, JoinConfig, LogConfig, RayConfig,
                                  ServingConfig, SimulateConfig, StreamConfig, TrainConfig)


@dataclass
class PipelineConfig:
    recall: list[str] = field(default_factory=list)   # stage names run concurrently, then merged
    stages: list[str] = field(default_factory=list)   # stage names run in order on the merged batch


@dataclass
class Experiment:
    share: float = 0.0                                # traffic share by stable user hash
    set: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, e.g. "stage.rerank.beam_width"
    cap: bool = False     # exploratory: never more than `share` of a worker's lists (over it, control serves)


@dataclass
class Config:
    path: str
    data: DataConfig
    train: TrainConfig
    index: IndexConfig
    serving: ServingConfig
    pipeline: PipelineConfig
    stage: dict[str, Any]                    # name -> (kind, Params) checked by the registry
    experiments: dict[str, Experiment]
    raw: dict[str, Any]                      # the parsed TOML, for hashing and overrides
    ray: RayConfig = field(default_factory=RayConfig)
    log: LogConfig = field(default_factory=LogConfig)
    join: JoinConfig = field(default_factory=JoinConfig)
    i2i: I2IConfig = field(default_factory=I2IConfig)
    implicit: ImplicitConfig = field(default_factory=ImplicitConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    arms_salt: str = ""                      # prefixed to user ids when hashing to experiments (run-time arms)

    # What a bundle is built from: its data, models and index, plus the serving keys that
    # shape the shipped feature state. Equal fingerprints mean the bundle can be reused.
    BUILD_KEYS = ("data", "train", "index", "i2i", "implicit", "serving.seen_window",
                  "serving.hot_half_life_hours")

    def fingerprint(self) -> str:
        """sha256 of the build keys' values (defaults included), so editing any of them rebuilds."""
        values = []
        for key in self.BUILD_KEYS:
            section, _, field_name = key.partition(".")
            obj = getattr(self, section)
            values.append((key, getattr(obj, field_name) if field_name else dataclasses.asdict(obj)))
        if self.data.source == "files":    # the data is the files' content, not their folder's name
            values.append(("data.files", _files_digest(Path(self.data.files_dir))))
        return hashlib.sha256(repr(values).encode()).hexdigest()[:16]

    def experiment_for(self, user_id: str) -> str:
        """The experiment a user is in ("" = control): crc32 of the id over the shares in config
        order, so every worker, replica and restart puts the same user in the same arm. Arms
        set at run time may carry a salt, so a new set of arms draws new users."""
        u = arm_point(self.arms_salt, user_id)
        acc = 0.0
        for name, e in self.experiments.items():
            acc += e.share
            if u < acc:
                return name
        return ""

    def variant(self, experiment: str) -> "Config":
        """This config with the experiment's overrides applied (already checked at load)."""
        return self._variants[experiment] if experiment else self

    _variants: dict[str, "Config"] = dataclasses.field(default_factory=dict)


def arm_point(salt: str, user_id: str) -> float:
    """A user's fixed point in [0, 1) under `salt`; arms take consecutive share ranges of it."""
    return zlib.crc32((salt + user_id).encode()) / 2**32


def _files_digest(folder: Path) -> str:
    """sha256 over the data files of a files source (model_export.files reads these names)."""
    h = hashlib.sha256()
    for name in ("interactions", "items", "users"):
        for ext in (".parquet", ".csv"):
            p = folder / f"{name}{ext}"
            if p.is_file():
                h.update(p.name.encode())
                with open(p, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
    return h.hexdigest()


_SECTIONS = {"data": DataConfig, "train": TrainConfig, "index": IndexConfig, "i2i": I2IConfig,
             "implicit": ImplicitConfig, "serving": ServingConfig, "pipeline": PipelineConfig, "ray": RayConfig,
             "log": LogConfig, "join": JoinConfig,
             "stream": StreamConfig, "simulate": SimulateConfig}


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The config at `path`, with `KEY=TOML value` overrides (`serving.tree_runtime="native"`,
    `ray.split_fine=true`) applied on top: an A/B or a deployment variant without a second file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    if overrides:
        sets = {}
        for o in overrides:
            key, eq, value = o.partition("=")
            try:
                sets[key.strip()] = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                raise ConfigError(f"--set {o!r}: expected KEY=TOML value, e.g. ray.split_fine=true "
                                  "or serving.tree_runtime='\"native\"'") from None
            if not eq or not key.strip():
                raise ConfigError(f"--set {o!r}: expected KEY=TOML value")
        raw = apply_overrides(raw, sets, "--set") | ({"experiments": raw["experiments"]} if "experiments" in raw else {})
    try:
        return parse_config(raw, str(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse_config(raw: dict[str, Any], path: str = "<config>") -> Config:
    allowed = set(_SECTIONS) | {"stage", "experiments"}
    for k in raw:
        if k not in allowed:
            raise ConfigError(f"{k}: unknown section (allowed: {', '.join(sorted(allowed))})")
    secs = {k: _build(cls, raw.get(k, {}), k) for k, cls in _SECTIONS.items()}
    for k, sec in secs.items():
        if hasattr(sec, "check"):
            try:
                sec.check()
            except ConfigError as e:
                raise ConfigError(f"{k}.{e}") from None
    stages_raw = raw.get("stage", {})
    if not isinstance(stages_raw, dict):
        raise ConfigError("stage: must be a table of stage sections")
    pipe: PipelineConfig = secs["pipeline"]
    if not pipe.recall:
        raise ConfigError("pipeline.recall: name at least one recall route")
    stage_specs = {}
    for name in [*pipe.recall, *pipe.stages]:
        if name not in stages_raw:
            raise ConfigError(f"pipeline: stage '{name}' has no [stage.{name}] section")
    for name, body in stages_raw.items():
        if name not in pipe.recall and name not in pipe.stages:
            raise ConfigError(f"stage.{name}: not named in pipeline.recall or pipeline.stages")
        if not isinstance(body, dict) or "kind" not in body:
            raise ConfigError(f"stage.{name}.kind: missing")
        kind = body["kind"]
        spec = registry.kind(kind)
        if spec is None:
            raise ConfigError(f"stage.{name}.kind: unknown kind '{kind}' (known: {', '.join(registry.kinds())})")
        if (name in pipe.recall) != spec.is_recall:
            raise ConfigError(f"stage.{name}.kind: '{kind}' belongs in pipeline."
                              f"{'recall' if spec.is_recall else 'stages'}")
        params = _build(spec.params, {k: v for k, v in body.items() if k != "kind"}, f"stage.{name}")
        try:
            if hasattr(params, "check"):
                params.check()
            spec.settle(params)
        except ConfigError as e:
            raise ConfigError(f"stage.{name}.{e}") from None
        registry.check_sidecars(name, params, path)
        stage_specs[name] = (kind, params)
    exps_raw = raw.get("experiments", {})
    exps = {n: _build(Experiment, b, f"experiments.{n}") for n, b in exps_raw.items()}
    for n, e in exps.items():
        if not math.isfinite(e.share):
            raise ConfigError(f"experiments.{n}.share: must be a finite number, got {e.share}")
    total = sum(e.share for e in exps.values())
    if any(e.share < 0 for e in exps.values()) or total > 1 + 1e-9:
        raise ConfigError(f"experiments: shares must be >= 0 and sum to <= 1 (sum {total:g})")
    cfg = Config(path, secs["data"], secs["train"], secs["index"], secs["serving"], pipe,
                 stage_specs, exps, raw, secs["ray"], secs["log"], secs["join"], secs["i2i"], secs["implicit"],
                 secs["stream"], secs["simulate"])
    registry.check_pipeline(cfg)
    for name, exp in exps.items():
        where = f"experiments.{name}.set"
        try:  # overrides drop the experiments table, so this does not recurse further
            cfg._variants[name] = parse_config(apply_overrides(raw, exp.set, where), path)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    return cfg


def apply_overrides(raw: dict, sets: dict[str, Any], where: str) -> dict:
    """A copy of a raw config with dotted keys set (`"stage.rerank.beam_width": 1`), without its
    experiments table: what an experiment variant, a benchmark `--set` or an eval arm starts from."""
    out = copy.deepcopy(raw)
    out.pop("experiments", None)
    for dotted, value in sets.items():
        node = out
        keys = dotted.split(".")
        for k in keys[:-1]:
            if not isinstance(node.get(k, {}), dict):
                raise ConfigError(f"{where}.{dotted}: '{k}' is not a table")
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return out


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a table")
    names = {f.name: f for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    for k in data:
        if k not in names:
            raise ConfigError(f"{where}.{k}: unknown key (allowed: {', '.join(sorted(names))})")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp, v, where):
    origin = typing.get_origin(tp)
    if tp is Any:
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(v).__name__} {v!r}")
        return float(v)
    if tp in (int, str, bool):
        if type(v) is not tp:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {type(v).__name__} {v!r}")
        return v
    if origin is list:
        if not isinstance(v, list):
            raise ConfigError(f"{where}: expected a list, got {type(v).__name__}")
        (et,) = typing.get_args(tp)
        return [_coerce(et, x, f"{where}[{i}]") for i, x in enumerate(v)]
    if origin is dict:
        if not isinstance(v, dict):
            raise ConfigError(f"{where}: expected a table, got {type(v).__name__}")
        _, vt = typing.get_args(tp)
        return {k: _coerce(vt, x, f"{where}.{k}") for k, x in v.items()}
    if origin in (typing.Union, types.UnionType):
        options = [t for t in typing.get_args(tp) if t is not type(None)]   # None: unset, never written in TOML
        if len(options) == 1:
            return _coerce(options[0], v, where)
        for t in options:
            try:
                return _coerce(t, v, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {tp}, got {v!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, where)
    raise ConfigError(f"{where}: unsupported type {tp}")
