"""Two training processes (what `accelerate launch --multi_gpu` starts, here on the CPU with gloo):
each trains on its own half of every epoch, the LoRA gradients are averaged between them, and
only the main process writes the log and the LoRA."""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys

import pytest
from safetensors import safe_open

from tests.test_flux_train_e2e import ROOT, losses, model_args, setup  # noqa: F401  (module fixture reused)

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_share_each_epoch(setup, tmp_path):  # noqa: F811
    base, paths, ds, _ = setup
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "flux_train_network.py"), *model_args(paths), "--dataset_config", str(ds),
           "--output_dir", str(out), "--output_name", "tiny", "--network_module", "networks.lora_flux",
           "--network_dim", "4", "--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs",
           "--t5xxl_max_token_length", "16", "--max_train_epochs", "1", "--seed", "3",
           "--max_data_loader_n_workers", "0"]
    env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}   # accelerate: several CPU processes
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    batches = int(re.search(r"batches per epoch: (\d+)", r.stdout).group(1))
    steps = losses(out)
    assert sorted(steps) == list(range(1, math.ceil(batches / 2) + 1))   # half the epoch each, logged once
    assert r.stdout.count("saved the LoRA:") == 1 and r.stdout.count("Totals:") == 1
    with safe_open(str(out / "tiny.safetensors"), "pt") as f:
        meta = f.metadata()
        assert any(k.endswith("lora_up.weight") and f.get_tensor(k).abs().sum() > 0 for k in f.keys())
    assert meta["ss_num_batches_per_epoch"] == str(math.ceil(batches / 2))
