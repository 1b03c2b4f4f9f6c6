"""Training math of the DDPM families (SD 1.x / 2.x): noise schedule, noising, targets, noise
options and the SNR-based loss weights (FORMATS 3.4).

Schedule: 1000 steps, betas scaled_linear from 0.00085 to 0.012 (computed in float32 as
diffusers' DDPMScheduler does), optionally rescaled to zero terminal SNR (Lin et al. 2023,
--zero_terminal_snr). ᾱ_t is the cumulative product of 1 − β, snr_t = ᾱ_t / (1 − ᾱ_t).

Per step: t ~ randint(--min_timestep or 0, --max_timestep or 1000); ε ~ N(0,1) plus the noise
options (--noise_offset [random strength, adaptive scale], --multires_noise_*), used for input
and target alike; x_t = √ᾱ·x0 + √(1−ᾱ)·(ε + γ·ξ) with --ip_noise_gamma γ (input only); target ε,
or the velocity √ᾱ·ε − √(1−ᾱ)·x0 with --v_parameterization.

Loss weights, multiplied per sample in sd-scripts' order (all are per-sample factors):
--min_snr_gamma γ: min(snr, γ)/snr (ε) or min(snr, γ)/(snr + 1) (v);
--scale_v_pred_loss_like_noise_pred: snr/(snr + 1), snr capped at 1000;
--v_pred_like_loss λ: 1 + λ·(snr + 1)/snr (the loss plus λ·loss divided by the previous factor);
--debiased_estimation_loss: 1/√snr (ε) or 1/(snr + 1) (v), snr capped at 1000.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from library.errors import ConfigError
from library.training.flow_matching import noise_option_problems, pyramid_noise

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012
SNR_CAP = 1000.0


def add_ddpm_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the DDPM noise, timestep and loss-weighting options (SD 1.x / 2.x)."""
    g = parser.add_argument_group("DDPM noise, timesteps and loss weighting")
    g.add_argument("--zero_terminal_snr", action="store_true",
                   help="rescale the betas so the last timestep is pure noise (Lin et al. 2023); use with "
                        "--v_parameterization")
    g.add_argument("--min_timestep", type=int, default=None, help="smallest timestep trained on (0-999). Default 0.")
    g.add_argument("--max_timestep", type=int, default=None,
                   help="timesteps are drawn below this (1-1000). Default 1000.")
    g.add_argument("--noise_offset", type=float, default=None,
                   help="add offset·N(0,1) per sample and channel to the noise, so the model can learn very dark "
                        "or bright images; about 0.05-0.1. Default: off.")
    g.add_argument("--noise_offset_random_strength", action="store_true",
                   help="use offset·U(0,1) (one draw per batch) instead of offset. Needs --noise_offset.")
    g.add_argument("--adaptive_noise_scale", type=float, default=None,
                   help="add scale·|mean of each latent channel| to the noise offset (clamped at 0). Needs "
                        "--noise_offset.")
    g.add_argument("--multires_noise_iterations", type=int, default=None,
                   help="pyramid (multi-resolution) noise: add this many upsampled lower-resolution noise levels, "
                        "then renormalise; 6-10 is typical. Default: off.")
    g.add_argument("--multires_noise_discount", type=float, default=0.3,
                   help="weight of level i is discount**i (with --multires_noise_iterations). Default 0.3.")
    g.add_argument("--ip_noise_gamma", type=float, default=None,
                   help="input perturbation: noise the input with ε + γ·ξ while the target keeps ε; about 0.1. "
                        "Default: off.")
    g.add_argument("--ip_noise_gamma_random_strength", action="store_true",
                   help="use γ·U(0,1) (one draw per batch) instead of γ. Needs --ip_noise_gamma.")
    g.add_argument("--min_snr_gamma", type=float, default=None,
                   help="Min-SNR weighting: weight each timestep by min(snr, γ)/snr (ε) or min(snr, γ)/(snr+1) "
                        "(v); 5 is the paper's value. Default: off.")
    g.add_argument("--scale_v_pred_loss_like_noise_pred", action="store_true",
                   help="with --v_parameterization, scale the loss by snr/(snr+1) so it weighs timesteps like an "
                        "ε-prediction loss")
    g.add_argument("--v_pred_like_loss", type=float, default=None,
                   help="add λ·loss·(snr+1)/snr, a v-prediction-like term, to an ε-prediction loss. Default: off.")
    g.add_argument("--debiased_estimation_loss", action="store_true",
                   help="weight the loss by 1/√snr (ε) or 1/(snr+1) (v), snr capped at 1000 (debiased estimation)")


