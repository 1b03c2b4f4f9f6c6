"""The LDM KL autoencoder: parity with diffusers' AutoencoderKL, FLUX scaling, loading and
refusals, tiled and sliced decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from library.autoencoders import (
    FLUX_AE_SCALING,
    SD_VAE_SCALING,
    AutoEncoder,
    AutoEncoderConfig,
    decode_tiled,
    run_tiled,
    load_autoencoder,
    load_flux_ae,
)
from library.errors import ModelFileError
from library.safetensors_io import load_file, save_file_atomic
from library.tiny.flux import TINY_AE_CONFIG, random_autoencoder, write_ae, write_flux_dit

TOL = 1e-5


def _diffusers_config(cfg: AutoEncoderConfig) -> dict:
    n = len(cfg.ch_mult)
    return dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels, down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=[cfg.ch * m for m in cfg.ch_mult],
                layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels, norm_num_groups=32,
                use_quant_conv=cfg.use_quant_conv, use_post_quant_conv=cfg.use_quant_conv,
                scaling_factor=cfg.scale_factor, shift_factor=cfg.shift_factor)


@pytest.fixture(scope="module", params=[TINY_AE_CONFIG, AutoEncoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                                                                           z_channels=4, use_quant_conv=True)],
                ids=["flux_layout", "sd_layout_with_quant_conv"])
def pair(request):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ours = random_autoencoder(request.param, seed=3).eval()
    config = _diffusers_config(request.param)
    ref = AutoencoderKL(**config)
    ref.load_state_dict(convert_ldm_vae_checkpoint(dict(ours.state_dict()), config), strict=True)
    return ours, ref.eval()


@pytest.mark.parametrize("h,w", [(64, 64), (48, 80), (40, 24)])
@torch.no_grad()
def test_encode_moments_match_diffusers(pair, h, w):
    ours, ref = pair
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h + w)) * 2 - 1
    moments = ours.encode_moments(x)
    expected = ref.encode(x).latent_dist
    assert moments.mean.shape == (2, ours.config.z_channels, h // ours.config.downscale, w // ours.config.downscale)
    assert moments.mean.std() > 0.05
    assert (moments.mean - expected.mean).abs().max() <= TOL
    assert (moments.logvar - expected.logvar).abs().max() <= TOL


@pytest.mark.parametrize("h,w", [(8, 8), (6, 10)])
@torch.no_grad()
def test_decode_matches_diffusers(pair, h, w):
    ours, ref = pair
    z = torch.randn(2, ours.config.z_channels, h, w, generator=torch.Generator().manual_seed(h * w))
    image = ours.decode(ours.scale_latents(z))
    expected = ref.decode(z).sample
    assert image.shape == (2, 3, h * ours.config.downscale, w * ours.config.downscale)
    assert image.std() > 0.05
    assert (image - expected).abs().max() <= TOL * 10  # the scale/unscale round trip adds float rounding
    if not ours.config.use_quant_conv:
        assert (ours._decode_raw(z) - expected).abs().max() <= TOL


@torch.no_grad()
def test_flux_scaling_is_applied_inside_encode_and_decode():
    ae = random_autoencoder(seed=1).eval()
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    mean = ae.encode_moments(x).mean
    assert torch.allclose(ae.encode(x, sample=False), 0.3611 * (mean - 0.1159))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    sampled = ae.encode(x, generator=g1)
    assert torch.equal(sampled, ae.encode(x, sample=True, generator=g2)), "sampling follows the generator"
    assert not torch.allclose(sampled, ae.encode(x, sample=False)), "encode samples by default"
    assert torch.allclose(ae.decode(ae.encode(x, sample=False)), ae._decode_raw(mean), atol=1e-4)


def test_load_flux_ae_infers_the_architecture(tmp_path):
    path = write_ae(tmp_path / "ae.safetensors", seed=2)
    ae = load_flux_ae(path)
    assert ae.config == TINY_AE_CONFIG
    assert (ae.config.scale_factor, ae.config.shift_factor) == (0.3611, 0.1159)
    state = load_file(path)
    assert all(torch.equal(v, state[k]) for k, v in ae.state_dict().items())
    assert not any(p.requires_grad for p in ae.parameters())
    half = load_flux_ae(path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


@pytest.mark.parametrize("prefix", ["vae.", "first_stage_model."])
def test_prefixed_all_in_one_files_load(tmp_path, prefix):
    path = write_ae(tmp_path / "aio.safetensors", seed=2, prefix=prefix)
    extra = load_file(path) | {"model.diffusion_model.img_in.weight": torch.zeros(4, 4)}
    save_file_atomic(extra, path)
    ae = load_flux_ae(path)
    assert ae.config.ch == TINY_AE_CONFIG.ch


def test_wrong_files_are_refused(tmp_path):
    dit = write_flux_dit(tmp_path / "dit.safetensors", "schnell")
    with pytest.raises(ModelFileError, match="looks like a FLUX.1 DiT"):
        load_flux_ae(dit)
    sd_vae = write_ae(tmp_path / "sd_vae.safetensors", config=AutoEncoderConfig(ch=32, ch_mult=(1, 2), z_channels=4,
                                                                                use_quant_conv=True))
    with pytest.raises(ModelFileError, match="4 latent channels, but the FLUX AE has 16"):
        load_flux_ae(sd_vae)
    assert load_autoencoder(sd_vae, SD_VAE_SCALING).config.use_quant_conv
    diffusers_layout = tmp_path / "diffusers_vae.safetensors"
    save_file_atomic({k: torch.zeros(1) for k in ("encoder.conv_in.weight", "decoder.conv_in.weight",
                                                  "encoder.down_blocks.0.resnets.0.conv1.weight")}, diffusers_layout)
    with pytest.raises(ModelFileError, match="diffusers layout"):
        load_flux_ae(diffusers_layout)


def test_downsample_pads_right_and_bottom_only():
    ae = random_autoencoder(seed=0)
    down = ae.encoder.down[0].downsample
    x = torch.randn(1, down.conv.in_channels, 8, 8)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    assert torch.equal(down(x), expected)
    assert down(x).shape[-2:] == (4, 4)


def test_tiled_blending_is_exact_for_a_pixelwise_decoder():
    def pixelwise(z):  # every output pixel depends only on its own latent: tiles must agree exactly
        return F.interpolate(z[:, :3] * 2 + 1, scale_factor=8, mode="nearest")

    z = torch.randn(2, 16, 21, 30)
    tiled = decode_tiled(pixelwise, z, tile=8, overlap=3, scale=8)
    assert tiled.shape == (2, 3, 168, 240)
    assert torch.allclose(tiled, pixelwise(z), atol=1e-6)
    with pytest.raises(ValueError, match="overlap"):
        decode_tiled(pixelwise, z, tile=8, overlap=8, scale=8)


@torch.no_grad()
def test_tiling_and_slicing_on_the_real_decoder():
    ae = random_autoencoder(seed=4).eval()
    latents = torch.randn(2, 16, 12, 16)
    full = ae.decode(latents)
    assert torch.equal(ae.decode(latents, tile_size=16), full), "a tile covering the image is a plain decode"
    tiled = ae.decode(latents, tile_size=8, tile_overlap=4)
    assert tiled.shape == full.shape and torch.isfinite(tiled).all()
    assert (tiled - full).abs().mean() < full.abs().mean(), "tiles approximate the one-piece decode"
    ae.enable_slicing()
    assert torch.allclose(ae.decode(latents), full, atol=1e-5)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    sliced = ae.encode_moments(x).mean
    ae.disable_slicing()
    assert torch.allclose(sliced, ae.encode_moments(x).mean, atol=1e-5)
    ae.enable_tiling(tile_size=8, tile_overlap=4)
    assert torch.equal(ae.decode(latents), tiled)
    ae.disable_tiling()


def test_flux_preset_values():
    flux = FLUX_AE_SCALING
    assert (flux.scale_factor, flux.shift_factor, flux.z_channels) == (0.3611, 0.1159, 16)
    full = AutoEncoderConfig()
    assert (full.ch, full.ch_mult, full.num_res_blocks, full.z_channels) == (128, (1, 2, 4, 4), 2, 16)
    assert full.downscale == 8
    with torch.device("meta"):
        keys = set(AutoEncoder(full).state_dict())
    for key in ("encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.mid.attn_1.q.weight",
                "decoder.up.3.block.0.conv1.weight", "decoder.conv_out.weight", "encoder.down.2.downsample.conv.weight",
                "decoder.up.1.upsample.conv.weight", "decoder.up.3.block.2.conv2.weight"):
        assert key in keys, key
    assert "encoder.down.3.downsample.conv.weight" not in keys and "decoder.up.0.upsample.conv.weight" not in keys


def test_tiled_encoding_blends_exactly_for_a_pixelwise_encoder():
    def pooled(x):  # each latent pixel depends only on its own 8x8 patch
        return F.avg_pool2d(x, 8).repeat(1, 2, 1, 1)

    x = torch.randn(2, 3, 168, 240)
    tiled = run_tiled(pooled, x, tile=64, overlap=24, up=1, down=8)
    assert tiled.shape == (2, 6, 21, 30)
    assert torch.allclose(tiled, pooled(x), atol=1e-6)
    with pytest.raises(ValueError, match="multiples of 8"):
        run_tiled(pooled, x, tile=60, overlap=24, up=1, down=8)


@torch.no_grad()
def test_tiled_encoding_on_the_real_encoder():
    ae = random_autoencoder(seed=4).eval()
    x = torch.rand(1, 3, 96, 128) * 2 - 1
    full = ae.encode_moments(x).mean
    ae.enable_tiling(tile_size=16, tile_overlap=4)            # covers the image: one piece
    assert torch.equal(ae.encode_moments(x).mean, full)
    ae.enable_tiling(tile_size=8, tile_overlap=4)
    tiled = ae.encode_moments(x).mean
    assert tiled.shape == full.shape and torch.isfinite(tiled).all()
    assert (tiled - full).abs().mean() < full.abs().mean()


@torch.no_grad()
def test_out_of_memory_retries_in_tiles_once_noted(monkeypatch, capsys):
    ae = random_autoencoder(seed=4).eval()
    ae.oom_tile_size = 8
    latents = torch.randn(1, 16, 12, 16)
    expected = ae.decode(latents, tile_size=8, tile_overlap=2)
    real = ae._decode_raw

    def small_card(z):  # "runs out of memory" above 8x8 latent pixels
        if max(z.shape[-2:]) > 8:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(z)

    monkeypatch.setattr(ae, "_decode_raw", small_card)
    assert torch.equal(ae.decode(latents), expected)
    assert "out of GPU memory for a one-piece VAE decode" in capsys.readouterr().out
    ae.decode(latents)
    assert capsys.readouterr().out == ""                       # said once
    ae.oom_tile_size = None
    with pytest.raises(torch.OutOfMemoryError):
        ae.decode(latents)


@torch.no_grad()
def test_encode_out_of_memory_tiles_only_on_latent_pixel_borders(monkeypatch):
    ae = random_autoencoder(seed=4).eval()
    ae.oom_tile_size = 4                                       # 32 image pixels
    real = ae._encode_raw

    def small_card(x):
        if max(x.shape[-2:]) > 32:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x)

    x = torch.rand(1, 3, 64, 48) * 2 - 1
    expected = ae.encode_moments(x)
    monkeypatch.setattr(ae, "_encode_raw", small_card)
    tiled = ae.encode_moments(x).mean
    assert tiled.shape == expected.mean.shape and torch.isfinite(tiled).all()
    with pytest.raises(torch.OutOfMemoryError):                # 60 is not a multiple of 8: no tiles
        ae.encode_moments(torch.rand(1, 3, 60, 48))
