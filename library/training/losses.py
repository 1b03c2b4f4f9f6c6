"""Element losses, the scheduled Huber parameter, and loss reduction (all families).

Order of operations (FORMATS 3.5): element loss → × weighting → × mask → mean over all
non-batch dims → × per-sample loss weight → (family post-processing) → batch mean.
`reduce_loss` does everything up to the per-sample weight and returns (B,); the family's
post-processing and the batch mean belong to the caller.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from library.errors import ConfigError

LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
_NUM_TRAIN_TIMESTEPS = 1000


def add_loss_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare --loss_type and the scheduled-Huber options."""
    group = parser.add_argument_group("loss")
    group.add_argument(
        "--loss_type",
        choices=list(LOSS_TYPES),
        default="l2",
        help="Element loss. l2: squared error (default); l1: absolute error; huber: "
        "2c·(√(d²+c²)−c), L2 near 0 and L1-like for outliers; smooth_l1: the same divided by c.",
    )
    group.add_argument(
        "--huber_schedule",
        choices=list(HUBER_SCHEDULES),
        default="snr",
        help="How the Huber c changes with the noise level (huber and smooth_l1 only). constant: "
        "c·scale; exponential: c^(t/1000)·scale; snr: (1−c)/(1+σ_t)²+c with σ_t the noise-to-signal "
        "ratio (for flow models σ_t = σ/(1−σ)), so noisy steps get c and clean steps get 1. Default snr.",
    )
    group.add_argument("--huber_c", type=float, default=0.1, help="The Huber c, in (0, 1]. Default 0.1.")
    group.add_argument(
        "--huber_scale",
        type=float,
        default=1.0,
        help="Multiplier on c for the constant and exponential schedules (the snr schedule ignores it, "
        "as in sd-scripts). Default 1.0.",
    )


@dataclass(frozen=True)
class LossConfig:
    """The loss options. `flow`: the model is a flow-matching one (t = 1000·σ, σ-based snr schedule)."""

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    flow: bool = False
    # DDPM models: the schedule's ᾱ_t (1000,), which the snr Huber schedule needs; passing it here
    # lets the shared loop compute that schedule without knowing the family.
    alphas_cumprod: Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        problems = []
        if self.loss_type not in LOSS_TYPES:
            problems.append(f"--loss_type {self.loss_type!r}: choose one of {', '.join(LOSS_TYPES)}.")
        if self.huber_schedule not in HUBER_SCHEDULES:
            problems.append(f"--huber_schedule {self.huber_schedule!r}: choose one of {', '.join(HUBER_SCHEDULES)}.")
        if not 0 < self.huber_c <= 1:
            problems.append(f"--huber_c must be in (0, 1] (got {self.huber_c}).")
        if not self.huber_scale > 0:
            problems.append(f"--huber_scale must be > 0 (got {self.huber_scale}).")
        if problems:
            raise ConfigError("Invalid loss options:\n" + "\n".join(f"  - {p}" for p in problems))

    @classmethod
    def from_args(cls, args: Any, *, flow: bool = False, alphas_cumprod: Tensor | None = None) -> "LossConfig":
        return cls(
            loss_type=getattr(args, "loss_type", "l2"),
            huber_schedule=getattr(args, "huber_schedule", "snr"),
            huber_c=getattr(args, "huber_c", 0.1),
            huber_scale=getattr(args, "huber_scale", 1.0),
            flow=flow,
            alphas_cumprod=alphas_cumprod,
        )

    @property
    def uses_huber_c(self) -> bool:
        return self.loss_type in ("huber", "smooth_l1")

    def huber_c_for(self, timesteps: Tensor, *, alphas_cumprod: Tensor | None = None) -> Tensor | None:
        """Per-sample c for this batch, or None when the loss type does not use it."""
        if not self.uses_huber_c:
            return None
        if alphas_cumprod is None:
            alphas_cumprod = self.alphas_cumprod
        return huber_c_per_sample(
            self.huber_schedule, self.huber_c, self.huber_scale, timesteps, flow=self.flow, alphas_cumprod=alphas_cumprod
        )


