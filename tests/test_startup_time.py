"""library/training/startup_time.py: the launch-to-first-step figure the trainer prints."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from library.training import startup_time


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_seconds_since_launch_counts_from_the_process_start():
    # A child that sleeps 1.5 s before asking must see at least that much (and not hours).
    code = ("import time; time.sleep(1.5); from library.training.startup_time import seconds_since_launch; "
            "print(seconds_since_launch())")
    started = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    measured = float(out.stdout.strip())
    assert 1.5 <= measured <= time.time() - started + 1.0   # clock ticks are 10 ms; a little slack


def test_report_prints_the_figure(capsys):
    elapsed = startup_time.report_startup_time(torch.device("cpu"))
    if elapsed is not None:
        assert f"first step done {elapsed:.1f} s after launch" in capsys.readouterr().out
