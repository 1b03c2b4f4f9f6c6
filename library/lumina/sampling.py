"""Lumina Image 2.0 sampling: the shifted Euler schedule and CFG with truncation and renormalisation.

Conventions (FORMATS 3.3, 6.3): sigma runs from 1 (noise) to 0 (image) on the schedule of
diffusers' FlowMatchEulerDiscreteScheduler(shift=6.0); the model is fed t = 1 - sigma and
predicts the velocity towards the image, so one Euler step is x += (sigma_next - sigma) * (-v).

Classifier-free guidance runs only while the model time t < cfg_trunc_ratio (`--ctr`, the early,
noisy part of sampling); after guidance, with renorm_cfg > 0 (`--rcfg`), each sample's guided
prediction is scaled down to at most renorm_cfg times the norm of its conditional prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

LATENT_CHANNELS = 16
DEFAULT_STEPS = 38
DEFAULT_SIZE = 1024
DEFAULT_CFG_SCALE = 3.5
DEFAULT_CFG_TRUNC_RATIO = 0.25
DEFAULT_RENORM_CFG = 1.0
DEFAULT_SHIFT = 6.0
NUM_TRAIN_TIMESTEPS = 1000


def _shift(sigma, shift: float):
    return shift * sigma / (1 + (shift - 1) * sigma)


def get_sigmas(steps: int, shift: float = DEFAULT_SHIFT) -> list[float]:
    """steps + 1 sigmas from 1 down to 0, as FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps):
    evenly spaced between 1 and the smallest shifted training sigma, shifted again, then 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    # The smallest training sigma (1/1000 shifted), in float32 as the scheduler computes it.
    sigma_min = float(_shift(torch.tensor(1 / NUM_TRAIN_TIMESTEPS, dtype=torch.float32), shift))
    sigmas = np.linspace(1.0, sigma_min, steps)
    sigmas = _shift(sigmas, shift).astype(np.float32)
    return [float(s) for s in sigmas] + [0.0]


@dataclass
class LuminaConditioning:
    """One prompt batch for the DiT: Gemma2 states (B, L, 2304) and the mask (B, L)."""

    hidden_state: Tensor
    attention_mask: Tensor


def guided_prediction(cond: Tensor, uncond: Tensor, cfg_scale: float, renorm_cfg: float) -> Tensor:
    """uncond + cfg_scale * (cond - uncond), then, with renorm_cfg > 0, each sample's norm capped
    at renorm_cfg * ||cond||."""
    guided = uncond + cfg_scale * (cond - uncond)
    if renorm_cfg > 0:
        dims = tuple(range(1, cond.ndim))
        max_norm = torch.linalg.vector_norm(cond, dim=dims, keepdim=True) * renorm_cfg
        norm = torch.linalg.vector_norm(guided, dim=dims, keepdim=True)
        guided = torch.where(norm >= max_norm, guided * (max_norm / norm), guided)
    return guided


def _pad_to(t: Tensor, length: int) -> Tensor:
    if t.shape[1] == length:
        return t
    pad = t.new_zeros(t.shape[0], length - t.shape[1], *t.shape[2:])
    return torch.cat((t, pad), dim=1)


@torch.no_grad()
def denoise(model: nn.Module, noise: Tensor, cond: LuminaConditioning, sigmas: list[float], *,
            neg: LuminaConditioning | None = None, cfg_scale: float = DEFAULT_CFG_SCALE,
            cfg_trunc_ratio: float = DEFAULT_CFG_TRUNC_RATIO, renorm_cfg: float = DEFAULT_RENORM_CFG,
            progress: bool = True, before_step: Callable[[int], None] | None = None) -> Tensor:
    """Euler integration from sigmas[0] to sigmas[-1] of latents (B, 16, H, W).

    While 1 - sigma < cfg_trunc_ratio the negative conditioning runs batched with the positive
    one (both padded to the same caption length; the DiT ignores padding) and the guided
    prediction is used; afterwards only the positive one. The model input has the states'
    dtype; t is passed in float32 (bf16 cannot tell 0.998 from 1); x is integrated in float32.
    `before_step(i)` runs before each step (e.g. to reset a block-swap offloader)."""
    if neg is None and cfg_trunc_ratio > 0 and sigmas and 1 - sigmas[0] < cfg_trunc_ratio:
        raise ValueError("classifier-free guidance needs a negative conditioning (or cfg_trunc_ratio 0)")
    compute_dtype = cond.hidden_state.dtype
    batch = noise.shape[0]
    if neg is not None:
        length = max(cond.hidden_state.shape[1], neg.hidden_state.shape[1])
        both_states = torch.cat((_pad_to(neg.hidden_state, length), _pad_to(cond.hidden_state, length)))
        both_masks = torch.cat((_pad_to(neg.attention_mask, length), _pad_to(cond.attention_mask, length)))
    x = noise.float()
    steps = list(zip(sigmas[:-1], sigmas[1:]))
    for i, (sigma, sigma_next) in enumerate(tqdm(steps, disable=not progress, desc="sampling")):
        if before_step is not None:
            before_step(i)
        model_time = 1.0 - sigma
        guided_step = neg is not None and model_time < cfg_trunc_ratio
        if guided_step and cfg_scale != 1.0:
            t = torch.full((2 * batch,), model_time, device=x.device)
            pred_neg, pred = model(torch.cat((x, x)).to(compute_dtype), t, both_states, both_masks).float().chunk(2)
            pred = guided_prediction(pred, pred_neg, cfg_scale, renorm_cfg)
        else:
            t = torch.full((batch,), model_time, device=x.device)
            pred = model(x.to(compute_dtype), t, cond.hidden_state, cond.attention_mask).float()
            if guided_step:  # scale 1: the guided prediction is the conditional one, renormalised
                pred = guided_prediction(pred, pred, 1.0, renorm_cfg)
        x = x + (sigma_next - sigma) * (-pred)
    return x


