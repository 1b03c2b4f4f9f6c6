"""End to end through the real command lines on tiny SD3.5 Medium and SD3.5 Large files (CPU, no
downloads): training lowers the loss and writes a LoRA with sd-scripts' keys and metadata and a
sample image; a CLIP-L + CLIP-G + T5-XXL LoRA trains with the SD3 options; inference with the
LoRA differs from without (and merging equals applying); bad input ends with a clear message.

Two training runs and one inference run go through subprocesses (the real command lines); the
base image, the merged image and the refusals call the scripts' `main(argv)` in this process,
which is the same code after argument parsing and saves a few interpreter start-ups. The
subprocesses run single-threaded: on a small shared CPU that is several times faster than two
threads fighting over two cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import sd3_minimal_inference
import sd3_train_network
from library.tiny.images import write_shapes_dataset
from library.tiny.sd3 import write_tiny_sd3_set

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The in-process parts run single-threaded too (see the module docstring)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("sd3_e2e")
    medium = write_tiny_sd3_set(base / "medium", variant="5-medium", all_in_one=True)   # TEs inside
    large = write_tiny_sd3_set(base / "large", variant="5-large")                       # TEs separate
    images = write_shapes_dataset(base / "images", count=6)
    ds = base / "dataset.toml"
    ds.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 128\nbatch_size = 2\n'
                  f'enable_bucket = true\nmin_bucket_reso = 64\nmax_bucket_reso = 256\n'
                  f'[[datasets.subsets]]\nimage_dir = "{images.as_posix()}"\nnum_repeats = 2\n')
    prompts = base / "prompts.txt"
    prompts.write_text(f"{PROMPT} --n blurry --w 128 --h 128 --d 1 --s 3 --l 4.0\n")
    return {"base": base, "medium": medium, "large": large, "dataset": ds, "prompts": prompts}


def train_argv(setup, model: str, out: Path, *extra: str) -> list[str]:
    paths = setup[model]
    files = ["--pretrained_model_name_or_path", str(paths.checkpoint)]
    if model == "large":
        files += ["--clip_l", str(paths.clip_l), "--clip_g", str(paths.clip_g), "--t5xxl", str(paths.t5xxl)]
    return [*files, "--tokenizer_cache_dir", str(paths.tokenizer_cache_dir), "--dataset_config",
            str(setup["dataset"]), "--output_dir", str(out), "--output_name", "tiny", "--network_module",
            "networks.lora_sd3", "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "5e-3",
            "--t5xxl_max_token_length", "16", "--cache_latents", "--seed", "3", "--max_data_loader_n_workers", "0",
            *extra]


def run_script(script: str, argv: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "tiny_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in sorted(records, key=lambda r: r["step"]) if "loss" in r]


def lora_file(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def trained_modules(tensors: dict, prefix: str) -> set[str]:
    """Modules under `prefix` whose lora_up moved away from its zero initialisation."""
    return {k.rsplit(".", 2)[0] for k, v in tensors.items()
            if k.startswith(prefix) and k.endswith("lora_up.weight") and float(v.abs().max()) > 0}


# ---------------------------------------------------------------------------------------------
# SD3.5 Medium, all-in-one file: MMDiT + CLIP-L + CLIP-G LoRA with cached T5 outputs.

@pytest.fixture(scope="module")
def medium_run(setup):
    out = setup["base"] / "medium_run"
    run_script("sd3_train_network.py", train_argv(
        setup, "medium", out, "--cache_text_encoder_outputs", "--weighting_scheme", "sigma_sqrt",
        "--text_encoder_lr", "1e-3", "5e-4", "--max_train_steps", "16", "--save_every_n_steps", "8",
        "--sample_prompts", str(setup["prompts"]), "--sample_every_n_steps", "16"))
    return out


def test_medium_loss_falls(medium_run):
    values = losses(medium_run)
    assert len(values) == 16
    assert np.mean(values[-5:]) < 0.9 * np.mean(values[:5]), values


def test_medium_lora_keys_and_metadata(medium_run):
    assert sorted(p.name for p in medium_run.glob("*.safetensors")) == ["tiny-step00000008.safetensors",
                                                                          "tiny.safetensors"]
    tensors, meta = lora_file(medium_run / "tiny.safetensors")
    # 3 joint blocks: blocks 0-1 have x_block.attn2 (12 modules each), the last one's context
    # stream is pre-only (qkv + modulation) -> 31; CLIP-L and CLIP-G: 2 layers x 6 each -> 24
    assert len(tensors) == 3 * (31 + 24)
    for name in ("lora_unet_joint_blocks_0_x_block_attn2_qkv", "lora_unet_joint_blocks_1_context_block_mlp_fc2",
                 "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1", "lora_unet_joint_blocks_2_x_block_mlp_fc1",
                 "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_1_mlp_fc2"):
        assert f"{name}.lora_down.weight" in tensors and f"{name}.alpha" in tensors, name
    assert "lora_unet_joint_blocks_2_context_block_attn_proj.lora_down.weight" not in tensors
    assert not any(k.startswith("lora_te3_") for k in tensors)
    assert {m.split("_")[1] for m in trained_modules(tensors, "lora_")} == {"unet", "te1", "te2"}
    assert meta["ss_base_model_version"] == "5-medium"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert meta["modelspec.implementation"] == "diffusers" and "modelspec.prediction_type" not in meta
    assert meta["ss_network_module"] == "networks.lora_sd3" and meta["ss_network_dim"] == "4"
    assert meta["ss_steps"] == "16"
    assert meta["ss_weighting_scheme"] == "sigma_sqrt" and meta["ss_training_shift"] == "1.0"
    assert meta["ss_logit_mean"] == "0.0" and meta["ss_mode_scale"] == "1.29"
    assert meta["ss_apply_lg_attn_mask"] == "False" and meta["ss_apply_t5_attn_mask"] == "False"
    assert meta["ss_text_encoder_lr"] == "[0.001, 0.0005, 0.0005]"    # two values: T5's is CLIP-G's
    assert len(meta["sshs_model_hash"]) == 64 and len(meta["ss_new_sd_model_hash"]) == 64
    assert "/" not in meta["ss_sd_model_name"]


def test_medium_sample_image(medium_run):
    pngs = sorted((medium_run / "sample").glob("*.png"))
    assert [p.name.split("_")[1] for p in pngs] == ["000016"]
    assert Image.open(pngs[0]).size == (128, 128)


# ---------------------------------------------------------------------------------------------
# Inference.

def inference_argv(setup, out: Path, *extra: str) -> list[str]:
    paths = setup["medium"]
    return ["--ckpt_path", str(paths.checkpoint), "--tokenizer_cache_dir", str(paths.tokenizer_cache_dir),
            "--prompt", PROMPT, "--negative_prompt", "blurry", "--width", "128", "--height", "128", "--steps", "4",
            "--seed", "5", "--cfg_scale", "4.0", "--t5xxl_token_length", "16", "--dtype", "float32",
            "--device", "cpu", "--out", str(out), *extra]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float32)


def test_inference_with_lora_differs_and_merging_equals_applying(setup, medium_run, tmp_path):
    lora = f"{medium_run / 'tiny.safetensors'};1.0"
    run_script("sd3_minimal_inference.py", inference_argv(setup, tmp_path / "lora.png", "--lora_weights", lora))
    assert sd3_minimal_inference.main(inference_argv(setup, tmp_path / "base.png")) == 0
    assert sd3_minimal_inference.main(inference_argv(setup, tmp_path / "merged.png", "--lora", lora,
                                                     "--merge_lora_weights")) == 0
    base, with_lora, merged = (pixels(tmp_path / f"{n}.png") for n in ("base", "lora", "merged"))
    assert base.shape == (128, 128, 3)
    assert np.abs(base - with_lora).mean() > 0.5
    assert np.abs(merged - with_lora).max() <= 2


def test_inference_refuses_a_lora_of_another_variant(setup, medium_run, tmp_path, capsys):
    paths = setup["large"]
    argv = ["--ckpt_path", str(paths.checkpoint), "--clip_l", str(paths.clip_l), "--clip_g", str(paths.clip_g),
            "--t5xxl", str(paths.t5xxl), "--tokenizer_cache_dir", str(paths.tokenizer_cache_dir), "--steps", "1",
            "--width", "64", "--height", "64", "--out", str(tmp_path / "x.png"),
            "--lora", str(medium_run / "tiny.safetensors")]
    assert sd3_minimal_inference.main(argv) == 2
    assert "trained on SD3.5 Medium" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# SD3.5 Large, separate text-encoder files: MMDiT + CLIP-L + CLIP-G + T5-XXL LoRA, live text
# encoding with per-encoder dropout, and the SD3 timestep / positional-embedding options.

def test_large_with_t5_lora_and_sd3_options(setup):
    out = setup["base"] / "large_run"
    result = run_script("sd3_train_network.py", train_argv(
        setup, "large", out, "--network_args", "train_t5xxl=True", "--text_encoder_lr", "1e-3",
        "--weighting_scheme", "logit_normal", "--logit_mean", "0.5", "--training_shift", "3.0",
        "--min_timestep", "100", "--max_timestep", "900", "--clip_l_dropout_rate", "0.5", "--t5_dropout_rate", "0.5",
        "--apply_t5_attn_mask", "--pos_emb_random_crop_rate", "0.5", "--enable_scaled_pos_embed",
        "--max_train_steps", "4"))
    assert "scaled positional embeddings for latent sizes [16]" in result.stdout
    values = losses(out)
    assert len(values) == 4 and all(np.isfinite(values))
    tensors, meta = lora_file(out / "tiny.safetensors")
    assert {m.split("_")[1] for m in trained_modules(tensors, "lora_")} == {"unet", "te1", "te2", "te3"}
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight" in tensors
    assert "lora_unet_joint_blocks_3_x_block_mlp_fc2.lora_down.weight" in tensors      # 4 blocks
    assert not any("attn2" in k for k in tensors)                                     # SD3.5 L has none
    assert meta["ss_base_model_version"] == "5-large"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-large/lora"
    assert meta["ss_weighting_scheme"] == "logit_normal" and meta["ss_logit_mean"] == "0.5"
    assert meta["ss_training_shift"] == "3.0" and meta["modelspec.timestep_range"] == "100,900"
    assert meta["ss_apply_t5_attn_mask"] == "True" and meta["ss_t5_dropout_rate"] == "0.5"
    assert meta["ss_enable_scaled_pos_embed"] == "True"
    assert json.loads(meta["ss_network_args"]) == {"train_t5xxl": "True"}


# ---------------------------------------------------------------------------------------------
# Refusals, each with its message (all before any model is loaded; the LoRA module's own
# refusals are tested in test_lora_sd3.py).

@pytest.mark.parametrize("extra, message", [
    (["--t5xxl", "/nonexistent/t5xxl.safetensors"], "--t5xxl /nonexistent/t5xxl.safetensors: file not found"),
    (["--cache_text_encoder_outputs", "--network_args", "train_t5xxl=True"],
     "cannot be used while training a T5-XXL LoRA"),
    (["--text_encoder_lr", "1e-4", "1e-4", "1e-4", "1e-4"], "takes 1 to 3 values for SD3"),
    (["--network_train_unet_only", "--text_encoder_lr", "1e-4"], "--text_encoder_lr has no effect"),
    (["--min_snr_gamma", "5"], "--min_snr_gamma is a DDPM (SD1/2) option"),
    (["--weighting_scheme", "sigma"], "invalid choice: 'sigma'"),
    (["--min_timestep", "900", "--max_timestep", "100"], "need 0 <= min_timestep < max_timestep"),
    (["--clip_g_dropout_rate", "1.5"], "--clip_g_dropout_rate must be between 0 and 1"),
])
def test_bad_input_is_a_clear_error(setup, tmp_path, capsys, extra, message):
    argv = train_argv(setup, "medium", tmp_path / "out", "--max_train_steps", "1", *extra)
    try:
        code = sd3_train_network.main(argv)
    except SystemExit as e:   # argparse's own refusals
        code = e.code
    captured = capsys.readouterr()
    assert code == 2
    assert message in captured.out + captured.err


def test_wrong_file_and_foreign_prompt_options_are_named(setup, tmp_path, capsys):
    paths = setup["medium"]
    bad_prompts = tmp_path / "p.txt"
    bad_prompts.write_text("a cat --g 3.5 --w 128 --h 128\n")
    assert sd3_train_network.main(train_argv(setup, "medium", tmp_path / "o", "--sample_prompts",
                                             str(bad_prompts))) == 2
    assert "prompt 0 sets --g (embedded guidance, FLUX.1 only" in capsys.readouterr().out
    argv = train_argv(setup, "medium", tmp_path / "o2", "--max_train_steps", "1")
    argv[argv.index(str(paths.checkpoint))] = str(setup["large"].clip_g)
    assert sd3_train_network.main(argv) == 2
    assert "expected an SD3 / SD3.5 checkpoint" in capsys.readouterr().out
