"""Detecting and loading SD3 / SD3.5 files: variants, sizes, prefixes, the parts inside an
all-in-one file, the VAE (parity with diffusers' AutoencoderKL through its LDM converter), and
refusals of other files with messages that say what they are."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from library.autoencoders import SD3_VAE_SCALING
from library.errors import ConfigError, ModelFileError
from library.flux.loading import inspect_flux_checkpoint
from library.safetensors_io import load_file, save_file_atomic
from library.sd3.loading import (inspect_sd3_checkpoint, load_sd3_clip_g, load_sd3_clip_l, load_sd3_mmdit,
                                 load_sd3_t5xxl, load_sd3_vae)
from library.tiny import flux as tiny_flux
from library.tiny.sd3 import (TINY_SD3_VAE_CONFIG, TINY_T5_WIDTH, mmdit_state_dict, tiny_sd3_params, write_clip_g,
                              write_sd3_checkpoint, write_sd3_vae)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd3_files")
    return {
        "medium": write_sd3_checkpoint(d / "sd3_medium.safetensors", "medium", seed=1),
        "5-medium": write_sd3_checkpoint(d / "sd3.5_medium.safetensors", "5-medium", seed=2,
                                         text_encoders=("clip_l", "clip_g", "t5xxl")),
        "5-large": write_sd3_checkpoint(d / "sd3.5_large.safetensors", "5-large", seed=3, include_vae=False),
        "bare_bf16": write_sd3_checkpoint(d / "bare.safetensors", "medium", seed=1, prefix="", include_vae=False,
                                          dtype=torch.bfloat16),
        "flux": tiny_flux.write_flux_dit(d / "flux.safetensors", "dev"),
        "t5": tiny_flux.write_t5xxl(d / "t5.safetensors"),
        "vae": write_sd3_vae(d / "vae.safetensors", seed=9),
        "clip_g": write_clip_g(d / "clip_g.safetensors", seed=4),
    }


@pytest.mark.parametrize("variant", ["medium", "5-medium", "5-large"])
def test_detects_variant_sizes_and_contents(files, variant):
    info = inspect_sd3_checkpoint(files[variant])
    tiny = tiny_sd3_params(variant)
    assert info.variant.name == variant and info.params == tiny
    assert info.prefix == "model.diffusion_model." and info.dtype == torch.float32
    assert info.has_vae == (variant != "5-large")
    assert info.vae_prefix in (None, "first_stage_model.")
    expected_tes = {"clip_l", "clip_g", "t5xxl"} if variant == "5-medium" else set()
    assert set(info.text_encoder_prefixes) == expected_tes
    assert info.variant.modelspec_architecture.startswith("stable-diffusion-3")


@pytest.mark.parametrize("variant", ["medium", "5-medium", "5-large"])
def test_load_assigns_the_file_tensors(files, variant):
    model, info = load_sd3_mmdit(files[variant])
    seed = {"medium": 1, "5-medium": 2, "5-large": 3}[variant]
    expected = mmdit_state_dict(variant, seed=seed)
    state = model.state_dict()
    assert set(state) == set(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_unprefixed_file_and_dtypes(files):
    info = inspect_sd3_checkpoint(files["bare_bf16"])
    assert info.prefix == "" and info.dtype == torch.bfloat16 and not info.has_vae
    model, _ = load_sd3_mmdit(files["bare_bf16"])
    assert model.x_embedder.proj.weight.dtype == torch.bfloat16
    as_fp32, _ = load_sd3_mmdit(files["bare_bf16"], dtype=torch.float32)
    assert as_fp32.pos_embed.dtype == torch.float32
    with pytest.raises(ConfigError, match="fp8 base weights are not supported for SD3"):
        load_sd3_mmdit(files["bare_bf16"], dtype=torch.float8_e4m3fn)


def test_sizes_come_from_the_file(tmp_path):
    params = replace(tiny_sd3_params("5-medium"), depth=5, hidden_size=128, num_heads=2, mlp_ratio=2.0,
                     pos_embed_max_size=10, x_block_self_attn_layers=(1, 3))
    path = write_sd3_checkpoint(tmp_path / "odd.safetensors", "5-medium", params=params, include_vae=False)
    info = inspect_sd3_checkpoint(path)
    assert info.params == params and info.variant.name == "5-medium"
    model, _ = load_sd3_mmdit(path)
    assert len(model.joint_blocks) == 5 and hasattr(model.joint_blocks[3].x_block, "attn2")


@pytest.mark.parametrize("name,looks_like", [
    ("flux", "a FLUX.1 DiT"),
    ("t5", "a T5 text encoder"),
    ("vae", "an autoencoder"),
])
def test_other_files_are_refused_by_name(files, name, looks_like):
    with pytest.raises(ModelFileError, match=f"expected an SD3 / SD3.5 checkpoint .* looks like {looks_like}"):
        inspect_sd3_checkpoint(files[name])


def test_diffusers_layout_and_loras_are_refused(tmp_path, files):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    converted = convert_sd3_transformer_checkpoint_to_diffusers(mmdit_state_dict("medium"))
    save_file_atomic(converted, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelFileError, match="SD3/SD3.5 transformer in the diffusers layout"):
        inspect_sd3_checkpoint(tmp_path / "diffusion_pytorch_model.safetensors")
    save_file_atomic({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(4, 8)},
                     tmp_path / "lora.safetensors")
    with pytest.raises(ModelFileError, match="a LoRA file"):
        inspect_sd3_checkpoint(tmp_path / "lora.safetensors")
    with pytest.raises(ModelFileError, match="is a folder"):
        inspect_sd3_checkpoint(tmp_path)
    # ... and the FLUX loader names an SD3 file for what it is.
    with pytest.raises(ModelFileError, match="looks like an SD3/SD3.5 model"):
        inspect_flux_checkpoint(files["medium"])


def test_truncated_and_wrong_head_size_files_are_refused(tmp_path):
    state = mmdit_state_dict("medium")
    last = tiny_sd3_params("medium").depth - 1
    truncated = {k: v for k, v in state.items() if not k.startswith(f"joint_blocks.{last}.")}
    save_file_atomic(truncated, tmp_path / "truncated.safetensors")
    with pytest.raises(ModelFileError, match="pre-only"):
        inspect_sd3_checkpoint(tmp_path / "truncated.safetensors")
    wide = dict(state, **{"joint_blocks.0.x_block.attn.ln_q.weight": torch.ones(96),
                          "joint_blocks.0.context_block.attn.ln_k.weight": torch.ones(96)})
    save_file_atomic(wide, tmp_path / "wide_heads.safetensors")
    with pytest.raises(ModelFileError, match="attention head size 96"):
        inspect_sd3_checkpoint(tmp_path / "wide_heads.safetensors")
    missing = {k: v for k, v in state.items() if k != "joint_blocks.0.x_block.mlp.fc2.bias"}
    save_file_atomic(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ModelFileError, match="1 MMDiT tensors are missing"):
        load_sd3_mmdit(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------
# The VAE.

def _diffusers_vae(state: dict[str, torch.Tensor]):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = TINY_SD3_VAE_CONFIG
    n = len(cfg.ch_mult)
    config = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                  up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=[cfg.ch * m for m in cfg.ch_mult],
                  layers_per_block=cfg.num_res_blocks, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                  use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
    ref = AutoencoderKL(**config)
    ref.load_state_dict(convert_ldm_vae_checkpoint(state, config), strict=True)
    return ref.eval()


@torch.no_grad()
def test_vae_inside_the_checkpoint_matches_diffusers(files):
    vae = load_sd3_vae(files["medium"])
    assert (vae.config.scale_factor, vae.config.shift_factor) == (SD3_VAE_SCALING.scale_factor, 0.0609)
    raw = load_file(files["medium"])
    ref = _diffusers_vae({k.removeprefix("first_stage_model."): v for k, v in raw.items()
                          if k.startswith("first_stage_model.")})
    x = torch.rand(1, 3, 48, 80, generator=torch.Generator().manual_seed(0)) * 2 - 1
    moments = vae.encode_moments(x)
    expected = ref.encode(x).latent_dist
    assert moments.mean.shape == (1, 16, 6, 10) and moments.mean.std() > 0.05
    assert (moments.mean - expected.mean).abs().max() <= 1e-5
    latents = vae.scale_latents(moments.mean)
    assert torch.allclose(latents, (moments.mean - 0.0609) * 1.5305)
    decoded = vae.decode(latents)
    expected_image = ref.decode(moments.mean).sample  # diffusers' decode takes unscaled latents
    assert (decoded - expected_image).abs().max() <= 1e-5


def test_vae_from_the_option_wins_and_missing_vae_is_explained(files):
    separate = load_sd3_vae(files["medium"], files["vae"])
    inside = load_sd3_vae(files["medium"])
    assert not torch.equal(separate.encoder.conv_in.weight, inside.encoder.conv_in.weight)
    with pytest.raises(ModelFileError, match="no VAE inside .*--vae"):
        load_sd3_vae(files["5-large"])
    with pytest.raises(ModelFileError, match="16 channels|the SD3 VAE"):
        load_sd3_vae(None, files["flux"])


# ---------------------------------------------------------------------------------------------
# Text encoders inside the checkpoint or separate.

def test_text_encoders_come_from_the_checkpoint_or_the_options(files):
    clip_l = load_sd3_clip_l(files["5-medium"])
    clip_g = load_sd3_clip_g(files["5-medium"])
    t5 = load_sd3_t5xxl(files["5-medium"])
    assert clip_l.config.hidden_size == 128 and clip_g.config.hidden_size == 192
    assert t5.config.d_model == TINY_T5_WIDTH
    raw = load_file(files["5-medium"])
    assert torch.equal(clip_g.text_projection.weight, raw["text_encoders.clip_g.transformer.text_projection.weight"])

    separate = load_sd3_clip_g(files["5-medium"], files["clip_g"])
    assert not torch.equal(separate.text_projection.weight, clip_g.text_projection.weight)
    with pytest.raises(ModelFileError, match="no clip_g inside .*--clip_g"):
        load_sd3_clip_g(files["medium"])
    assert load_sd3_t5xxl(files["medium"], required=False) is None
    with pytest.raises(ModelFileError, match="--t5xxl"):
        load_sd3_t5xxl(files["medium"])


def test_tiny_cli_writes_an_all_in_one_set(tmp_path, capsys):
    import json

    from library.tiny.__main__ import main

    main(["sd3", "--variant", "5-large", "--all_in_one", "--out", str(tmp_path), "--dtype", "bf16"])
    written = json.loads(capsys.readouterr().out)
    assert written["variant"] == "5-large" and written["checkpoint"].endswith("sd3.5_large_incl_clips_t5xxl-tiny.safetensors")
    info = inspect_sd3_checkpoint(written["checkpoint"])
    assert info.variant.name == "5-large" and info.dtype == torch.bfloat16 and info.has_vae
    assert set(info.text_encoder_prefixes) == {"clip_l", "clip_g", "t5xxl"}
    inside = load_sd3_clip_g(written["checkpoint"])
    separate = load_sd3_clip_g(None, written["clip_g"])
    assert torch.equal(inside.text_projection.weight, separate.text_projection.weight), "the same weights"
    cache = tmp_path / "tokenizers"
    assert {p.name for p in cache.iterdir()} == {"openai_clip-vit-large-patch14", "google_t5-v1_1-xxl",
                                                 "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"}
