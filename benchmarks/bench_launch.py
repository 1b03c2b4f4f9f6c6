"""Launch to first step of flux_train_network.py at full size (TARGETS.md: ≤ 20 s, files in the page cache).

    python benchmarks/bench_launch.py --models /tmp/full --runs 2 --log launch_log.txt

Writes a full-size FLUX.1-dev set with random weights in the real file layouts once (DiT bf16
23.8 GB, T5-XXL fp16 9.5 GB, CLIP-L fp16, AE fp32; built on the GPU, so a minute or two), a
one-image 1024x1024 dataset, then runs the trainer with the TARGETS.md command line (rank 16,
AdamW, bf16, gradient checkpointing, SDPA, cached latents and text outputs, 3 steps) `--runs`
times. The first run also reads the files into the page cache; the later ones are the figure.
Every output line of each run is logged with its time after launch (where the time goes), and one
JSON line is printed: the trainer's own "first step done N s after launch" and the wall time.
The tokenizers are the tiny offline ones (their ids fit the full vocabularies); that changes no
time that matters. Compiled Python modules are cached as a normal install does (trainer_env), so
the first run also compiles them; the later runs are the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library import text_encoders as te  # noqa: E402
from library.autoencoders import AutoEncoder, AutoEncoderConfig  # noqa: E402
from library.flux.model import VARIANTS  # noqa: E402
from library.safetensors_io import save_file_atomic  # noqa: E402
from library.tiny import tokenizers as tiny_tok  # noqa: E402
from library.tiny.flux import build_flux_model, init_random_  # noqa: E402

FIRST_STEP = re.compile(r"first step done ([0-9.]+) s after launch")


def _save(model: torch.nn.Module, path: Path, dtype: torch.dtype, drop=(), extra=None) -> None:
    state = {k: v.to(dtype).cpu() for k, v in model.state_dict().items()
             if k not in drop and not k.endswith("position_ids")}
    save_file_atomic(state | (extra or {}), path)


def _random_on_gpu(factory, dtype: torch.dtype) -> torch.nn.Module:
    with torch.device("meta"):
        model = factory()
    return init_random_(model.to(dtype).to_empty(device="cuda"))


def write_full_size_set(out: Path) -> dict[str, Path]:
    from transformers import CLIPTextModel, T5EncoderModel

    out.mkdir(parents=True, exist_ok=True)
    paths = {"dit": out / "flux1-dev.safetensors", "t5xxl": out / "t5xxl_fp16.safetensors",
             "clip_l": out / "clip_l.safetensors", "ae": out / "ae.safetensors", "tokenizers": out / "tokenizers"}
    if not paths["dit"].exists():
        dit = build_flux_model(VARIANTS["dev"].params, device="cuda", dtype=torch.bfloat16)
        _save(dit, paths["dit"], torch.bfloat16)
        del dit
    if not paths["t5xxl"].exists():
        t5 = _random_on_gpu(lambda: T5EncoderModel(te.t5xxl_config()), torch.float16)
        _save(t5, paths["t5xxl"], torch.float16, drop={"encoder.embed_tokens.weight"})   # tied to shared.weight
        del t5
    if not paths["clip_l"].exists():
        clip = _random_on_gpu(lambda: te.wrap_clip_text_model(CLIPTextModel(te.clip_l_config())), torch.float16)
        width = te.clip_l_config().hidden_size
        # published clip_l files carry the (unused) projection of CLIPTextModelWithProjection
        _save(clip, paths["clip_l"], torch.float16,
              extra={"text_projection.weight": torch.randn(width, width, dtype=torch.float16) / width ** 0.5})
        del clip
    if not paths["ae"].exists():
        _save(_random_on_gpu(lambda: AutoEncoder(AutoEncoderConfig()), torch.float32), paths["ae"], torch.float32)
    if not paths["tokenizers"].exists():
        tiny_tok.write_tokenizer_cache(paths["tokenizers"])
    torch.cuda.empty_cache()
    return paths


def write_tiny_set(out: Path) -> dict[str, Path]:
    """--tiny: the same run on tiny models (a CPU check of this script)."""
    from library.tiny.flux import write_tiny_flux_set

    tiny = write_tiny_flux_set(out)
    return {"dit": tiny.dit, "t5xxl": tiny.t5xxl, "clip_l": tiny.clip_l, "ae": tiny.ae,
            "tokenizers": tiny.tokenizer_cache_dir}


def trainer_command(paths: dict[str, Path], data: Path, run_dir: Path, resolution: int) -> list[str]:
    toml = run_dir / "dataset.toml"
    toml.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = {resolution}\n'
                    f'batch_size = 1\n'
                    f'[[datasets.subsets]]\nimage_dir = "{data}"\n')
    return [sys.executable, "flux_train_network.py", "--pretrained_model_name_or_path", str(paths["dit"]),
            "--clip_l", str(paths["clip_l"]), "--t5xxl", str(paths["t5xxl"]), "--ae", str(paths["ae"]),
            "--tokenizer_cache_dir", str(paths["tokenizers"]), "--dataset_config", str(toml),
            "--output_dir", str(run_dir / "out"), "--output_name", "launch", "--network_module", "networks.lora_flux",
            "--network_dim", "16", "--network_alpha", "16", "--network_train_unet_only", "--optimizer_type", "AdamW",
            "--learning_rate", "1e-4", "--mixed_precision", "bf16", "--gradient_checkpointing", "--sdpa",
            "--cache_latents", "--cache_text_encoder_outputs", "--timestep_sampling", "shift",
            "--discrete_flow_shift", "3.1582", "--model_prediction_type", "raw", "--guidance_scale", "1.0",
            "--max_train_steps", "3", "--seed", "1"]


def trainer_env(bytecode_cache: Path) -> dict[str, str]:
    """The trainer's environment. Python caches compiled modules (.pyc) as a normal install
    does, even where this environment turned that off (PYTHONDONTWRITEBYTECODE, or a read-only
    site-packages): into `bytecode_cache`. Without it every launch compiles torch's and
    transformers' sources again (6-10 s on the GPU machine)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return env | {"PYTHONUNBUFFERED": "1", "PYTHONPYCACHEPREFIX": str(bytecode_cache)}