@dataclass(frozen=True)
class DDPMConfig:
    v_parameterization: bool = False
    zero_terminal_snr: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None
    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False

    @classmethod
    def from_args(cls, args: Any) -> "DDPMConfig":
        values = {f.name: getattr(args, f.name, f.default) for f in fields(cls)}
        for name in ("v_parameterization", "zero_terminal_snr", "noise_offset_random_strength",
                     "ip_noise_gamma_random_strength", "scale_v_pred_loss_like_noise_pred", "debiased_estimation_loss"):
            values[name] = bool(values[name])
        problems = config_problems(values)
        if problems:
            raise ConfigError("invalid DDPM options:\n  - " + "\n  - ".join(problems))
        return cls(**values)

    @property
    def timestep_range(self) -> tuple[int, int]:
        low = 0 if self.min_timestep is None else self.min_timestep
        high = NUM_TRAIN_TIMESTEPS if self.max_timestep is None else self.max_timestep
        return low, high

    @property
    def weights_loss(self) -> bool:
        return bool(self.min_snr_gamma or self.scale_v_pred_loss_like_noise_pred or self.v_pred_like_loss
                    or self.debiased_estimation_loss)


def config_problems(v: dict[str, Any]) -> list[str]:
    problems = []
    low, high = v["min_timestep"], v["max_timestep"]
    lo = 0 if low is None else low
    hi = NUM_TRAIN_TIMESTEPS if high is None else high
    if not 0 <= lo < hi <= NUM_TRAIN_TIMESTEPS:
        problems.append(f"--min_timestep {lo} / --max_timestep {hi}: need 0 <= min_timestep < max_timestep <= 1000")
    problems += noise_option_problems(v)
    if v["min_snr_gamma"] is not None and v["min_snr_gamma"] <= 0:
        problems.append(f"--min_snr_gamma must be > 0 (got {v['min_snr_gamma']}); 5 is usual")
    if v["v_pred_like_loss"] is not None and v["v_pred_like_loss"] < 0:
        problems.append(f"--v_pred_like_loss must be >= 0 (got {v['v_pred_like_loss']})")
    if v["scale_v_pred_loss_like_noise_pred"] and not v["v_parameterization"]:
        problems.append("--scale_v_pred_loss_like_noise_pred rescales a v-prediction loss: it needs "
                        "--v_parameterization (remove it for an ε-prediction model)")
    if v["v_pred_like_loss"] and v["v_parameterization"]:
        problems.append("--v_pred_like_loss adds a v-prediction-like term to an ε-prediction loss; with "
                        "--v_parameterization the loss already is one: remove it")
    if v["zero_terminal_snr"] and not v["v_parameterization"] and (v["debiased_estimation_loss"]
                                                                    or v["v_pred_like_loss"]):
        problems.append("--zero_terminal_snr makes snr 0 at the last timestep, where the ε-prediction weights of "
                        "--debiased_estimation_loss / --v_pred_like_loss are infinite: use --v_parameterization "
                        "(recommended with zero terminal SNR) or drop one of them")
    return problems


# ---------------------------------------------------------------------------------------------
# The schedule.

