"""Launch to first step of a family's LoRA trainer at full size (TARGETS.md: ≤ 20 s, files cached).

    python benchmarks/bench_launch.py --models /tmp/full --runs 2 --log launch_log.txt      # FLUX.1-dev
    python benchmarks/bench_launch.py --family sd3 --runs 2 --log launch_log.txt           # SD3.5 Large
    python benchmarks/bench_launch.py --family lumina --runs 2 --log launch_log.txt        # Lumina Image 2.0
    python benchmarks/bench_launch.py --family anima --runs 2 --log launch_log.txt         # Anima
    python benchmarks/bench_launch.py --tiny --family sd3 --models /tmp/tiny_sd3 --runs 1  # CPU check

Writes a full-size set of the family with random weights in the real file layouts once (built on
the GPU, so a minute or two; --models, default /tmp/<family>_full):
  flux    FLUX.1-dev DiT bf16 23.8 GB, T5-XXL fp16 9.5 GB, CLIP-L fp16, AE fp32
  sd3     SD3.5 Large sd3.5_large.safetensors (MMDiT + VAE, bf16, 16 GB), CLIP-L, CLIP-G and
          T5-XXL fp16 as separate files
  lumina  Lumina Image 2.0 DiT bf16 in Comfy-Org's layout (5.2 GB), Gemma2-2B fp16 with its
          tokenizer inside (as Comfy-Org's file), FLUX AE fp32
  anima   the 28-block DiT with its LLM adapter bf16 (`net.` keys, 4.2 GB), Qwen3-0.6B bf16,
          Qwen-Image VAE bf16 (ComfyUI / Wan layout)
then a one-image 1024x1024 dataset, and runs the trainer with the TARGETS.md command line (rank
16, unet only, AdamW lr 1e-4, bf16, gradient checkpointing, SDPA, cached latents and text
outputs, 3 steps, plus the family guide's recommended options) `--runs` times. The first run
also reads the files into the page cache; the later ones are the figure. Every output line of
each run is logged with its time after launch (where the time goes), and one JSON line is
printed: the trainer's own "first step done N s after launch" and the wall time.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library import text_encoders as te  # noqa: E402
from library.anima.loading import COMFY_PREFIX as ANIMA_PREFIX  # noqa: E402
from library.anima.model import ANIMA_PARAMS  # noqa: E402
from library.anima.vae import QwenImageVAEConfig, to_wan  # noqa: E402
from library.autoencoders import SD3_VAE_SCALING, AutoEncoder, AutoEncoderConfig  # noqa: E402
from library.flux.model import VARIANTS as FLUX_VARIANTS  # noqa: E402
from library.lumina.gemma2 import SPIECE_KEY, gemma2_config  # noqa: E402
from library.lumina.loading import COMFY_PREFIX as LUMINA_COMFY_PREFIX  # noqa: E402
from library.lumina.model import VARIANTS as LUMINA_VARIANTS  # noqa: E402
from library.lumina.text import RECOMMENDED_SYSTEM_PROMPTS  # noqa: E402
from library.safetensors_io import save_file_atomic  # noqa: E402
from library.sd3.model import VARIANTS as SD3_VARIANTS  # noqa: E402
from library.tiny import tokenizers as tiny_tok  # noqa: E402
from library.tiny.anima import build_anima_model  # noqa: E402
from library.tiny.flux import build_flux_model, init_random_  # noqa: E402
from library.tiny.lumina import build_lumina_model  # noqa: E402
from library.tiny.sd3 import DIT_PREFIX as SD3_DIT_PREFIX, VAE_PREFIX as SD3_VAE_PREFIX, build_mmdit  # noqa: E402
from library.tiny.sd3 import write_tokenizer_cache as write_sd3_tokenizer_cache  # noqa: E402

FIRST_STEP = re.compile(r"first step done ([0-9.]+) s after launch")


# ---------------------------------------------------------------------------------------------
# Full-size files: each component is built with random weights on `device` (the GPU) and saved
# in the keys, prefixes and dtypes of the published file.

def _file_state(model: torch.nn.Module, dtype: torch.dtype, prefix: str = "", drop=()) -> dict[str, torch.Tensor]:
    """The model's tensors as its file holds them: in `dtype`, on the CPU, behind `prefix`
    (position ids are buffers that the loaders rebuild)."""
    return {prefix + k: v.to(dtype).cpu() for k, v in model.state_dict().items()
            if k not in drop and not k.endswith("position_ids")}


def _save(model: torch.nn.Module, path: Path, dtype: torch.dtype, drop=(), extra=None, prefix: str = "") -> None:
    save_file_atomic(_file_state(model, dtype, prefix, drop) | (extra or {}), path)


def _random_model(factory, dtype: torch.dtype, device: str) -> torch.nn.Module:
    with torch.device("meta"):
        model = factory()
    return init_random_(model.to(dtype).to_empty(device=device))


def _write_flux_dit(path: Path, device: str) -> None:
    _save(build_flux_model(FLUX_VARIANTS["dev"].params, device=device, dtype=torch.bfloat16), path, torch.bfloat16)


def _write_t5xxl(path: Path, device: str) -> None:
    from transformers import T5EncoderModel

    t5 = _random_model(lambda: T5EncoderModel(te.t5xxl_config()), torch.float16, device)
    _save(t5, path, torch.float16, drop={"encoder.embed_tokens.weight"})   # tied to shared.weight


def _write_clip_l(path: Path, device: str) -> None:
    from transformers import CLIPTextModel

    clip = _random_model(lambda: te.wrap_clip_text_model(CLIPTextModel(te.clip_l_config())), torch.float16, device)
    width = te.clip_l_config().hidden_size
    # published clip_l files carry the projection of CLIPTextModelWithProjection (FLUX ignores it, SD3 uses it)
    _save(clip, path, torch.float16,
          extra={"text_projection.weight": torch.randn(width, width, dtype=torch.float16) / width ** 0.5})


def _write_flux_ae(path: Path, device: str) -> None:
    _save(_random_model(lambda: AutoEncoder(AutoEncoderConfig()), torch.float32, device), path, torch.float32)


def _write_clip_g(path: Path, device: str) -> None:
    from transformers import CLIPTextModelWithProjection

    _save(_random_model(lambda: CLIPTextModelWithProjection(te.clip_g_config()), torch.float16, device), path,
          torch.float16)


def _write_sd3_checkpoint(path: Path, device: str) -> None:
    """sd3.5_large.safetensors: the MMDiT and the VAE in one file, SAI's key prefixes, bf16."""
    mmdit = build_mmdit(SD3_VARIANTS["5-large"].params, device=device, dtype=torch.bfloat16)
    config = AutoEncoderConfig(scale_factor=SD3_VAE_SCALING.scale_factor, shift_factor=SD3_VAE_SCALING.shift_factor)
    vae = _random_model(lambda: AutoEncoder(config), torch.bfloat16, device)
    save_file_atomic(_file_state(mmdit, torch.bfloat16, SD3_DIT_PREFIX)
                     | _file_state(vae, torch.bfloat16, SD3_VAE_PREFIX), path)


