"""The tuner's state file: everything a restarted `recserve tune` needs to go on where it stopped.

Written whole (temp file, fsync, rename) after every change: the search distribution, control's
weights (and the ones before the last promotion, for a rollback), the arm pinned for the next
round (a candidate being confirmed, or the previous control guarding a promotion), the round in
flight (its arms, salt, start and the joined offset its rows come after, so a restart re-reads
the round's rows instead of sampling new arms), the tuner's starting offset and the history of
finished rounds.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

VERSION = 2


@dataclass
class Round:
    """A round in flight: installed as arms, its rows being collected."""
    number: int
    names: list[str]
    x: list[list[float]]              # the searched weights of each arm
    salt: str
    start: float                      # unix time from which control's lists count
    offset: dict[str, Any]            # joined offset the round's rows come after
    pinned: str = ""                  # arm 0's role when it is not a search sample: "confirm" or "guard"


@dataclass
class TuneState:
    search: dict[str, Any]                        # cem.Search.to_json()
    names: list[str]                              # the searched weights, in vector order
    control: dict[str, float] | None = None       # promoted weights (None: the server config's own)
    previous: dict[str, float] | None = None      # control before the last promotion
    pin: dict[str, Any] | None = None             # the arm pinned next round: role, weights, per-round evidence
    round: int = 0                                # next round number
    current: Round | None = None
    offset: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    origin: dict[str, Any] | None = None          # joined offset the tuner started at (users' history from there)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump({"version": VERSION, **asdict(self)}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "TuneState | None":
        if not path.exists():
            return None
        d = json.loads(path.read_text())
        if d.pop("version", None) != VERSION:
            raise ValueError(f"{path}: not a version-{VERSION} tuner state file")
        cur = d.pop("current", None)
        return cls(**d, current=Round(**cur) if cur else None)
