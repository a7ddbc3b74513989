"""The two arms of a simulation, each its own set of real processes over its own bundle root.

frozen:    `recserve serve` on a copy of the base version; the sample log off (nothing learns).
streaming: `recserve serve` writing the sample log, `recserve join --follow` over it, and
           `recserve train --follow` publishing versions into the arm's root, which the server
           hot-swaps (it polls CURRENT).

Roots are hard-linked copies of the base version and its checkpoints (files are never rewritten
in place, so the arms share the base's inodes); both servers keep their feature state in memory.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.target import REPO, Server
from model_export.stream.publish import CHECKPOINTS


def link_tree(src: Path, dst: Path) -> None:
    """Copy a folder as hard links (plain copies across filesystems)."""
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=link)


def arm_root(base: Path, root: Path) -> Path:
    """A bundle root serving version folder `base`, with its checkpoints, under `root`."""
    root.mkdir(parents=True)
    link_tree(base, root / base.name)
    ckpt = base.parent / CHECKPOINTS / base.name
    if ckpt.is_dir():
        link_tree(ckpt, root / CHECKPOINTS / base.name)
    (root / "CURRENT").write_text(base.name + "\n")
    return root


@dataclass
class Arm:
    name: str
    root: Path
    server: Server
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    log_dir: Path | None = None
    joined: Path | None = None

    def check(self) -> None:
        """Raise if a process of the arm died."""
        if self.server.proc.poll() is not None:
            raise RuntimeError(f"{self.name}: the server exited ({self.server.proc.returncode})")
        for what, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{self.name}: recserve {what} exited ({p.returncode}); see {self.root.parent}/"
                                   f"{what}.log")

    def stop(self) -> None:
        """The trainer first (it may be publishing), then the joiner (it commits), then the server."""
        for what in ("train", "join"):
            p = self.procs.get(what)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(120)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.server.stop()


def start_arm(name: str, base: Path, out: Path, config: Path, sets: list[str], streaming: bool,
              window_s: float, commit_s: float) -> Arm:
    """Start one arm's processes under out/<name>/ (logs there too)."""
    home = out / name
    root = arm_root(base, home / "bundle")
    over = [a for s in sets for a in ("--set", s)]
    log_dir = home / "log" if streaming else None
    log_args = ("--set", f'log.dir="{log_dir}"') if streaming else ("--set", 'log.backend="off"')
    server = Server(config, root, workers=1, log=home / "server.log",
                    extra=("--state-dir", "none", *over, *log_args))
    arm = Arm(name, root, server, log_dir=log_dir, joined=home / "joined" if streaming else None)
    if streaming:
        try:
            arm.procs["join"] = spawn(home / "join.log", "join", "--config", str(config), *over, "--log", str(log_dir),
                                       "--out", str(arm.joined), "--follow", "--set", f"join.window_s={window_s}",
                                       "--set", f"join.commit_s={commit_s}")
            arm.joined.mkdir(parents=True, exist_ok=True)
            arm.procs["train"] = spawn(home / "train.log", "train", "--bundle", str(root), "--joined", str(arm.joined),
                                        "--config", str(config), *over, "--follow")
        except BaseException:
            arm.stop()
            raise
    return arm


def spawn(log: Path, *args: str, append: bool = False) -> subprocess.Popen:
    """`recserve <args>` as a child process of this repo's interpreter, its output into `log`."""
    with open(log, "a" if append else "w") as f:
        return subprocess.Popen([sys.executable, "-m", "engine.cli.main", *args], cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT)
