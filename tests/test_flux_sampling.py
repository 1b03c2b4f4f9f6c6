"""FLUX sampling: packing, ids, the shifted schedule, the Euler/CFG loop and a full tiny image."""

from __future__ import annotations

import math

import pytest
import torch

from library.autoencoders import load_flux_ae
from library.flux.loading import load_flux_dit
from library.flux.sampling import (
    FluxConditioning,
    denoise,
    flux_shift_mu,
    generate_image,
    get_schedule,
    pack_latents,
    packed_noise,
    prepare_img_ids,
    prepare_txt_ids,
    round_image_size,
    unpack_latents,
)
from library.flux.text import FluxTextEncoding
from library.tiny.flux import write_tiny_flux_set


def test_pack_layout_and_round_trip():
    latents = torch.randn(2, 16, 6, 10)
    packed = pack_latents(latents)
    assert packed.shape == (2, 15, 64)
    # token (row r, col c) holds channel-major 2x2 patches: index ch*4 + ph*2 + pw
    r, c, ch, ph, pw = 2, 3, 5, 1, 0
    assert packed[1, r * 5 + c, ch * 4 + ph * 2 + pw] == latents[1, ch, 2 * r + ph, 2 * c + pw]
    assert torch.equal(unpack_latents(packed, 6, 10), latents)


def test_ids_follow_the_packed_grid():
    ids = prepare_img_ids(2, 3, 4)
    assert ids.shape == (2, 12, 3)
    assert ids[0, 7].tolist() == [0.0, 1.0, 3.0]  # token 7 = row 1, col 3, row-major like pack_latents
    assert (ids[..., 0] == 0).all() and torch.equal(ids[0], ids[1])
    txt = prepare_txt_ids(2, 5)
    assert txt.shape == (2, 5, 3) and not txt.any()


def test_mu_is_linear_in_token_count():
    assert flux_shift_mu(256) == pytest.approx(0.5)
    assert flux_shift_mu(4096) == pytest.approx(1.15)   # a 1024x1024 image
    assert flux_shift_mu(1024) == pytest.approx(0.5 + (1.15 - 0.5) * (1024 - 256) / 3840)


def test_schedule_values_by_hand():
    mu = 1.15
    shifted = [1.0] + [math.exp(mu) / (math.exp(mu) + (1 / t - 1)) for t in (0.75, 0.5, 0.25)] + [0.0]
    assert get_schedule(4, 4096) == pytest.approx(shifted, abs=1e-12)
    assert get_schedule(4, 4096)[2] == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1))
    assert get_schedule(4, 4096, shift=False) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])  # schnell
    low = get_schedule(10, 256)
    assert len(low) == 11 and low[0] == 1.0 and low[-1] == 0.0
    assert all(a > b for a, b in zip(low, low[1:]))
    assert get_schedule(10, 4096)[5] > low[5], "larger images spend more steps at high noise"


class ConstantVelocity(torch.nn.Module):
    """v = txt mean per sample (broadcast); records the calls it gets."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance, txt_attention_mask=None):
        self.calls.append(dict(batch=img.shape[0], t=timesteps.clone(), guidance=guidance.clone(),
                               mask=txt_attention_mask))
        return txt.mean(dim=(1, 2))[:, None, None].expand_as(img)


def _cond(value, batch=1, mask=False):
    txt = torch.full((batch, 4, 8), float(value))
    return FluxConditioning(txt=txt, txt_ids=prepare_txt_ids(batch, 4), vec=torch.zeros(batch, 8),
                            txt_mask=torch.ones(batch, 4, dtype=torch.long) if mask else None)


def test_euler_steps_integrate_the_velocity():
    model = ConstantVelocity()
    x0 = torch.randn(1, 6, 64)
    pos = _cond(2.0)
    ts = get_schedule(3, 6)
    steps = []
    out = denoise(model, x0, prepare_img_ids(1, 2, 3), pos.txt, pos.txt_ids, pos.vec, None, ts, guidance=3.5,
                  progress=False, before_step=steps.append)
    assert torch.allclose(out, x0 + (0.0 - 1.0) * 2.0)  # sum of (t_next - t_cur) = -1
    assert steps == [0, 1, 2]
    assert [c["t"].item() for c in model.calls] == pytest.approx(ts[:-1])
    assert all(c["guidance"].item() == 3.5 for c in model.calls)


def test_cfg_runs_negative_and_positive_batched():
    model = ConstantVelocity()
    x0 = torch.zeros(1, 4, 64)
    pos, neg = _cond(2.0, mask=True), _cond(-1.0, mask=True)
    out = denoise(model, x0, prepare_img_ids(1, 2, 2), pos.txt, pos.txt_ids, pos.vec, pos.txt_mask, [1.0, 0.5, 0.0],
                  guidance=1.0, neg=neg, cfg_scale=4.0, progress=False)
    guided = -1.0 + 4.0 * (2.0 - (-1.0))
    assert torch.allclose(out, torch.full_like(out, -guided))
    assert all(c["batch"] == 2 and c["mask"].shape == (2, 4) for c in model.calls)
    with pytest.raises(ValueError, match="negative"):
        denoise(model, x0, prepare_img_ids(1, 2, 2), pos.txt, pos.txt_ids, pos.vec, None, [1.0, 0.0], 1.0,
                cfg_scale=2.0, progress=False)


def test_sample_size_rules_and_noise_shape():
    assert round_image_size(1000, 50) == (992, 64)
    noise = packed_noise(96, 64, seed=3, device="cpu")
    assert noise.shape == (1, 4 * 6, 64)
    assert torch.equal(noise, packed_noise(96, 64, seed=3, device="cpu"))


@pytest.mark.parametrize("variant", ["schnell", "chroma"])
def test_generate_image_end_to_end(tmp_path, variant):
    paths = write_tiny_flux_set(tmp_path, variant=variant)
    model, info = load_flux_dit(paths.dit, model_type="chroma" if variant == "chroma" else "flux")
    ae = load_flux_ae(paths.ae)
    chroma = variant == "chroma"
    encoding = FluxTextEncoding.from_files(clip_l_path=paths.clip_l, t5xxl_path=paths.t5xxl, t5_max_length=16,
                                           apply_t5_attn_mask=chroma, tokenizer_cache_dir=paths.tokenizer_cache_dir)
    with torch.no_grad():
        pos = encoding.encode(["a photo of a cat"]).conditioning(chroma)
        neg = encoding.encode([""]).conditioning(chroma)
    kwargs = dict(width=96, height=64, steps=3, seed=7, shift=variant != "schnell", progress=False)
    image = generate_image(model, ae, pos, **kwargs)
    assert image.size == (96, 64) and image.mode == "RGB"
    assert image.tobytes() == generate_image(model, ae, pos, **kwargs).tobytes(), "seeded sampling repeats"
    other = generate_image(model, ae, pos, **(kwargs | {"seed": 8}))
    assert image.tobytes() != other.tobytes()
    guided = generate_image(model, ae, pos, neg=neg, cfg_scale=3.0, **kwargs)
    assert guided.tobytes() != image.tobytes()