def round_image_size(width: int, height: int) -> tuple[int, int]:
    """A multiple of 16 (8 for the AE times the patch size 2), at least 64."""
    return max(64, width - width % 16), max(64, height - height % 16)


def initial_noise(width: int, height: int, seed: int | None, device: torch.device | str,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """(1, 16, H/8, W/8) Gaussian noise."""
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    return torch.randn(1, LATENT_CHANNELS, height // 8, width // 8, device=device, dtype=dtype, generator=generator)


@torch.no_grad()
def sample_latents(model: nn.Module, cond: LuminaConditioning, *, neg: LuminaConditioning | None = None,
                   width: int = DEFAULT_SIZE, height: int = DEFAULT_SIZE, steps: int = DEFAULT_STEPS,
                   cfg_scale: float = DEFAULT_CFG_SCALE, cfg_trunc_ratio: float = DEFAULT_CFG_TRUNC_RATIO,
                   renorm_cfg: float = DEFAULT_RENORM_CFG, seed: int | None = None, shift: float = DEFAULT_SHIFT,
                   progress: bool = True, before_step: Callable[[int], None] | None = None) -> Tensor:
    """Noise -> denoised scaled latents (1, 16, H/8, W/8) float32, for one prompt. The size is
    rounded down to a multiple of 16. Without a negative conditioning CFG is off."""
    width, height = round_image_size(width, height)
    device = cond.hidden_state.device
    noise = initial_noise(width, height, seed, device, dtype=cond.hidden_state.dtype)
    return denoise(model, noise, cond, get_sigmas(steps, shift), neg=neg, cfg_scale=cfg_scale,
                   cfg_trunc_ratio=cfg_trunc_ratio if neg is not None else 0.0, renorm_cfg=renorm_cfg,
                   progress=progress, before_step=before_step)


@torch.no_grad()
def decode_to_image(ae: nn.Module, latents: Tensor):
    """Scaled latents (1, 16, h, w) -> PIL image through the AE (on the AE's device and dtype)."""
    from PIL import Image

    image = ae.decode(latents.to(next(ae.parameters()).device, ae.dtype)).float().clamp(-1, 1)
    array = ((image[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


@torch.no_grad()
def generate_image(model: nn.Module, ae: nn.Module, cond: LuminaConditioning, *,
                   neg: LuminaConditioning | None = None, width: int = DEFAULT_SIZE, height: int = DEFAULT_SIZE,
                   steps: int = DEFAULT_STEPS, cfg_scale: float = DEFAULT_CFG_SCALE,
                   cfg_trunc_ratio: float = DEFAULT_CFG_TRUNC_RATIO, renorm_cfg: float = DEFAULT_RENORM_CFG,
                   seed: int | None = None, shift: float = DEFAULT_SHIFT, progress: bool = True,
                   before_step: Callable[[int], None] | None = None):
    """Noise -> denoise -> AE decode -> PIL image, for one prompt (batch 1). The AE's decode
    takes scaled latents (see library.autoencoders). Without a negative conditioning CFG is off."""
    x = sample_latents(model, cond, neg=neg, width=width, height=height, steps=steps, cfg_scale=cfg_scale,
                       cfg_trunc_ratio=cfg_trunc_ratio, renorm_cfg=renorm_cfg, seed=seed, shift=shift,
                       progress=progress, before_step=before_step)
    return decode_to_image(ae, x)
