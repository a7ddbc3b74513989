"""Progress bars: a tqdm bar on a terminal, a few lines in a log file, never a line per step."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from model_export.progress import LogProgress, bar

REPO = Path(__file__).resolve().parents[1]


def test_a_loop_with_stderr_in_a_file_writes_one_summary_line(tmp_path):
    """1000 steps of ~1.5 ms with stderr redirected: one line with the totals, not one per step."""
    code = ("import time\nfrom model_export.progress import bar\n"
            "for _ in bar(range(1000), desc='steps', unit='step'):\n    time.sleep(0.0015)\n")
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        subprocess.run([sys.executable, "-c", code], cwd=REPO, stderr=err, check=True, timeout=120)
    text = log.read_text()
    lines = text.splitlines()
    assert "\r" not in text and 1 <= len(lines) <= 4, text
    assert lines[-1].startswith("steps: 1000 step in ") and "step/s" in lines[-1]


def test_quarter_lines_carry_the_postfix_and_the_summary_the_totals():
    out = io.StringIO()
    with bar(total=400, desc="trees", unit="tree", stream=out, every_s=0, quiet_s=0) as b:
        for k in range(400):
            b.set_postfix(loss=f"{1 / (k + 1):.3f}")
            b.update(1)
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines[:3]] == ["trees: 25%", "trees: 50%", "trees: 75%"]
    assert "100/400 tree" in lines[0] and lines[0].endswith("loss=0.010")
    assert len(lines) == 4 and lines[3].startswith("trees: 400 tree in ")


def test_a_quick_loop_and_a_disabled_one_stay_silent():
    out = io.StringIO()
    assert list(bar(range(5), desc="quick", stream=out)) == list(range(5))
    assert list(bar(range(5), desc="off", stream=out, disable=True, quiet_s=0)) == list(range(5))
    assert out.getvalue() == ""


def test_an_interrupted_loop_reports_how_far_it_got():
    out = io.StringIO()
    b = bar(range(10), desc="partial", stream=out, quiet_s=0)
    assert isinstance(b, LogProgress) and len(b) == 10
    for i in b:
        if i == 3:
            break
    b.close()
    assert out.getvalue().startswith("partial: 3/10 it in ")


def test_a_terminal_gets_a_tqdm_bar():
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w") as tty:
            b = bar(range(3), desc="tty", stream=tty)
            assert isinstance(b, tqdm)
            assert list(b) == [0, 1, 2]
    finally:
        os.close(master)
