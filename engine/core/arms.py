"""Experiment arms replaced at run time (Admin.SetArms): the record every worker and every server
sharing a feature store converges on, and how it becomes the Config the engine serves.

An `Arms` record is the whole state, never a delta: the arms in hash order (name, share,
overrides) and control's own overrides, with a version that only grows. It is applied to the
config as loaded (its file plus --set, without its [experiments]) and validated by the same
parse_config that checks a config's [experiments], so a value the config file would refuse is
refused here with the same message. Control may only override stage.* keys: a variant changes
the pipeline's stages and nothing else the engine set up at start (threads, deadlines, limits).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from engine.core.config import Config, ConfigError, apply_overrides, parse_config

NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


@dataclass(frozen=True)
class ArmSpec:
    name: str
    share: float
    set: dict[str, Any] = field(default_factory=dict)    # dotted key -> value, as in [experiments.X].set
    cap: bool = False                                    # a hard traffic bound (Experiment.cap)


@dataclass(frozen=True)
class Arms:
    version: int = 0                                     # 0: the config's own experiments
    arms: tuple[ArmSpec, ...] = ()
    control: dict[str, Any] = field(default_factory=dict)   # stage.* dotted key -> value
    salt: str = ""                                       # users hash to arms by crc32(salt + user id)

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "control": self.control, "salt": self.salt,
                           "arms": [{"name": a.name, "share": a.share, "set": a.set, "cap": a.cap} for a in self.arms]},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Arms":
        d = json.loads(text)
        return cls(int(d["version"]), tuple(ArmSpec(a["name"], float(a["share"]), dict(a["set"]), bool(a.get("cap", False)))
                                         for a in d["arms"]),
                   dict(d.get("control", {})), str(d.get("salt", "")))

    def with_version(self, version: int) -> "Arms":
        return Arms(version, self.arms, self.control, self.salt)


def from_config(cfg: Config) -> Arms:
    """The arms a config file declares (version 0)."""
    return Arms(0, tuple(ArmSpec(n, e.share, dict(e.set), e.cap) for n, e in cfg.experiments.items()), {})


def config_with_arms(base: Config, arms: Arms) -> Config:
    """`base` with control's overrides and these arms instead of its [experiments], checked as
    a config file is; ConfigError names the first fault (`arms.<name>...` or `control.<key>`)."""
    for key in arms.control:
        if not key.startswith("stage."):
            raise ConfigError(f"control.{key}: only stage.* keys change at run time; the rest needs a restart")
    seen: set[str] = set()
    for a in arms.arms:
        if not NAME.fullmatch(a.name):
            raise ConfigError(f"arms: name {a.name[:80]!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
        if a.name in seen:
            raise ConfigError(f"arms.{a.name}: named twice")
        seen.add(a.name)
    raw = apply_overrides(base.raw, arms.control, "control")
    raw["experiments"] = {a.name: {"share": a.share, "set": a.set, "cap": a.cap} for a in arms.arms}
    if len(arms.salt) > 64:
        raise ConfigError("salt: at most 64 characters")
    try:
        cfg = parse_config(raw, base.path)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError("arms" + msg[len("experiments"):] if msg.startswith("experiments") else msg) from None
    cfg.arms_salt = arms.salt
    return cfg


def toml_value(v: Any) -> str:
    """A value as TOML text (what Arm.set carries on the wire), the inverse of `parse_value`."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if math.isfinite(v) else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise ConfigError(f"cannot write {type(v).__name__} {v!r} as TOML")


def parse_value(key: str, text: str) -> Any:
    """TOML value text (`1.0`, `"sum"`, `{ click = 1.0 }`) -> value; ConfigError naming `key`."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{key}: {text[:80]!r} is not a TOML value ({e})") from None
