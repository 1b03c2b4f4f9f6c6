"""Lumina sampling: diffusers' shifted Euler schedule, reversed model time, CFG truncation and
renormalisation, and a tiny end-to-end image."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from library.lumina.sampling import (LuminaConditioning, denoise, generate_image, get_sigmas, guided_prediction,
                                     round_image_size)


@pytest.mark.parametrize("steps", [1, 4, 38])
def test_schedule_equals_flow_match_euler_with_shift_6(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=6.0)
    scheduler.set_timesteps(steps)
    ours = get_sigmas(steps)
    assert len(ours) == steps + 1 and ours[0] == 1.0 and ours[-1] == 0.0
    assert torch.allclose(torch.tensor(ours), scheduler.sigmas.float(), atol=1e-6)


class Recorder(nn.Module):
    """Predicts a velocity that depends on the caption (its mean) and records every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, cap, mask):
        self.calls.append((x.shape[0], t.tolist()))
        per_sample = (cap.mean(-1) * mask).sum(1) / mask.sum(1)
        return torch.ones_like(x) * per_sample[:, None, None, None]


def _cond(value: float, length: int, total: int = 8) -> LuminaConditioning:
    mask = (torch.arange(total) < length).long()[None]
    return LuminaConditioning(hidden_state=torch.full((1, total, 4), value), attention_mask=mask)


def test_cfg_runs_only_while_the_model_time_is_below_ctr():
    model = Recorder()
    sigmas = get_sigmas(10)
    x = denoise(model, torch.zeros(1, 16, 2, 2), _cond(2.0, 3), sigmas, neg=_cond(1.0, 5, total=6), cfg_scale=4.0,
                cfg_trunc_ratio=0.25, renorm_cfg=0.0, progress=False)
    guided = [1 - s < 0.25 for s in sigmas[:-1]]
    assert 0 < sum(guided) < len(guided)
    assert [batch for batch, _ in model.calls] == [2 if g else 1 for g in guided]
    for (_, times), sigma in zip(model.calls, sigmas):
        assert times == pytest.approx([1 - sigma] * len(times)), "the model is fed t = 1 - sigma"
    # Euler on sigma with the negated prediction: guided v = 1 + 4 (2 - 1) = 5, plain v = 2.
    expected = sum((s1 - s0) * -(5.0 if g else 2.0) for (s0, s1), g in zip(zip(sigmas, sigmas[1:]), guided))
    assert torch.allclose(x, torch.full_like(x, expected), atol=1e-5)


def test_renormalisation_caps_each_sample_at_renorm_times_the_conditional_norm():
    cond = torch.stack((torch.ones(2, 3), torch.full((2, 3), 10.0)))
    uncond = torch.zeros_like(cond)
    guided = guided_prediction(cond, uncond, 3.0, renorm_cfg=1.5)
    assert torch.allclose(guided[0].norm(), 1.5 * cond[0].norm())
    assert torch.allclose(guided[1].norm(), 1.5 * cond[1].norm())
    assert torch.allclose(guided_prediction(cond, uncond, 1.2, renorm_cfg=1.5), 1.2 * cond), "under the cap: kept"
    assert torch.allclose(guided_prediction(cond, uncond, 3.0, renorm_cfg=0.0), 3.0 * cond), "0 turns it off"


def test_scale_one_skips_the_negative_pass_but_still_renormalises():
    model = Recorder()
    denoise(model, torch.zeros(1, 16, 2, 2), _cond(2.0, 3), get_sigmas(4), neg=_cond(1.0, 3), cfg_scale=1.0,
            cfg_trunc_ratio=1.0, progress=False)
    assert all(batch == 1 for batch, _ in model.calls)
    with pytest.raises(ValueError, match="needs a negative conditioning"):
        denoise(model, torch.zeros(1, 16, 2, 2), _cond(2.0, 3), get_sigmas(4), progress=False)


def test_tiny_image_end_to_end(tmp_path):
    from library.autoencoders import load_flux_ae
    from library.lumina.loading import load_lumina_dit
    from library.lumina.text import LuminaTextEncoding
    from library.tiny.lumina import write_tiny_lumina_set

    paths = write_tiny_lumina_set(tmp_path, seed=2)
    dit, _ = load_lumina_dit(paths.dit)
    ae = load_flux_ae(paths.ae)
    text = LuminaTextEncoding.from_files(gemma2_path=paths.gemma2, max_length=32, system_prompt="You are an assistant.")
    with torch.no_grad():
        pos, neg = text.encode(["a red cat"]), text.encode([""], add_system_prompt=False)
    cond = LuminaConditioning(pos.hidden_state, pos.attention_mask)
    uncond = LuminaConditioning(neg.hidden_state, neg.attention_mask)
    kwargs = dict(width=72, height=40, steps=3, seed=5, progress=False)
    image = generate_image(dit, ae, cond, neg=uncond, **kwargs)
    assert image.size == round_image_size(72, 40) == (64, 64)
    again = generate_image(dit, ae, cond, neg=uncond, **kwargs)
    assert list(image.getdata()) == list(again.getdata()), "a seed gives the same image"
    no_cfg = generate_image(dit, ae, cond, **kwargs)
    assert list(image.getdata()) != list(no_cfg.getdata())