def _write_lumina_dit(path: Path, device: str) -> None:
    """Comfy-Org's lumina_2_model_bf16.safetensors (keys behind model.diffusion_model.)."""
    dit = build_lumina_model(LUMINA_VARIANTS["lumina2"].params, device=device, dtype=torch.bfloat16)
    _save(dit, path, torch.bfloat16, prefix=LUMINA_COMFY_PREFIX)


def _write_gemma2(path: Path, device: str) -> None:
    """Comfy-Org's gemma_2_2b_fp16.safetensors: `model.` keys and the tokenizer inside as the
    uint8 tensor `spiece_model` (here the tiny one)."""
    from transformers import Gemma2Model

    gemma = _random_model(lambda: Gemma2Model(gemma2_config()), torch.float16, device)
    with torch.no_grad():   # Gemma's RMSNorm scales by (1 + weight): centre the random gains on 0
        for name, p in gemma.named_parameters():
            if name.endswith("norm.weight"):
                p.sub_(1.0)
    spiece = torch.frombuffer(bytearray(tiny_tok.build_gemma_spiece_model()), dtype=torch.uint8)
    _save(gemma, path, torch.float16, prefix="model.", extra={SPIECE_KEY: spiece})


def _write_anima_dit(path: Path, device: str) -> None:
    """The 28-block DiT with its LLM adapter inside, ComfyUI's `net.` keys, bf16 (as Anima ships it)."""
    _save(build_anima_model(ANIMA_PARAMS, device=device, dtype=torch.bfloat16), path, torch.bfloat16,
          prefix=ANIMA_PREFIX)


