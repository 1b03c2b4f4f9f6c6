"""End to end through the real command line on tiny SD 1.x (ε-prediction) and SD 2.x
(v-prediction) checkpoints in the ldm layout (CPU, no downloads): the loss falls, the LoRA has
sd-scripts' keys and metadata, sample images appear, diffusers' own LoRA loader accepts the
file and gives the same UNet and text encoder as our merged model, bad input ends with a clear
message, and sd_minimal_inference.py generates with and without the trained LoRA."""

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

from library.tiny import sd as tiny_sd
from library.tiny.images import write_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]
# tiny models are all per-op overhead: one thread per process is much faster on a shared CPU
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("sd_e2e")
    v1 = tiny_sd.write_tiny_sd_set(base / "v1", v2=False, seed=1)
    v2 = tiny_sd.write_tiny_sd_set(base / "v2", v2=True, seed=2)
    images = write_shapes_dataset(base / "images", count=6)
    reg = write_shapes_dataset(base / "reg", count=2, seed=9)
    common = (f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 128\nbatch_size = 2\n'
              f'enable_bucket = true\nmin_bucket_reso = 64\nmax_bucket_reso = 256\n'
              f'[[datasets.subsets]]\nimage_dir = "{images.as_posix()}"\nnum_repeats = 2\n')
    (base / "dataset.toml").write_text(common)
    (base / "dataset_reg.toml").write_text(common + f'[[datasets.subsets]]\nimage_dir = "{reg.as_posix()}"\n'
                                                    'is_reg = true\nclass_tokens = "a shape"\n')
    # A1111 weighting in the sample prompt (library/sd/prompt_weighting.py)
    (base / "prompts.txt").write_text("a (red) circle on a [blue:1.2] background --n (blurry:1.3) --w 128 --h 128 "
                                      "--d 1 --s 3 --l 5.0\n")
    return base, v1, v2


def train(setup, out: Path, paths, *extra: str, dataset: str = "dataset.toml") -> subprocess.CompletedProcess:
    base = setup[0]
    cmd = [sys.executable, str(ROOT / "train_network.py"), "--pretrained_model_name_or_path", str(paths.checkpoint),
           "--tokenizer_cache_dir", str(paths.tokenizer_cache_dir), "--dataset_config", str(base / dataset),
           "--output_dir", str(out), "--output_name", "tiny", "--network_module", "networks.lora",
           "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "3e-3", "--cache_latents",
           "--seed", "3", "--max_data_loader_n_workers", "0", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)


