"""End to end through the real command lines on tiny FLUX-format models (CPU, no downloads):
training lowers the loss and writes a LoRA with the right keys and metadata, samples and the
gallery appear, inference with the LoRA differs from without, --resume continues with the
same losses as an uninterrupted run, and bad input ends with a clear message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from library.tiny.flux import write_tiny_flux_set
from library.tiny.images import write_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("flux_e2e")
    paths = write_tiny_flux_set(base / "models", variant="dev")
    images = write_shapes_dataset(base / "images", count=6)
    ds = base / "dataset.toml"
    ds.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 128\nbatch_size = 2\n'
                  f'enable_bucket = true\nmin_bucket_reso = 64\nmax_bucket_reso = 256\n'
                  f'[[datasets.subsets]]\nimage_dir = "{images.as_posix()}"\nnum_repeats = 2\n')
    prompts = base / "prompts.txt"
    prompts.write_text("a red circle on a blue background --w 128 --h 128 --d 1 --s 3 --g 1.0\n")
    return base, paths, ds, prompts


def model_args(paths) -> list[str]:
    return ["--pretrained_model_name_or_path", str(paths.dit), "--clip_l", str(paths.clip_l),
            "--t5xxl", str(paths.t5xxl), "--ae", str(paths.ae), "--tokenizer_cache_dir", str(paths.tokenizer_cache_dir)]


def train(setup, out: Path, *extra: str, dataset: Path | None = None, cache_latents: bool = True,
          cache_text: bool = True, unet_only: bool = True) -> subprocess.CompletedProcess:
    base, paths, ds, prompts = setup
    cmd = [sys.executable, str(ROOT / "flux_train_network.py"), *model_args(paths),
           "--dataset_config", str(dataset or ds),
           "--output_dir", str(out), "--output_name", "tiny", "--network_module", "networks.lora_flux",
           "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "2e-3",
           *(["--network_train_unet_only"] if unet_only else []),
           *(["--cache_latents"] if cache_latents else []),
           *(["--cache_text_encoder_outputs"] if cache_text else []), "--t5xxl_max_token_length", "16",
           "--timestep_sampling", "shift", "--discrete_flow_shift", "3.1582", "--model_prediction_type", "raw",
           "--guidance_scale", "1.0", "--seed", "3", "--max_data_loader_n_workers", "0", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def losses(out: Path) -> dict[int, float]:
    records = map(json.loads, (out / "tiny_log.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def trained(setup):
    out = setup[0] / "run"
    result = train(setup, out, "--max_train_steps", "30", "--sample_prompts", str(setup[3]),
                   "--sample_every_n_steps", "15", "--save_every_n_steps", "10", "--save_last_n_steps", "10")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_loss_falls(trained):
    values = [v for _, v in sorted(losses(trained).items())]
    assert len(values) == 30
    assert np.mean(values[-8:]) < 0.8 * np.mean(values[:8])


def test_lora_file_keys_and_metadata(trained):
    files = sorted(p.name for p in trained.glob("*.safetensors"))
    # step 10 fell out of the last-10-steps window; step 30 is the final file
    assert files == ["tiny-step00000020.safetensors", "tiny.safetensors"]
    with safe_open(str(trained / "tiny.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    # tiny model: 2 double blocks x 10 + 2 single blocks x 3 modules, 3 tensors each
    assert len(keys) == 78
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_1_modulation_lin.alpha" in keys
    assert meta["ss_base_model_version"] == "flux1"
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert meta["ss_network_dim"] == "4" and meta["ss_steps"] == "30"
    assert meta["ss_guidance_scale"] == "1.0" and meta["ss_timestep_sampling"] == "shift"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert len(meta["sshs_model_hash"]) == 64 and len(meta["ss_new_sd_model_hash"]) == 64
    assert "/" not in meta["ss_sd_model_name"]       # no absolute paths in metadata


def test_samples_and_gallery(trained):
    pngs = sorted((trained / "sample").glob("*.png"))
    assert [p.name.split("_")[1] for p in pngs] == ["000015", "000030"]
    assert Image.open(pngs[0]).size == (128, 128)
    page = (trained / "sample" / "index.html").read_text()
    assert "step 30" in page and pngs[1].name in page and "<svg" in page


def test_inference_with_and_without_lora(setup, trained, tmp_path):
    _, paths, _, _ = setup
    common = [sys.executable, str(ROOT / "flux_minimal_inference.py"), "--ckpt", str(paths.dit), "--clip_l",
              str(paths.clip_l), "--t5xxl", str(paths.t5xxl), "--ae", str(paths.ae), "--tokenizer_cache_dir",
              str(paths.tokenizer_cache_dir), "--prompt", "a red circle on a blue background", "--width", "128",
              "--height", "128", "--steps", "4", "--seed", "5", "--dtype", "float32", "--device", "cpu",
              "--t5xxl_max_token_length", "16", "--guidance", "1.0"]
    images = []
    lora = ["--lora", f"{trained / 'tiny.safetensors'};1.0"]
    for name, extra in (("base", []), ("lora", lora), ("fp8", lora + ["--flux_dtype", "fp8"])):
        out = tmp_path / f"{name}.png"
        r = subprocess.run(common + ["--out", str(out)] + extra, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        images.append(np.asarray(Image.open(out), dtype=np.float32))
    assert "Linear layers in float8_e4m3fn" in r.stdout
    assert images[0].shape == (128, 128, 3)
    assert np.abs(images[0] - images[1]).mean() > 0.5
    # fp8 base weights round the DiT (~3% RMS per weight): the picture stays close to full precision.
    assert np.abs(images[2] - images[1]).mean() < 0.5 * np.abs(images[0] - images[1]).mean()


def test_resume_continues_with_identical_losses(setup, tmp_path):
    full, first, resumed = tmp_path / "full", tmp_path / "first", tmp_path / "resumed"
    assert train(setup, full, "--max_train_steps", "8").returncode == 0
    r = train(setup, first, "--max_train_steps", "8", "--save_every_n_steps", "4", "--save_state")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = train(setup, resumed, "--max_train_steps", "8", "--resume", str(first / "tiny-step00000004-state"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    expected = losses(full)
    got = losses(resumed)
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize("change, message", [
    (("--ae", "/nonexistent/ae.safetensors"), "file not found"),
    (("--network_args", "img_atn_dim=4"), "did you mean 'img_attn_dim'"),
])
def test_bad_input_is_a_clear_error(setup, tmp_path, change, message):
    r = train(setup, tmp_path / "bad", "--max_train_steps", "1", *change)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert message in r.stdout
    assert "Traceback" not in r.stderr


def test_wrong_file_as_dit_is_named(setup, tmp_path):
    _, paths, _, _ = setup
    r = train(setup, tmp_path / "bad", "--max_train_steps", "1", "--pretrained_model_name_or_path", str(paths.ae))
    assert r.returncode == 2
    assert "autoencoder" in r.stdout.lower()


def test_chroma_trains_and_refuses_a_flux_file(tmp_path):
    paths = write_tiny_flux_set(tmp_path / "models", variant="chroma")
    flux = write_tiny_flux_set(tmp_path / "flux", variant="dev")
    images = write_shapes_dataset(tmp_path / "images", count=4)
    ds = tmp_path / "ds.toml"
    ds.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 128\n'
                  f'[[datasets.subsets]]\nimage_dir = "{images.as_posix()}"\n')
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle --n blurry --w 128 --h 128 --d 1 --s 2 --l 4.0 --g 0.0\n")
    base = [sys.executable, str(ROOT / "flux_train_network.py"), "--model_type", "chroma", "--t5xxl", str(paths.t5xxl),
            "--ae", str(paths.ae), "--tokenizer_cache_dir", str(paths.tokenizer_cache_dir), "--dataset_config", str(ds),
            "--output_dir", str(tmp_path / "out"), "--output_name", "c", "--network_module", "networks.lora_flux",
            "--network_dim", "4", "--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs",
            "--t5xxl_max_token_length", "16", "--guidance_scale", "0.0", "--timestep_sampling", "sigmoid",
            "--model_prediction_type", "raw", "--max_train_steps", "4", "--max_data_loader_n_workers", "0"]
    r = subprocess.run(base + ["--pretrained_model_name_or_path", str(paths.dit), "--sample_prompts", str(prompts),
                               "--sample_every_n_steps", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with safe_open(str(tmp_path / "out" / "c.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["ss_base_model_version"] == "chroma" and meta["modelspec.architecture"] == "chroma/lora"
    assert meta["ss_apply_t5_attn_mask"] == "True"           # always on for Chroma
    assert not any("_mod_" in k or "modulation" in k for k in keys)
    assert len(list((tmp_path / "out" / "sample").glob("*.png"))) == 1   # CFG with a negative prompt
    r = subprocess.run(base + ["--pretrained_model_name_or_path", str(flux.dit)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "chroma" in r.stdout.lower()
