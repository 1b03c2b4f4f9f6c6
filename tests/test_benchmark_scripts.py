"""The benchmark scripts still run (tiny models, CPU): the figures in docs/benchmarks.md come
from them, so a change that breaks one must show here, not on the next GPU session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_json(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def test_flux_step_benchmark_with_profile(tmp_path):
    tables = tmp_path / "tables.txt"
    line = run_json("benchmarks/bench_flux_train.py", "--tiny", "--device", "cpu", "--steps", "2", "--size", "64",
                    "--t5_len", "16", "--profile", "--profile_tables", str(tables))
    assert line["median_s"] > 0 and line["oom"] is False and len(line["first_steps_s"]) == 2
    assert line["profiled_wall_s"] > 0 and line["kernels_per_step"] == 0     # no GPU kernels on a CPU
    assert "aten::" in tables.read_text()


@pytest.mark.parametrize("family, model", [("sd3", "tiny-sd3.5-large"), ("lumina", "tiny-lumina2"),
                                           ("anima", "tiny-anima")])
def test_family_step_benchmark_with_fp8(family, model):
    line = run_json(f"benchmarks/bench_{family}_train.py", "--tiny", "--device", "cpu", "--steps", "2",
                    "--size", "256", "--fp8_base")
    assert line["model"] == model and line["median_s"] > 0 and line["blocks_to_swap"] == 0
    assert line["fp8"].startswith("fp8 base: ") and line["cuda_graph"] is False


def test_launch_benchmark_reads_the_trainers_first_step_time(tmp_path):
    log = tmp_path / "log.txt"
    line = run_json("benchmarks/bench_launch.py", "--tiny", "--models", str(tmp_path / "models"), "--runs", "1",
                    "--log", str(log))
    (run,) = line["runs"]
    assert run["rc"] == 0 and 0 < run["first_step_after_launch_s"] <= run["wall_s"]
    text = log.read_text()
    assert "models loaded in" in text and "caching done in" in text and "first step done" in text


@pytest.mark.parametrize("family, model", [("sd3", "tiny-sd3.5-large"), ("lumina", "tiny-lumina2"),
                                           ("anima", "tiny-anima")])
def test_launch_benchmark_of_each_family(tmp_path, family, model):
    log = tmp_path / "log.txt"
    line = run_json("benchmarks/bench_launch.py", "--tiny", "--family", family, "--models", str(tmp_path / "models"),
                    "--runs", "1", "--log", str(log))
    (run,) = line["runs"]
    assert line["model"] == model and run["rc"] == 0 and 0 < run["first_step_after_launch_s"] <= run["wall_s"]
    assert "first step done" in log.read_text()
