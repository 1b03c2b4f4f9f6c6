"""SD3's training math and trainer hooks, without a training run: integer timesteps from the
weighting scheme's density with --training_shift and the timestep range, the x0 objective and
its weighting (no NaN at t = 0), what noisy_input / loss_terms hand the loop, text-encoder LoRA
encoding that takes the untrained encoders from the cache, per-encoder dropout only while
training, the positional random crop only in training steps, and the size check."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from library.errors import ConfigError
from library.sd3.text import SD3TextEncoding, TextDropout
from library.tiny.sd3 import (TINY_T5_WIDTH, build_mmdit, tiny_sd3_params, write_clip_g, write_clip_l,
                              write_t5xxl, write_tokenizer_cache)
from library.training import flow_matching as fm
from library.training.trainer import FamilyModels, stack_text_outputs
from sd3_train_network import SD3NetworkTrainer, check_image_sizes, random_pos_crop

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
N = 100_000


def timesteps(seed: int = 0, **config) -> torch.Tensor:
    return fm.sample_sd3_timesteps(fm.SD3FlowConfig(**config), N, generator=torch.Generator().manual_seed(seed))


def trainer_and_args(*argv: str):
    trainer = SD3NetworkTrainer()
    args = trainer.build_parser().parse_args(list(argv))
    trainer._flow = fm.SD3FlowConfig.from_args(args)
    return trainer, args


# ---------------------------------------------------------------------------------------------
# Timesteps.

def test_uniform_timesteps_are_integers_over_the_whole_range():
    t = timesteps()
    assert torch.equal(t, t.floor()) and t.dtype == torch.float32
    assert int(t.min()) == 0 and int(t.max()) == 999
    assert abs(float(t.median()) - 500) < 10


def test_training_shift_moves_the_median_to_the_shifted_value():
    # u ~ U(0,1) shifted by S: the median is S·0.5 / (1 + (S − 1)·0.5)
    for shift in (3.0, 0.5):
        expected = 1000 * shift * 0.5 / (1 + (shift - 1) * 0.5)
        assert abs(float(timesteps(training_shift=shift).median()) - expected) < 10, shift


def test_logit_normal_and_mode_densities_and_the_timestep_range():
    median = float(timesteps(weighting_scheme="logit_normal", logit_mean=1.0).median())
    assert abs(median - 1000 / (1 + math.exp(-1.0))) < 10
    mode = timesteps(weighting_scheme="mode", mode_scale=1.29)
    assert 0 <= float(mode.min()) and float(mode.max()) <= 1000
    # the mode density puts more weight in the middle than uniform
    assert float(((mode > 250) & (mode < 750)).float().mean()) > 0.55
    ranged = timesteps(min_timestep=100, max_timestep=300)
    assert int(ranged.min()) == 100 and int(ranged.max()) == 299


def test_bad_options_are_reported_together():
    trainer = SD3NetworkTrainer()
    args = trainer.build_parser().parse_args(["--training_shift", "0", "--min_timestep", "500", "--max_timestep",
                                              "400", "--noise_offset", "-0.1", "--min_snr_gamma", "5"])
    with pytest.raises(ConfigError) as e:
        fm.SD3FlowConfig.from_args(args)
    for part in ("--training_shift must be > 0", "min_timestep < max_timestep", "--noise_offset must be >= 0",
                 "--min_snr_gamma is a DDPM"):
        assert part in str(e.value)


# ---------------------------------------------------------------------------------------------
# The objective.

def test_x0_prediction_and_weighting_without_nan_at_t0():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 16, 4, 4, generator=g), torch.randn(4, 16, 4, 4, generator=g)
    sigmas = torch.tensor([0.0, 0.25, 0.5, 1.0])
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * eps
    assert torch.allclose(fm.sd3_x0_prediction(eps - x0, noisy, sigmas), x0, atol=1e-6)
    assert fm.sd3_loss_weighting("sigma_sqrt", sigmas).tolist() == [0.0, 16.0, 4.0, 1.0]
    assert fm.sd3_loss_weighting("cosmap", sigmas)[2] == pytest.approx(2 / (math.pi * 0.5))
    # x0 error = σ·(v − v̂): with σ⁻² the loss is exactly the velocity loss
    v_hat = torch.randn(4, 16, 4, 4, generator=g)
    err = (fm.sd3_x0_prediction(v_hat, noisy, sigmas) - x0) ** 2
    weighted = fm.sd3_loss_weighting("sigma_sqrt", sigmas).view(-1, 1, 1, 1) * err
    assert torch.isfinite(weighted).all() and float(weighted[0].abs().max()) == 0
    assert torch.allclose(weighted[1:], ((eps - x0 - v_hat) ** 2)[1:], atol=1e-4)


def test_noisy_input_and_loss_terms_follow_the_sd3_convention():
    trainer, args = trainer_and_args("--weighting_scheme", "sigma_sqrt", "--training_shift", "3.0")
    torch.manual_seed(0)
    latents, noise = torch.randn(8, 16, 4, 4), torch.randn(8, 16, 4, 4)
    n = trainer.noisy_input(args, latents, noise)
    assert torch.equal(n.target, latents) and torch.equal(n.timesteps, n.timesteps.floor())
    assert torch.equal(n.sigmas, n.timesteps / 1000)
    s = n.sigmas.view(-1, 1, 1, 1)
    assert torch.allclose(n.noisy, (1 - s) * latents + s * noise)
    pred, weighting = trainer.loss_terms(args, noise - latents, n)
    assert torch.allclose(pred, latents, atol=1e-5)
    assert torch.allclose(weighting, fm.sd3_loss_weighting("sigma_sqrt", n.sigmas))
    at = trainer.noisy_input_at(args, latents, noise, 0.3)
    assert torch.allclose(at.timesteps, torch.full((8,), 300.0)) and torch.allclose(at.noisy, 0.7 * latents + 0.3 * noise)
    uniform, uargs = trainer_and_args()
    assert uniform.loss_terms(uargs, noise - latents, n)[1] is None


# ---------------------------------------------------------------------------------------------
# Text: encoders from the cache or live, dropout.

@pytest.fixture(scope="module")
def encoding(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd3_text")
    return SD3TextEncoding.from_files(
        checkpoint=None, clip_l_path=write_clip_l(d / "clip_l.safetensors", seed=1),
        clip_g_path=write_clip_g(d / "clip_g.safetensors", seed=2), t5xxl_path=write_t5xxl(d / "t5.safetensors", seed=3),
        t5_max_length=8, tokenizer_cache_dir=write_tokenizer_cache(d / "tok"), context_width=TINY_T5_WIDTH)


CAPTIONS = ["a red circle", "a blue square on white"]


def test_trained_encoders_run_live_and_the_others_come_from_the_cache(encoding):
    trainer, args = trainer_and_args()
    models = FamilyModels(denoiser=torch.nn.Identity(), text_encoders=[encoding.clip_l, encoding.clip_g, encoding.t5],
                          vae=None, extra={"text": encoding})
    live = encoding.encode(CAPTIONS)
    with torch.no_grad():
        cached = stack_text_outputs(encoding.encode_for_cache(CAPTIONS), "cpu")
        cached["t5_out"] = torch.full_like(cached["t5_out"], 7.0)          # marks what came from the cache
        cached["lg_out"][..., encoding.clip_l_width:] = 5.0
        out = trainer.encode_text_for_training(args, models, CAPTIONS, cached, frozenset({0}), "cpu")
    width = encoding.clip_l_width
    assert torch.allclose(out["lg_out"][..., :width], live.lg_out[..., :width], atol=1e-5)   # CLIP-L live
    assert bool((out["lg_out"][..., width:] == 5.0).all()) and bool((out["t5_out"] == 7.0).all())
    assert torch.allclose(out["lg_pooled"], live.lg_pooled, atol=1e-5)
    with torch.no_grad():
        everything = trainer.encode_text_for_training(args, models, CAPTIONS, None, frozenset({0, 1, 2}), "cpu")
    for key in ("lg_out", "lg_pooled", "t5_out", "clip_l_attn_mask", "t5_attn_mask"):
        assert torch.allclose(everything[key].float(), getattr(live, key).float(), atol=1e-5), key


def test_dropout_applies_while_training_only(encoding):
    trainer, _ = trainer_and_args()
    trainer._dropout = TextDropout(clip_l=1.0, clip_g=0.0, t5=1.0)
    with torch.no_grad():
        cached = stack_text_outputs(encoding.encode_for_cache(CAPTIONS), "cpu")
    network = torch.nn.Linear(1, 1)
    state = SimpleNamespace(network=network, device=torch.device("cpu"), trained_text_encoders=frozenset(),
                            models=SimpleNamespace(extra={"text": encoding}))
    batch = {"text": cached}
    width = encoding.clip_l_width
    network.train()
    dropped = trainer.batch_text(state, batch)
    assert float(dropped["lg_out"][..., :width].abs().max()) == 0 and float(dropped["t5_out"].abs().max()) == 0
    assert int(dropped["clip_l_attn_mask"].sum()) == 0 and int(dropped["t5_attn_mask"].sum()) == 0
    assert torch.equal(dropped["lg_out"][..., width:], cached["lg_out"][..., width:])       # CLIP-G kept
    network.eval()
    kept = trainer.batch_text(state, batch)
    assert torch.equal(kept["lg_out"], cached["lg_out"]) and torch.equal(kept["t5_out"], cached["t5_out"])


# ---------------------------------------------------------------------------------------------
# Positional embedding.

def test_random_positional_crop_only_inside_training_steps():
    params = tiny_sd3_params("5-large")
    mmdit = build_mmdit(params).eval()
    mmdit.set_pos_emb_random_crop_rate(1.0)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([500.0])
    y, ctx = torch.randn(1, params.adm_in_channels, generator=g), torch.randn(1, 5, params.context_in_features, generator=g)
    with torch.no_grad():
        centre = mmdit(x, t, y, ctx)
        torch.manual_seed(1)
        with random_pos_crop(mmdit, enabled=True):
            assert mmdit.training
            cropped = mmdit(x, t, y, ctx)
        assert not mmdit.training
        assert torch.equal(mmdit(x, t, y, ctx), centre)
    assert not torch.allclose(cropped, centre)


def test_sizes_beyond_the_positional_embedding_are_refused_before_training(tmp_path):
    params = tiny_sd3_params("5-large")   # 16 x 16 patches: 256 px
    models = SimpleNamespace(denoiser=build_mmdit(params), info=SimpleNamespace(
        params=params, variant=SimpleNamespace(label="SD3.5 Large")))
    group = SimpleNamespace(datasets=[SimpleNamespace(bucket_slots={(256, 128): [], (320, 192): []})])
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --w 128 --h 512\na dog --w 256 --h 256\n")
    args = SimpleNamespace(sample_prompts=str(prompts))
    with pytest.raises(ConfigError) as e:
        check_image_sizes(args, models, [group, None])
    message = str(e.value)
    assert "bucket 320x192" in message and "sample prompt 0 (128x512)" in message
    assert "bucket 256x128" not in message and "sample prompt 1" not in message
    group.datasets[0].bucket_slots = {(256, 128): []}
    prompts.write_text("a dog --w 256 --h 256\n")
    check_image_sizes(args, models, [group, None])
    # scaled tables (built for 128 px): areas beyond 1.5x that size are refused
    models.denoiser.enable_scaled_pos_embed([16])
    with pytest.raises(ConfigError, match="larger than every resolution prepared"):
        check_image_sizes(args, models, [group, None])


def test_the_guides_command_line_parses():
    """The SD3 LoRA command of sd-scripts' README, as is (one line there)."""
    command = (
        "--pretrained_model_name_or_path path/to/sd3.5_large.safetensors --clip_l sd3/clip_l.safetensors "
        "--clip_g sd3/clip_g.safetensors --t5xxl sd3/t5xxl_fp16.safetensors --cache_latents_to_disk "
        "--save_model_as safetensors --sdpa --persistent_data_loader_workers --max_data_loader_n_workers 2 "
        "--seed 42 --gradient_checkpointing --mixed_precision bf16 --save_precision bf16 "
        "--network_module networks.lora_sd3 --network_dim 4 --network_train_unet_only --optimizer_type adamw8bit "
        "--learning_rate 1e-4 --cache_text_encoder_outputs --cache_text_encoder_outputs_to_disk --fp8_base "
        "--highvram --max_train_epochs 4 --save_every_n_epochs 1 --dataset_config dataset_1024_bs2.toml "
        "--output_dir path/to/output/dir --output_name sd3-lora-name")
    args = SD3NetworkTrainer().parse_args(command.split())
    assert args.clip_g == "sd3/clip_g.safetensors" and args.fp8_base and args.t5xxl_max_token_length == 256
    assert args.weighting_scheme == "uniform" and args.training_shift == 1.0