def huber_c_per_sample(
    schedule: str,
    c: float,
    scale: float,
    timesteps: Tensor,
    *,
    flow: bool,
    alphas_cumprod: Tensor | None = None,
) -> Tensor:
    """The Huber c for each sample, shape (B,) float32.

    `timesteps` are t in [0, 1000]: float t = 1000·σ for flow models (`flow=True`), integer
    DDPM steps otherwise, in which case the snr schedule needs the scheduler's `alphas_cumprod`.
    """
    t = timesteps.float()
    if schedule == "constant":
        return torch.full_like(t, c * scale)
    if schedule == "exponential":
        alpha = -math.log(c) / _NUM_TRAIN_TIMESTEPS
        return torch.exp(-alpha * t) * scale
    if schedule == "snr":
        if flow:
            # x_σ = (1−σ)·x0 + σ·ε: signal (1−σ), noise σ, so the noise-to-signal ratio
            # σ_t = 1/√snr = σ/(1−σ). sd-scripts raises NotImplementedError here.
            sigma = (t / _NUM_TRAIN_TIMESTEPS).clamp(0.0, 1.0)
            noise_to_signal = sigma / (1 - sigma)  # inf at σ = 1 gives c, as the limit should
        else:
            if alphas_cumprod is None:
                raise ValueError("the snr Huber schedule needs alphas_cumprod for DDPM models")
            a = alphas_cumprod.to(t.device)[timesteps.long()].float()
            noise_to_signal = ((1 - a) / a).sqrt()
        return (1 - c) / (1 + noise_to_signal) ** 2 + c
    raise ConfigError(f"unknown --huber_schedule {schedule!r}: choose one of {', '.join(HUBER_SCHEDULES)}.")


def element_loss(pred: Tensor, target: Tensor, loss_type: str, huber_c: Tensor | None = None) -> Tensor:
    """Unreduced loss, float32, same shape as pred. `huber_c` is (B,) for huber/smooth_l1."""
    diff = pred.float() - target.float()
    if loss_type == "l2":
        return diff**2
    if loss_type == "l1":
        return diff.abs()
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type} needs a per-sample huber_c")
        c = huber_c.float().to(diff.device).reshape(-1, *([1] * (diff.ndim - 1)))
        smooth = torch.sqrt(diff**2 + c**2) - c
        return 2 * c * smooth if loss_type == "huber" else 2 * smooth
    raise ConfigError(f"unknown --loss_type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}.")


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    if values.ndim == 1:
        return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))
    return values


def reduce_loss(
    elem: Tensor,
    *,
    weighting: Tensor | None = None,
    mask: Tensor | None = None,
    loss_weights: Tensor | None = None,
) -> Tensor:
    """Per-sample loss (B,) from an element loss (B, C, ..., H, W).

    weighting: (B,) or broadcastable, e.g. the flow σ weighting. mask: (B, 1, H, W) already at
    the latent size (see `resize_mask_to_latent`), broadcast over channels and any middle dims.
    The masked loss is a plain mean over all elements, not normalised by the mask area (as in
    sd-scripts). loss_weights: (B,), e.g. prior_loss_weight for regularisation images.
    """
    loss = elem.float()
    if weighting is not None:
        loss = loss * _per_sample(weighting.float().to(loss.device), loss)
    if mask is not None:
        mask = mask.float().to(loss.device)
        while mask.ndim < loss.ndim:  # (B,1,H,W) against (B,C,T,H,W): add the middle dims
            mask = mask.unsqueeze(2)
        loss = loss * mask
    loss = loss.mean(dim=tuple(range(1, loss.ndim)))
    if loss_weights is not None:
        loss = loss * loss_weights.float().to(loss.device)
    return loss


def resize_mask_to_latent(mask: Tensor, latent_hw: tuple[int, int]) -> Tensor:
    """(B, H, W) or (B, 1, H, W) mask in [0, 1] -> (B, 1, h, w) float32 by area averaging."""
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B,H,W) or (B,1,H,W), got {tuple(mask.shape)}")
    return F.interpolate(mask.float(), size=tuple(latent_hw), mode="area")


def compute_per_sample_loss(
    cfg: LossConfig,
    pred: Tensor,
    target: Tensor,
    *,
    timesteps: Tensor | None = None,
    sigmas: Tensor | None = None,
    weighting: Tensor | None = None,
    mask: Tensor | None = None,
    loss_weights: Tensor | None = None,
    alphas_cumprod: Tensor | None = None,
) -> Tensor:
    """element_loss + reduce_loss in one call: the per-sample loss (B,), before family post-processing.

    The Huber c comes from `timesteps` (t in [0, 1000]) or, for flow models, from `sigmas`
    (t = 1000·σ); one of them is needed for huber/smooth_l1.
    """
    huber_c = None
    if cfg.uses_huber_c:
        if timesteps is None:
            if sigmas is None or not cfg.flow:
                raise ValueError("huber/smooth_l1 need the batch timesteps (or sigmas for flow models)")
            timesteps = sigmas * _NUM_TRAIN_TIMESTEPS
        huber_c = cfg.huber_c_for(timesteps, alphas_cumprod=alphas_cumprod)
    elem = element_loss(pred, target, cfg.loss_type, huber_c)
    return reduce_loss(elem, weighting=weighting, mask=mask, loss_weights=loss_weights)