def _write_qwen3(path: Path, device: str) -> None:
    """ComfyUI's qwen_3_06b_base.safetensors: Qwen3Model with `model.` keys, bf16."""
    from transformers import Qwen3Config, Qwen3Model

    config = {k: v for k, v in te.bundled_config("qwen3_06b").items() if k not in ("architectures", "torch_dtype")}
    _save(_random_model(lambda: Qwen3Model(Qwen3Config(**config)), torch.bfloat16, device), path, torch.bfloat16,
          prefix="model.")


def _write_qwen_image_vae(path: Path, device: str) -> None:
    """qwen_image_vae.safetensors in the ComfyUI / Wan layout that Anima ships, bf16."""
    config = QwenImageVAEConfig()
    vae = _random_model(config.build, torch.bfloat16, device)
    save_file_atomic(to_wan(_file_state(vae, torch.bfloat16), config), path)


def _write_set(out: Path, device: str, files: dict[str, tuple[str, Callable[[Path, str], object]]]
               ) -> dict[str, Path]:
    """key -> out/name, each written by its writer unless an earlier run left it there (a
    full-size set takes minutes to write)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, (name, write) in files.items():
        paths[key] = out / name
        if not paths[key].exists():
            write(paths[key], device)
    torch.cuda.empty_cache()
    return paths


def write_full_size_set(out: Path, device: str = "cuda") -> dict[str, Path]:
    """FLUX.1-dev."""
    return _write_set(out, device, {
        "dit": ("flux1-dev.safetensors", _write_flux_dit), "t5xxl": ("t5xxl_fp16.safetensors", _write_t5xxl),
        "clip_l": ("clip_l.safetensors", _write_clip_l), "ae": ("ae.safetensors", _write_flux_ae),
        "tokenizers": ("tokenizers", lambda path, _: tiny_tok.write_tokenizer_cache(path))})


def write_full_size_sd3_set(out: Path, device: str = "cuda") -> dict[str, Path]:
    """SD3.5 Large, the text encoders in separate files (the sd-scripts guide's command line)."""
    return _write_set(out, device, {
        "checkpoint": ("sd3.5_large.safetensors", _write_sd3_checkpoint),
        "clip_l": ("clip_l.safetensors", _write_clip_l), "clip_g": ("clip_g.safetensors", _write_clip_g),
        "t5xxl": ("t5xxl_fp16.safetensors", _write_t5xxl),
        "tokenizers": ("tokenizers", lambda path, _: write_sd3_tokenizer_cache(path))})


def write_full_size_lumina_set(out: Path, device: str = "cuda") -> dict[str, Path]:
    """Lumina Image 2.0 (the tokenizer is inside the Gemma2 file)."""
    return _write_set(out, device, {
        "dit": ("lumina_2_model_bf16.safetensors", _write_lumina_dit),
        "gemma2": ("gemma_2_2b_fp16.safetensors", _write_gemma2), "ae": ("ae.safetensors", _write_flux_ae)})


def write_full_size_anima_set(out: Path, device: str = "cuda") -> dict[str, Path]:
    """Anima, 28 blocks (the LLM adapter inside the DiT file)."""
    return _write_set(out, device, {
        "dit": ("anima-preview.safetensors", _write_anima_dit), "qwen3": ("qwen_3_06b_base.safetensors", _write_qwen3),
        "vae": ("qwen_image_vae.safetensors", _write_qwen_image_vae),
        "tokenizers": ("tokenizers", lambda path, _: tiny_tok.write_anima_tokenizer_cache(path))})


# ---------------------------------------------------------------------------------------------
# --tiny: the same runs on library.tiny's sets in the same layouts (a CPU check of this script).

def write_tiny_set(out: Path) -> dict[str, Path]:
    """--tiny: the same run on tiny models (a CPU check of this script)."""
    from library.tiny.flux import write_tiny_flux_set

    tiny = write_tiny_flux_set(out)
    return {"dit": tiny.dit, "t5xxl": tiny.t5xxl, "clip_l": tiny.clip_l, "ae": tiny.ae,
            "tokenizers": tiny.tokenizer_cache_dir}


def write_tiny_sd3_set(out: Path) -> dict[str, Path]:
    from library.tiny.sd3 import write_tiny_sd3_set as write

    tiny = write(out, variant="5-large")
    return {"checkpoint": tiny.checkpoint, "clip_l": tiny.clip_l, "clip_g": tiny.clip_g, "t5xxl": tiny.t5xxl,
            "tokenizers": tiny.tokenizer_cache_dir}


def write_tiny_lumina_set(out: Path) -> dict[str, Path]:
    from library.tiny.lumina import write_tiny_lumina_set as write

    tiny = write(out, layout="comfy")
    return {"dit": tiny.dit, "gemma2": tiny.gemma2, "ae": tiny.ae}


def write_tiny_anima_set(out: Path) -> dict[str, Path]:
    from library.tiny.anima import write_tiny_anima_set as write

    tiny = write(out)
    return {"dit": tiny.dit, "qwen3": tiny.qwen3, "vae": tiny.vae, "tokenizers": tiny.tokenizer_cache_dir}


# ---------------------------------------------------------------------------------------------
# The families and their trainer command lines.

@dataclass(frozen=True)
class Family:
    model: str                                  # the JSON line's "model"
    tiny_model: str                             # ... with --tiny
    script: str
    network_module: str
    file_options: tuple[tuple[str, str], ...]   # (trainer option, key of the written paths)
    options: tuple[str, ...]                    # the family guide's recommended options
    write_full_size: Callable[..., dict[str, Path]]
    write_tiny: Callable[[Path], dict[str, Path]]


FAMILIES = {
    "flux": Family(
        model="flux1-dev", tiny_model="tiny", script="flux_train_network.py", network_module="networks.lora_flux",
        file_options=(("--pretrained_model_name_or_path", "dit"), ("--clip_l", "clip_l"), ("--t5xxl", "t5xxl"),
                      ("--ae", "ae"), ("--tokenizer_cache_dir", "tokenizers")),
        options=("--timestep_sampling", "shift", "--discrete_flow_shift", "3.1582", "--model_prediction_type", "raw",
                 "--guidance_scale", "1.0"),
        write_full_size=write_full_size_set, write_tiny=write_tiny_set),
    "sd3": Family(
        model="sd3.5-large", tiny_model="tiny-sd3.5-large", script="sd3_train_network.py",
        network_module="networks.lora_sd3",
        file_options=(("--pretrained_model_name_or_path", "checkpoint"), ("--clip_l", "clip_l"),
                      ("--clip_g", "clip_g"), ("--t5xxl", "t5xxl"), ("--tokenizer_cache_dir", "tokenizers")),
        options=(),   # SD3 has no timestep options; the guide's --fp8_base is left out (TARGETS.md: no fp8)
        write_full_size=write_full_size_sd3_set, write_tiny=write_tiny_sd3_set),
    "lumina": Family(
        model="lumina2", tiny_model="tiny-lumina2", script="lumina_train_network.py",
        network_module="networks.lora_lumina",
        file_options=(("--pretrained_model_name_or_path", "dit"), ("--gemma2", "gemma2"), ("--ae", "ae")),
        options=("--timestep_sampling", "nextdit_shift", "--discrete_flow_shift", "6.0", "--model_prediction_type",
                 "raw", "--system_prompt", RECOMMENDED_SYSTEM_PROMPTS[0]),
        write_full_size=write_full_size_lumina_set, write_tiny=write_tiny_lumina_set),
    "anima": Family(
        model=f"anima-{ANIMA_PARAMS.num_blocks}-blocks", tiny_model="tiny-anima", script="anima_train_network.py",
        network_module="networks.lora_anima",
        file_options=(("--pretrained_model_name_or_path", "dit"), ("--qwen3", "qwen3"), ("--vae", "vae"),
                      ("--tokenizer_cache_dir", "tokenizers")),
        options=("--timestep_sampling", "sigmoid", "--discrete_flow_shift", "1.0", "--vae_chunk_size", "64",
                 "--vae_disable_cache"),
        write_full_size=write_full_size_anima_set, write_tiny=write_tiny_anima_set),
}


def trainer_command(family: Family, paths: dict[str, Path], data: Path, run_dir: Path, resolution: int) -> list[str]:
    toml = run_dir / "dataset.toml"
    toml.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = {resolution}\n'
                    f'batch_size = 1\n'
                    f'[[datasets.subsets]]\nimage_dir = "{data}"\n')
    files = [arg for option, key in family.file_options for arg in (option, str(paths[key]))]
    return [sys.executable, family.script, *files, "--dataset_config", str(toml),
            "--output_dir", str(run_dir / "out"), "--output_name", "launch", "--network_module", family.network_module,
            "--network_dim", "16", "--network_alpha", "16", "--network_train_unet_only", "--optimizer_type", "AdamW",
            "--learning_rate", "1e-4", "--mixed_precision", "bf16", "--gradient_checkpointing", "--sdpa",
            "--cache_latents", "--cache_text_encoder_outputs", *family.options,
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
    ap.add_argument("--family", choices=sorted(FAMILIES), default="flux")
    ap.add_argument("--models", type=Path, default=None, help="where the set is written (default /tmp/<family>_full)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--log", type=Path, default=Path("launch_log.txt"))
    ap.add_argument("--tiny", action="store_true", help="tiny models at 64x64 (checks the script on a CPU)")
    ap.add_argument("--cprofile", type=Path, default=None,
                    help="one more run under cProfile: its top functions by cumulative time go to this file")
    a = ap.parse_args()
    family = FAMILIES[a.family]
    a.models = a.models or Path(f"/tmp/{a.family}_full")
    t0 = time.perf_counter()
    paths = family.write_tiny(a.models) if a.tiny else family.write_full_size(a.models)
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
            # TARGETS.md: the model files in the page cache (the tokenizer folders are tiny)
            warm_page_cache([path for path in paths.values() if path.is_file()])
            log.write(f"==== run {i + 1}\n")
            run_dir = a.models / f"run{i}"
            run_dir.mkdir(exist_ok=True)
            results.append(timed_run(trainer_command(family, paths, data, run_dir, resolution), log, env))
        if a.cprofile:
            log.write("==== run under cProfile\n")
            run_dir = a.models / "run_cprofile"
            run_dir.mkdir(exist_ok=True)
            cmd = trainer_command(family, paths, data, run_dir, resolution)
            stats = run_dir / "trainer.pstats"
            results.append(timed_run([cmd[0], "-m", "cProfile", "-o", str(stats), *cmd[1:]], log, env)
                           | {"cprofile": True})
            write_top_functions(stats, a.cprofile)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    model = family.tiny_model if a.tiny else family.model
    print(json.dumps({"bench": "launch_to_first_step", "model": model, "device": device,
                      "torch": torch.__version__, "write_models_s": round(write_s, 1), "runs": results}))


if __name__ == "__main__":
    main()
