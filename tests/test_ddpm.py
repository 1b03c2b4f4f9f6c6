"""DDPM training math (SD 1.x / 2.x): the schedule, noising and v targets against diffusers'
DDPMScheduler, zero terminal SNR, the SNR loss weights by hand, option checks, and the
snr Huber schedule with the DDPM ᾱ carried by LossConfig."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from library.errors import ConfigError
from library.training import ddpm
from library.training.losses import LossConfig, compute_per_sample_loss


def parse(*argv: str):
    parser = argparse.ArgumentParser()
    parser.add_argument("--v_parameterization", action="store_true")
    ddpm.add_ddpm_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_schedule_noising_and_velocity_match_diffusers(zero_terminal_snr):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        rescale_betas_zero_snr=zero_terminal_snr)
    ours = ddpm.DDPMSchedule.sd(zero_terminal_snr=zero_terminal_snr)
    assert torch.allclose(ours.betas, ref.betas, atol=1e-7)
    assert torch.allclose(ours.alphas_cumprod, ref.alphas_cumprod, atol=1e-7)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 250, 777, 999])
    assert torch.allclose(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6)
    assert torch.allclose(ours.velocity(x0, noise, t), ref.get_velocity(x0, noise, t), atol=1e-6)
    if zero_terminal_snr:
        assert ours.alphas_cumprod[-1] == 0 and ours.snr(torch.tensor([999])).item() == 0
        assert torch.equal(ours.add_noise(x0, noise, t)[3], noise[3])   # the last step is pure noise


def test_snr_loss_weights_by_hand():
    schedule = ddpm.DDPMSchedule.sd()
    t = torch.tensor([0, 100, 500, 999])
    snr = schedule.snr(t)
    capped = snr.clamp(max=1000)

    def weights(*argv):
        return ddpm.loss_weights(ddpm.DDPMConfig.from_args(parse(*argv)), schedule, t)

    assert weights() is None
    assert torch.allclose(weights("--min_snr_gamma", "5"), snr.clamp(max=5) / snr)
    assert torch.allclose(weights("--min_snr_gamma", "5", "--v_parameterization"), snr.clamp(max=5) / (snr + 1))
    assert torch.allclose(weights("--v_parameterization", "--scale_v_pred_loss_like_noise_pred"), capped / (capped + 1))
    assert torch.allclose(weights("--v_pred_like_loss", "0.5"), 1 + 0.5 * (capped + 1) / capped)
    assert torch.allclose(weights("--debiased_estimation_loss"), 1 / capped.sqrt())
    assert torch.allclose(weights("--debiased_estimation_loss", "--v_parameterization"), 1 / (capped + 1))
    both = weights("--min_snr_gamma", "5", "--debiased_estimation_loss")
    assert torch.allclose(both, snr.clamp(max=5) / snr / capped.sqrt())   # factors multiply, as in sd-scripts
    assert snr[0] > 1000 and capped[0] == 1000


def test_min_snr_with_zero_terminal_snr_has_no_nan():
    schedule = ddpm.DDPMSchedule.sd(zero_terminal_snr=True)
    t = torch.tensor([10, 999])
    eps = ddpm.loss_weights(ddpm.DDPMConfig.from_args(parse("--min_snr_gamma", "5", "--zero_terminal_snr")), schedule, t)
    assert eps.tolist()[1] == 1.0 and torch.isfinite(eps).all()   # the limit of min(snr, γ)/snr at snr -> 0
    v = ddpm.loss_weights(ddpm.DDPMConfig.from_args(parse("--min_snr_gamma", "5", "--zero_terminal_snr",
                                                          "--v_parameterization")), schedule, t)
    assert v.tolist()[1] == 0.0


@pytest.mark.parametrize("argv, message", [
    (("--min_timestep", "500", "--max_timestep", "400"), "min_timestep < max_timestep"),
    (("--noise_offset_random_strength",), "needs --noise_offset"),
    (("--adaptive_noise_scale", "0.1"), "needs --noise_offset"),
    (("--multires_noise_iterations", "0"), "must be >= 1"),
    (("--scale_v_pred_loss_like_noise_pred",), "needs --v_parameterization"),
    (("--v_pred_like_loss", "0.1", "--v_parameterization"), "remove it"),
    (("--zero_terminal_snr", "--debiased_estimation_loss"), "infinite"),
    (("--min_snr_gamma", "0"), "must be > 0"),
])
def test_bad_options_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        ddpm.DDPMConfig.from_args(parse(*argv))


def test_timesteps_on_the_device_and_the_schedule_copied_once(monkeypatch):
    # --cuda_graph: timesteps drawn where the step runs (no CPU draw, no host copy), in range;
    # the schedule's ᾱ copied to a device once, not each step.
    cfg = ddpm.DDPMConfig.from_args(parse("--min_timestep", "100", "--max_timestep", "200"))
    drawn_on = []
    real_randint = torch.randint
    monkeypatch.setattr(torch, "randint", lambda *a, **k: drawn_on.append(k.get("device")) or real_randint(*a, **k))
    t = ddpm.sample_timesteps(cfg, 500, device="cpu", on_device=True)
    assert drawn_on == ["cpu"] and t.min() >= 100 and t.max() < 200
    ddpm.sample_timesteps(cfg, 4)
    assert drawn_on[-1] is None, "without the option: drawn by the CPU generator, then moved (sd-scripts' stream)"
    schedule = ddpm.DDPMSchedule.sd()
    x = torch.randn(3, 4, 2, 2)
    first = schedule.add_noise(x, x, t[:3])
    copies = dict(schedule._alphas_on)
    schedule.velocity(x, x, t[:3]), schedule.snr(t[:3]), schedule.add_noise(x, x, t[:3])
    assert len(copies) == 1 and all(schedule._alphas_on[k] is v for k, v in copies.items())
    assert torch.equal(first, schedule.add_noise(x, x, t[:3]))


def test_timesteps_stay_in_range_and_noise_options_apply():
    cfg = ddpm.DDPMConfig.from_args(parse("--min_timestep", "100", "--max_timestep", "200"))
    t = ddpm.sample_timesteps(cfg, 1000)
    assert t.min() >= 100 and t.max() < 200 and t.dtype == torch.long
    latents = torch.randn(2, 4, 16, 16)
    noise = torch.randn_like(latents)
    plain = ddpm.DDPMConfig.from_args(parse())
    assert ddpm.noise_with_options(plain, noise, latents) is noise
    assert ddpm.input_noise(plain, noise) is noise
    offset = ddpm.noise_with_options(ddpm.DDPMConfig.from_args(parse("--noise_offset", "0.5")), noise, latents)
    shift = offset - noise
    assert shift.std(dim=(2, 3)).max() < 1e-6 and shift.abs().mean() > 0.05   # one offset per sample and channel
    pyramid = ddpm.noise_with_options(ddpm.DDPMConfig.from_args(parse("--multires_noise_iterations", "4")), noise,
                                      latents)
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-4) and not torch.equal(pyramid, noise)
    gamma = ddpm.input_noise(ddpm.DDPMConfig.from_args(parse("--ip_noise_gamma", "0.1")), noise)
    assert 0.05 < (gamma - noise).std() < 0.15


def test_snr_huber_schedule_uses_the_ddpm_alphas():
    schedule = ddpm.DDPMSchedule.sd()
    args = argparse.Namespace(loss_type="huber", huber_schedule="snr", huber_c=0.1, huber_scale=1.0)
    cfg = LossConfig.from_args(args, alphas_cumprod=schedule.alphas_cumprod)
    t = torch.tensor([0, 999])
    c = cfg.huber_c_for(t)
    a = schedule.alphas_cumprod[t]
    expected = (1 - 0.1) / (1 + ((1 - a) / a).sqrt()) ** 2 + 0.1
    assert torch.allclose(c, expected)
    assert c[0] > 0.9 and c[1] < 0.11   # clean steps near 1 (L2-like), noisy steps near c
    pred = torch.ones(2, 4, 2, 2)
    loss = compute_per_sample_loss(cfg, pred, torch.zeros_like(pred), timesteps=t)
    assert torch.allclose(loss, 2 * c * (torch.sqrt(1 + c**2) - c))
    assert math.isfinite(LossConfig.from_args(args, alphas_cumprod=ddpm.DDPMSchedule.sd(True).alphas_cumprod)
                         .huber_c_for(t)[1].item())
