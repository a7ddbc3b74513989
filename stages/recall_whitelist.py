"""Whitelist recall: operator-pinned items, optionally per user segment, guaranteed to a stage.

The file (TOML, path relative to the config) holds `[[item]]` entries:
    id = "i42"; guaranteed_until = "coarse" | "fine" | "final"; segment = "region=3" (optional)
A segment is `profile_field=value`; an entry without one applies to every user.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.core.candidates import Candidates, Guarantee
from engine.core.errors import ConfigError
from engine.core.registry import Policy, RouteParams, StageEnv, register, sidecar

_LEVELS = {"coarse": Guarantee.COARSE, "fine": Guarantee.FINE, "final": Guarantee.FINAL}


@dataclass
class Params(RouteParams):
    k: int = 200
    file: str = sidecar()

    def check(self) -> None:
        super().check()
        if not self.file:
            raise ConfigError("file: name the whitelist TOML file")


# inline: a mask over a few pinned items
@register("recall_whitelist", Params, recall=True, policy=Policy(inline="default"), reads=("ctx:user",))
class RecallWhitelist:
    def __init__(self, p: Params, env: StageEnv):
        self.bit = env.route_bit
        entries = env.read_sidecar("file", p.file).get("item", [])
        index = env.item_index
        fields = list(env.bundle.manifest["schema"]["profile_fields"])
        items, levels, seg_field, seg_value = [], [], [], []
        for n, e in enumerate(entries[: p.k]):
            where = f"stage.{env.name}.file: {p.file}: item[{n}]"
            if e.get("id") not in index:
                raise ConfigError(f"{where}: id {e.get('id')!r} is not in the bundle's catalog")
            if e.get("guaranteed_until", "coarse") not in _LEVELS:
                raise ConfigError(f"{where}: guaranteed_until must be coarse, fine or final")
            f, v = -1, -1
            if "segment" in e:
                name, _, val = str(e["segment"]).partition("=")
                if name not in fields or not val.isdigit():
                    raise ConfigError(f"{where}: segment must be <profile field>=<int>, fields: {fields}")
                f, v = fields.index(name), int(val)
            items.append(index[e["id"]])
            levels.append(_LEVELS[e.get("guaranteed_until", "coarse")])
            seg_field.append(f)
            seg_value.append(v)
        self.items = np.asarray(items, np.int32)
        self.levels = np.asarray(levels, np.int8)
        self.seg_field = np.asarray(seg_field, np.int32)
        self.seg_value = np.asarray(seg_value, np.int32)

    def __call__(self, ctx) -> Candidates:
        if self.items.size == 0:
            return Candidates.empty()
        profile = ctx.user.profile[0]
        match = (self.seg_field < 0) | (profile[np.maximum(self.seg_field, 0)] == self.seg_value)
        return Candidates.from_route(self.items[match], np.ones(int(match.sum()), np.float32),
                                     self.bit, self.levels[match])
