import argparse
import math

import pytest
import torch

from library.errors import ConfigError
from library.training import losses


def test_arguments_and_defaults():
    parser = argparse.ArgumentParser()
    losses.add_loss_arguments(parser)
    args = parser.parse_args([])
    cfg = losses.LossConfig.from_args(args)
    assert cfg == losses.LossConfig("l2", "snr", 0.1, 1.0, flow=False)
    assert cfg.huber_c_for(torch.tensor([500.0])) is None
    assert losses.LossConfig.from_args(args, flow=True).flow
    with pytest.raises(SystemExit):
        parser.parse_args(["--loss_type", "l3"])


@pytest.mark.parametrize("kwargs", [{"huber_c": 0.0}, {"huber_c": 1.5}, {"huber_scale": 0.0}, {"loss_type": "mse"}])
def test_invalid_loss_config(kwargs):
    with pytest.raises(ConfigError):
        losses.LossConfig(**kwargs)


def test_element_losses_by_hand():
    pred = torch.tensor([[3.0, -1.0]]).view(1, 2, 1, 1)
    target = torch.zeros_like(pred)
    c = torch.tensor([0.5])
    assert losses.element_loss(pred, target, "l2").flatten().tolist() == [9.0, 1.0]
    assert losses.element_loss(pred, target, "l1").flatten().tolist() == [3.0, 1.0]
    huber = losses.element_loss(pred, target, "huber", c).flatten()
    smooth = losses.element_loss(pred, target, "smooth_l1", c).flatten()
    expected = [math.sqrt(9.25) - 0.5, math.sqrt(1.25) - 0.5]  # √(d²+c²) − c
    assert huber.tolist() == pytest.approx([2 * 0.5 * e for e in expected])
    assert smooth.tolist() == pytest.approx([2 * e for e in expected])
    with pytest.raises(ValueError):
        losses.element_loss(pred, target, "huber")


def test_huber_c_is_per_sample():
    pred = torch.ones(2, 1, 1, 1) * 2
    elem = losses.element_loss(pred, torch.zeros_like(pred), "huber", torch.tensor([0.1, 1.0]))
    assert elem.flatten().tolist() == pytest.approx([0.2 * (math.sqrt(4.01) - 0.1), 2 * (math.sqrt(5) - 1)])


def test_huber_schedules():
    t = torch.tensor([0.0, 500.0, 1000.0])
    constant = losses.huber_c_per_sample("constant", 0.1, 2.0, t, flow=True)
    assert constant.tolist() == pytest.approx([0.2, 0.2, 0.2])
    exponential = losses.huber_c_per_sample("exponential", 0.1, 2.0, t, flow=True)
    assert exponential.tolist() == pytest.approx([2.0, 2.0 * math.sqrt(0.1), 0.2])  # c^(t/1000)·scale


def test_flow_snr_schedule_uses_the_flow_noise_to_signal_ratio():
    c = 0.1
    sigma = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0])
    result = losses.huber_c_per_sample("snr", c, 3.0, sigma * 1000, flow=True)
    # σ_t = σ/(1−σ) makes (1−c)/(1+σ_t)² + c equal (1−c)(1−σ)² + c; huber_scale is not applied
    assert result.tolist() == pytest.approx(((1 - c) * (1 - sigma) ** 2 + c).tolist(), abs=1e-6)
    assert result[0] == pytest.approx(1.0) and result[-1] == pytest.approx(c)


def test_ddpm_snr_schedule():
    alphas_cumprod = torch.linspace(0.99, 0.01, 1000)
    t = torch.tensor([0, 999])
    result = losses.huber_c_per_sample("snr", 0.1, 1.0, t, flow=False, alphas_cumprod=alphas_cumprod)
    a = alphas_cumprod[t]
    assert torch.allclose(result, 0.9 / (1 + ((1 - a) / a).sqrt()) ** 2 + 0.1)
    with pytest.raises(ValueError):
        losses.huber_c_per_sample("snr", 0.1, 1.0, t, flow=False)


def test_reduce_loss_order_of_operations():
    elem = torch.arange(2 * 2 * 2 * 2, dtype=torch.float32).view(2, 2, 2, 2)
    weighting = torch.tensor([2.0, 0.5])
    mask = torch.tensor([[1.0, 0.0], [0.5, 1.0]]).view(1, 1, 2, 2).expand(2, 1, 2, 2)
    loss_weights = torch.tensor([1.0, 3.0])
    result = losses.reduce_loss(elem, weighting=weighting, mask=mask, loss_weights=loss_weights)
    expected = []
    for b in range(2):
        masked = elem[b] * weighting[b] * mask[b]  # broadcast over channels
        expected.append(masked.sum().item() / masked.numel() * loss_weights[b].item())  # mean, not / mask area
    assert result.shape == (2,)
    assert result.tolist() == pytest.approx(expected)
    assert losses.reduce_loss(elem).tolist() == pytest.approx(elem.mean(dim=(1, 2, 3)).tolist())


def test_reduce_loss_broadcasts_a_spatial_mask_over_middle_dims():
    elem = torch.ones(2, 3, 4, 2, 2)  # (B, C, T, H, W)
    mask = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 2, 2).expand(2, 1, 2, 2)
    assert losses.reduce_loss(elem, mask=mask).tolist() == pytest.approx([0.25, 0.25])


def test_resize_mask_to_latent_uses_area_averaging():
    mask = torch.zeros(1, 16, 16)
    mask[:, :, :8] = 1
    assert losses.resize_mask_to_latent(mask, (2, 2)).view(-1).tolist() == [1.0, 0.0, 1.0, 0.0]
    checker = (torch.arange(16).view(1, 1, 16) + torch.arange(16).view(1, 16, 1)) % 2
    resized = losses.resize_mask_to_latent(checker.float().unsqueeze(1), (4, 4))
    assert resized.shape == (1, 1, 4, 4) and torch.allclose(resized, torch.full((1, 1, 4, 4), 0.5))
    with pytest.raises(ValueError):
        losses.resize_mask_to_latent(torch.zeros(1, 3, 8, 8), (2, 2))


def test_compute_per_sample_loss_combines_the_steps():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    sigmas = torch.tensor([0.3, 0.8])
    weighting, loss_weights = torch.tensor([1.5, 0.5]), torch.tensor([1.0, 2.0])
    mask = torch.rand(2, 1, 8, 8, generator=g)
    cfg = losses.LossConfig(loss_type="huber", huber_schedule="snr", flow=True)
    result = losses.compute_per_sample_loss(cfg, pred, target, sigmas=sigmas, weighting=weighting, mask=mask, loss_weights=loss_weights)
    c = losses.huber_c_per_sample("snr", 0.1, 1.0, sigmas * 1000, flow=True)
    expected = losses.reduce_loss(losses.element_loss(pred, target, "huber", c), weighting=weighting, mask=mask, loss_weights=loss_weights)
    assert torch.allclose(result, expected)
    l2 = losses.compute_per_sample_loss(losses.LossConfig(), pred, target)
    assert torch.allclose(l2, ((pred - target) ** 2).mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError):
        losses.compute_per_sample_loss(cfg, pred, target)