def scaled_linear_betas(num: int = NUM_TRAIN_TIMESTEPS, start: float = BETA_START, end: float = BETA_END) -> Tensor:
    return torch.linspace(start**0.5, end**0.5, num, dtype=torch.float32) ** 2


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale √ᾱ so that its last value is 0 and its first unchanged (Lin et al. 2023, alg. 1)."""
    alphas_bar_sqrt = (1.0 - betas).cumprod(0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


@dataclass(frozen=True)
class DDPMSchedule:
    betas: Tensor
    alphas_cumprod: Tensor
    # ᾱ per (device, dtype), copied once: a copy from the host each step would make the step wait
    # (and could not be recorded by --cuda_graph)
    _alphas_on: dict = field(default_factory=dict, compare=False, repr=False)

    def alphas_cumprod_on(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Tensor:
        key = (str(device), dtype)
        if key not in self._alphas_on:
            self._alphas_on[key] = self.alphas_cumprod.to(device, dtype)
        return self._alphas_on[key]

    @classmethod
    def sd(cls, zero_terminal_snr: bool = False) -> "DDPMSchedule":
        betas = scaled_linear_betas()
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas=betas, alphas_cumprod=(1.0 - betas).cumprod(0))

    def _coefficients(self, timesteps: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        a = self.alphas_cumprod_on(like.device, like.dtype)[timesteps.long().to(like.device)]
        shape = (-1,) + (1,) * (like.ndim - 1)
        return a.sqrt().reshape(shape), (1 - a).sqrt().reshape(shape)

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (diffusers' DDPMScheduler.add_noise)."""
        a, s = self._coefficients(timesteps, x0)
        return a * x0 + s * noise

    def velocity(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (diffusers' get_velocity)."""
        a, s = self._coefficients(timesteps, x0)
        return a * noise - s * x0

    def snr(self, timesteps: Tensor) -> Tensor:
        """ᾱ/(1−ᾱ) per timestep, float32 (inf where ᾱ = 1 cannot happen: β > 0; 0 at a zero terminal SNR)."""
        a = self.alphas_cumprod_on(timesteps.device)[timesteps.long()]
        return a / (1 - a)


# ---------------------------------------------------------------------------------------------
# Per step.

def sample_timesteps(cfg: DDPMConfig, batch_size: int, device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None, on_device: bool = False) -> Tensor:
    """t ~ randint(low, high), drawn on the CPU as sd-scripts does (its random stream), or on
    `device` (on_device: --cuda_graph, whose recorded step cannot draw on the CPU)."""
    low, high = cfg.timestep_range
    if on_device:
        return torch.randint(low, high, (batch_size,), generator=generator, device=device)
    return torch.randint(low, high, (batch_size,), generator=generator).to(device)


def noise_with_options(cfg: DDPMConfig, noise: Tensor, latents: Tensor) -> Tensor:
    """--noise_offset (with random strength and adaptive scale), then pyramid noise (FORMATS 3.4)."""
    if cfg.noise_offset:
        offset: Tensor | float = cfg.noise_offset
        if cfg.noise_offset_random_strength:
            offset = offset * float(torch.rand(1))
        if cfg.adaptive_noise_scale is not None:
            channel_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
            offset = (offset + cfg.adaptive_noise_scale * channel_mean).clamp(min=0.0)
        shift = torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
        noise = (noise + offset * shift).to(noise.dtype)
    if cfg.multires_noise_iterations:
        noise = pyramid_noise(noise, cfg.multires_noise_iterations, cfg.multires_noise_discount)
    return noise


def input_noise(cfg: DDPMConfig, noise: Tensor) -> Tensor:
    """The noise the input is made with: ε + γ·ξ with --ip_noise_gamma, else ε."""
    if not cfg.ip_noise_gamma:
        return noise
    gamma = cfg.ip_noise_gamma
    if cfg.ip_noise_gamma_random_strength:
        gamma = gamma * float(torch.rand(1))
    return noise + gamma * torch.randn_like(noise)


def loss_weights(cfg: DDPMConfig, schedule: DDPMSchedule, timesteps: Tensor) -> Tensor | None:
    """The per-sample factor (B,) of the SNR options, or None when none is set."""
    if not cfg.weights_loss:
        return None
    snr = schedule.snr(timesteps).float()
    weight = torch.ones_like(snr)
    if cfg.min_snr_gamma:
        clipped = snr.clamp(max=cfg.min_snr_gamma)
        if cfg.v_parameterization:
            weight = weight * clipped / (snr + 1)
        else:
            # min(snr, γ)/snr is 1 whenever snr <= γ, also at snr = 0 (zero terminal SNR), where
            # sd-scripts divides 0 by 0
            weight = weight * torch.where(snr > cfg.min_snr_gamma, clipped / snr.clamp(min=1e-20), torch.ones_like(snr))
    capped = snr.clamp(max=SNR_CAP)
    if cfg.scale_v_pred_loss_like_noise_pred:
        weight = weight * capped / (capped + 1)
    if cfg.v_pred_like_loss:
        weight = weight * (1 + cfg.v_pred_like_loss * (capped + 1) / capped)
    if cfg.debiased_estimation_loss:
        weight = weight * (1 / (capped + 1) if cfg.v_parameterization else 1 / capped.sqrt())
    return weight
