"""Qwen-Image VAE: both key layouts (checked against diffusers' own Wan converter), encode/decode
against diffusers' AutoencoderKLQwenImage, the memory options, .pth with weights_only, refusals."""

from __future__ import annotations

import pytest
import torch

from library.anima.vae import (LATENTS_MEAN, LATENTS_STD, QwenImageVAEConfig, from_wan, load_qwen_image_vae,
                               to_wan)
from library.errors import ConfigError, ModelFileError
from library.safetensors_io import load_file, save_file_atomic
from library.tiny import anima as tiny
from library.tiny.flux import write_ae

TOL = 1e-5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    return dict(wan=tiny.write_vae(d / "wan.safetensors", seed=3),
                diffusers=tiny.write_vae(d / "diffusers.safetensors", seed=3, layout="diffusers"), dir=d)


@pytest.fixture(scope="module")
def reference():
    return tiny.random_vae(seed=3)


def _images(n=2, h=48, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1


def test_our_wan_adapter_agrees_with_diffusers_converter(files, reference):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    wan = load_file(files["wan"])
    assert "conv1.weight" in wan and "decoder.upsamples.3.resample.1.weight" in wan and "decoder.head.2.bias" in wan
    ours = from_wan(wan)
    theirs = convert_wan_vae_to_diffusers(dict(wan))
    assert ours.keys() == theirs.keys() == reference.state_dict().keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert to_wan(ours, tiny.TINY_VAE_CONFIG).keys() == wan.keys()  # round trip


def test_config_from_full_size_shapes():
    with torch.device("meta"):
        model = QwenImageVAEConfig().build()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert QwenImageVAEConfig.from_shapes(shapes) == QwenImageVAEConfig()
    assert shapes["encoder.conv_in.weight"][0] == 96 and shapes["post_quant_conv.weight"][0] == 16


@pytest.mark.parametrize("layout", ["wan", "diffusers"])
def test_encode_decode_match_diffusers(files, reference, layout):
    vae = load_qwen_image_vae(files[layout])
    images = _images()
    mean = torch.tensor(LATENTS_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(LATENTS_STD).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        mode = reference.encode(images.unsqueeze(2)).latent_dist.mode()
        expected = ((mode - mean) / std).squeeze(2)
        latents = vae.encode(images)
        assert latents.shape == (2, 16, 6, 5)
        assert (latents - expected).abs().max().item() <= TOL
        decoded_ref = reference.decode(latents.unsqueeze(2) * std + mean).sample.squeeze(2).clamp(-1, 1)
        decoded = vae.decode(latents)
    assert decoded.shape == images.shape
    assert (decoded - decoded_ref).abs().max().item() <= TOL


def test_memory_options_do_not_change_results(files):
    images = _images(1, 64, 56, seed=1)
    base = load_qwen_image_vae(files["wan"])
    lean = load_qwen_image_vae(files["wan"], chunk_size=3, disable_cache=True)
    assert lean.chunk_size == 3 and not lean.use_cache
    with torch.no_grad():
        z_base, z_lean = base.encode(images), lean.encode(images)
        assert (z_base - z_lean).abs().max().item() <= TOL
        assert (base.decode(z_base) - lean.decode(z_base)).abs().max().item() <= TOL
        lean.set_chunk_size(None)  # back to plain convolutions
        assert (lean.encode(images) - z_base).abs().max().item() <= TOL
    with pytest.raises(ConfigError, match="--vae_chunk_size must be a positive"):
        base.set_chunk_size(0)


def test_pth_loads_with_weights_only(files, tmp_path):
    state = load_file(files["wan"])
    torch.save(state, tmp_path / "vae.pth")
    vae = load_qwen_image_vae(tmp_path / "vae.pth")
    images = _images(1, 16, 16)
    with torch.no_grad():
        assert torch.equal(vae.encode(images), load_qwen_image_vae(files["wan"]).encode(images))


class _NotATensor:
    pass


def test_pth_with_code_is_refused(tmp_path):
    torch.save({"x": _NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(ModelFileError, match="weights_only loading"):
        load_qwen_image_vae(tmp_path / "evil.pth")


def test_flux_ae_is_refused_by_name(tmp_path):
    path = write_ae(tmp_path / "ae.safetensors")
    with pytest.raises(ModelFileError, match=r"expected the Qwen-Image VAE.*an autoencoder \(VAE, e\.g\. ae"):
        load_qwen_image_vae(path)


def test_other_latent_width_is_refused(tmp_path):
    config = QwenImageVAEConfig(base_dim=16, z_dim=4)
    path = tiny.write_vae(tmp_path / "z4.safetensors", config=config, layout="diffusers")
    with pytest.raises(ModelFileError, match="4 latent channels; Anima's Qwen-Image VAE has 16"):
        load_qwen_image_vae(path)


def test_dtype_and_prefix(files, tmp_path):
    state = load_file(files["diffusers"])
    save_file_atomic({f"vae.{k}": v for k, v in state.items()}, tmp_path / "prefixed.safetensors")
    vae = load_qwen_image_vae(tmp_path / "prefixed.safetensors", dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16
    out = vae.encode(_images(1, 16, 16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