def timed_run(cmd: list[str], log, env: dict[str, str]) -> dict:
    """Run `cmd`, logging each output line with its seconds after launch."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            cwd=Path(__file__).resolve().parents[1], env=env)
    first_step = None
    for line in proc.stdout:
        for part in line.rstrip("\n").split("\r"):   # tqdm redraws with carriage returns
            if part.strip():
                log.write(f"{time.perf_counter() - start:7.2f}  {part}\n")
            m = FIRST_STEP.search(part)
            if m:
                first_step = float(m.group(1))
    rc = proc.wait()
    return {"rc": rc, "first_step_after_launch_s": first_step, "wall_s": round(time.perf_counter() - start, 1)}


def warm_page_cache(files: list[Path]) -> None:
    for path in files:
        with open(path, "rb") as f:
            while f.read(256 * 2**20):
                pass


def write_top_functions(stats: Path, out: Path, rows: int = 60) -> None:
    import io
    import pstats

    text = io.StringIO()
    pstats.Stats(str(stats), stream=text).sort_stats("cumulative").print_stats(rows)
    out.write_text(text.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, default=Path("/tmp/flux_full"))
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--log", type=Path, default=Path("launch_log.txt"))
    ap.add_argument("--tiny", action="store_true", help="tiny models at 64x64 (checks the script on a CPU)")
    ap.add_argument("--cprofile", type=Path, default=None,
                    help="one more run under cProfile: its top functions by cumulative time go to this file")
    a = ap.parse_args()
    t0 = time.perf_counter()
    paths = write_tiny_set(a.models) if a.tiny else write_full_size_set(a.models)
    resolution = 64 if a.tiny else 1024
    write_s = time.perf_counter() - t0
    data = a.models / "images"
    if not data.exists():
        from PIL import Image
        data.mkdir(parents=True)
        noise = torch.rand(resolution, resolution, 3).mul(255).to(torch.uint8).numpy()
        Image.fromarray(noise).save(data / "image.png")
        (data / "image.txt").write_text("a photograph of a cat sitting on a wooden table next to a window")
    results = []
    env = trainer_env(a.models / "pycache")
    with open(a.log, "w") as log:
        for i in range(a.runs):
            warm_page_cache([paths[k] for k in ("dit", "t5xxl", "clip_l", "ae")])   # TARGETS.md: files cached
            log.write(f"==== run {i + 1}\n")
            run_dir = a.models / f"run{i}"
            run_dir.mkdir(exist_ok=True)
            results.append(timed_run(trainer_command(paths, data, run_dir, resolution), log, env))
        if a.cprofile:
            log.write("==== run under cProfile\n")
            run_dir = a.models / "run_cprofile"
            run_dir.mkdir(exist_ok=True)
            cmd = trainer_command(paths, data, run_dir, resolution)
            stats = run_dir / "trainer.pstats"
            results.append(timed_run([cmd[0], "-m", "cProfile", "-o", str(stats), *cmd[1:]], log, env)
                           | {"cprofile": True})
            write_top_functions(stats, a.cprofile)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"bench": "launch_to_first_step", "model": "tiny" if a.tiny else "flux1-dev", "device": device,
                      "torch": torch.__version__, "write_models_s": round(write_s, 1), "runs": results}))


if __name__ == "__main__":
    main()