def losses(out: Path) -> list[float]:
    records = map(json.loads, (out / "tiny_log.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if "loss" in r]


def file_keys_and_metadata(path: Path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys()), f.metadata()


@pytest.fixture(scope="module")
def sd1_run(setup):
    base, v1, _ = setup
    out = base / "run_sd1"
    r = train(setup, out, v1, "--max_train_steps", "30", "--sample_prompts", str(base / "prompts.txt"),
              "--sample_every_n_steps", "30")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def sd2_run(setup):
    base, _, v2 = setup
    out = base / "run_sd2"
    r = train(setup, out, v2, "--v2", "--v_parameterization", "--max_train_steps", "30", "--network_train_unet_only",
              "--cache_text_encoder_outputs", "--weighted_captions", "--gradient_checkpointing", "--clip_skip", "2",
              "--max_token_length", "150", "--noise_offset", "0.05", "--prior_loss_weight", "0.5",
              dataset="dataset_reg.toml")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_sd1_epsilon_trains_unet_and_text_encoder(sd1_run):
    values = losses(sd1_run)
    assert len(values) == 30
    assert np.mean(values[-8:]) < 0.85 * np.mean(values[:8]), values
    keys, meta = file_keys_and_metadata(sd1_run / "tiny.safetensors")
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    unet = {m for m in modules if m.startswith("lora_unet_")}
    te = {m for m in modules if m.startswith("lora_te_")}
    assert len(unet) == 192 and len(te) == 6 * tiny_sd.TINY_V1_TEXT_LAYERS and len(keys) == 3 * len(modules)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_mid_block_attentions_0_proj_in.alpha" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.resolution"] == "512x512"
    assert len(meta["sshs_model_hash"]) == 64 and "/" not in meta["ss_sd_model_name"]
    samples = sorted((sd1_run / "sample").glob("*.png"))
    assert [p.name.split("_")[1] for p in samples] == ["000030"]
    assert Image.open(samples[0]).size == (128, 128)


def test_sd2_v_prediction_trains_the_unet(sd2_run):
    values = losses(sd2_run)
    assert len(values) == 30
    assert np.mean(values[-8:]) < 0.85 * np.mean(values[:8]), values
    keys, meta = file_keys_and_metadata(sd2_run / "tiny.safetensors")
    assert keys and all(k.startswith("lora_unet_") for k in keys) and len(keys) == 3 * 192
    assert tuple(safe_open(str(sd2_run / "tiny.safetensors"), "pt").get_slice(
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight").get_shape()) == (4, 128)   # linear projection
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v" and meta["modelspec.resolution"] == "768x768"
    assert meta["ss_clip_skip"] == "2" and meta["modelspec.encoder_layer"] == "2"
    assert meta["ss_max_token_length"] == "150" and meta["ss_noise_offset"] == "0.05"
    assert meta["ss_num_reg_images"] == "2" and meta["ss_prior_loss_weight"] == "0.5"
    assert meta["ss_gradient_checkpointing"] == "True"


@torch.no_grad()
@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_diffusers_loads_the_lora_like_our_merge(setup, sd1_run, sd2_run, which):
    from diffusers import StableDiffusionPipeline

    from library.sd.loading import load_sd_model
    from networks import lora

    _, v1, v2 = setup
    paths, lora_file = (v1, sd1_run / "tiny.safetensors") if which == "sd1" else (v2, sd2_run / "tiny.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(str(paths.diffusers_dir), safety_checker=None)
    pipe.load_lora_weights(str(lora_file))
    ours = load_sd_model(paths.checkpoint, v2=paths.v2)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t, c = torch.tensor([20, 600]), torch.randn(2, 77, tiny_sd.TINY_TEXT_WIDTH)
    base_out_unet = ours.unet(x, t, encoder_hidden_states=c).sample
    ids = torch.randint(0, 200, (2, 77))
    base_out_te = ours.text_encoder(ids).last_hidden_state
    network, sd = lora.create_network_from_weights(1.0, lora_file, None, [ours.text_encoder], ours.unet,
                                                   for_inference=True)
    network.merge_to(sd)
    merged = ours.unet(x, t, encoder_hidden_states=c).sample
    assert (merged - base_out_unet).abs().max() > 1e-3           # the LoRA changes the UNet
    assert (merged - pipe.unet(x, t, encoder_hidden_states=c).sample).abs().max() <= 1e-4
    te_out = ours.text_encoder(ids).last_hidden_state
    assert (te_out - pipe.text_encoder(ids).last_hidden_state).abs().max() <= 1e-4
    assert ((te_out - base_out_te).abs().max() > 1e-3) == (which == "sd1")   # only the SD 1.x run trained the TE


def test_bad_input_is_a_clear_error(setup, tmp_path):
    _, v1, _ = setup
    r = train(setup, tmp_path / "bad", v1, "--v2", "--max_train_steps", "1", "--sample_sampler", "fancy")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "SD 1.x model" in r.stdout and "remove --v2" in r.stdout
    assert "unknown sampler" in r.stdout
    assert "Traceback" not in r.stderr


def test_minimal_inference_with_and_without_lora(setup, sd1_run, tmp_path):
    """sd_minimal_inference.py through its command line: the trained LoRA changes the image,
    merged it gives the unmerged image, and the SD 1.x LoRA is refused for the SD 2.x file.
    The runs are independent processes, started together (each is mostly imports)."""
    _, v1, v2 = setup
    lora_file = sd1_run / "tiny.safetensors"

    def command(paths, out: str, *extra: str) -> list[str]:
        return [sys.executable, str(ROOT / "sd_minimal_inference.py"), "--ckpt", str(paths.checkpoint),
                "--tokenizer_cache_dir", str(paths.tokenizer_cache_dir), "--prompt", "a red circle on a blue background",
                "--negative_prompt", "blurry", "--width", "64", "--height", "64", "--steps", "4", "--cfg_scale", "5",
                "--seed", "7", "--sampler", "euler_a", "--out", str(tmp_path / out), *extra]

    commands = {
        "base": command(v1, "base.png"),
        "lora": command(v1, "lora.png", "--lora", f"{lora_file};1.0"),
        "merged": command(v1, "merged.png", "--lora_weights", f"{lora_file};1.0", "--merge_lora_weights"),
        "sd2": command(v2, "sd2.png", "--v2", "--lora", f"{lora_file};1.0"),
    }
    procs = {k: subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for k, c in commands.items()}
    try:
        results = {k: (p.communicate(timeout=600), p.returncode) for k, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for k in ("base", "lora", "merged"):
        (out, err), rc = results[k]
        assert rc == 0, f"{k}: {out[-2000:]}{err[-2000:]}"
    base, lora_img, merged = (np.asarray(Image.open(tmp_path / f"{k}.png").convert("RGB"), dtype=np.int16)
                              for k in ("base", "lora", "merged"))
    assert base.shape == (64, 64, 3)
    assert np.abs(lora_img - base).mean() > 1.0                  # the LoRA changes the image
    assert np.abs(merged - lora_img).max() <= 2                  # merged = applied, up to rounding
    assert "LoRA tiny.safetensors x1.0" in results["lora"][0][0] and "merged" in results["merged"][0][0]

    (out, err), rc = results["sd2"]
    assert rc == 2, out[-2000:] + err[-2000:]
    assert "trained on SD 1.x" in out and "SD 2.x model" in out
    assert "Traceback" not in err and not (tmp_path / "sd2.png").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_recorded_training_updates_the_lora_like_eager_training_on_cuda(setup, tmp_path):
    # --cuda_graph draws SD's timesteps on the GPU (eager training draws them on the CPU, as
    # sd-scripts does), so the losses differ step by step; what must hold: steps 3 on are replays
    # of one recording, they update the LoRA about as much as eager steps do, and the loss is sane.
    base, v1, _ = setup
    (base / "one_bucket.toml").write_text(
        (base / "dataset.toml").read_text().replace("enable_bucket = true", "enable_bucket = false"))
    common = ("--max_train_steps", "16", "--network_train_unet_only", "--cache_text_encoder_outputs",
              "--mixed_precision", "bf16", "--gradient_checkpointing")
    norms, mean_loss = {}, {}
    for name, extra in (("eager", ()), ("graphed", ("--cuda_graph",))):
        r = train(setup, tmp_path / name, v1, *common, *extra, dataset="one_bucket.toml")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "--cuda_graph is off" not in r.stdout
        values = losses(tmp_path / name)
        assert len(values) == 16 and np.isfinite(values).all()
        mean_loss[name] = float(np.mean(values))
        from safetensors.torch import load_file
        ups = [v.float() for k, v in load_file(str(tmp_path / name / "tiny.safetensors")).items() if "lora_up" in k]
        norms[name] = float(torch.stack([u.norm() for u in ups]).sum())
        if extra:
            assert "--cuda_graph: step recorded for input shape 1" in r.stdout
    assert norms["graphed"] == pytest.approx(norms["eager"], rel=0.25), norms
    assert mean_loss["graphed"] == pytest.approx(mean_loss["eager"], rel=0.5), mean_loss
