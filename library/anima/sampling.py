"""Anima sampling: the shifted flow schedule, Euler steps and classifier-free guidance (FORMATS 6.3).

Conventions (sd-scripts' Anima sampler): sigma runs from 1 (noise) to 0 (image) over
linspace(1, 0, steps + 1), shifted as s*sigma / (1 + (s - 1)*sigma) with the flow shift s
(`--fs`, default 3.0); the DiT predicts the velocity v = noise - image from sigma itself, so one
Euler step is x += v * (sigma_next - sigma). With a CFG scale above 1 the negative prompt runs
batched with the positive one and v = neg + scale * (pos - neg). Defaults: 30 steps, 512x512,
scale 7.5. The text context (LLM adapter output) is computed once, not at every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from library.anima.text import AnimaTextOutputs
from library.anima.vae import DOWNSCALE, LATENT_CHANNELS

DEFAULT_STEPS = 30
DEFAULT_SIZE = 512
DEFAULT_CFG_SCALE = 7.5
DEFAULT_FLOW_SHIFT = 3.0
SIZE_MULTIPLE = 16  # VAE 8x times the DiT's 2x2 patches


def flow_shift_sigmas(steps: int, shift: float = DEFAULT_FLOW_SHIFT) -> list[float]:
    """steps + 1 sigmas from 1 to 0, shifted towards noise for shift > 1."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas.tolist()


def round_image_size(width: int, height: int) -> tuple[int, int]:
    """A multiple of 16, at least 64 (the same rule as the FLUX sampler)."""
    return max(64, width - width % SIZE_MULTIPLE), max(64, height - height % SIZE_MULTIPLE)


@dataclass
class AnimaConditioning:
    """The DiT's cross-attention context for one prompt batch (the LLM adapter's output)."""

    context: Tensor  # (B, N, crossattn_emb_channels)

    @staticmethod
    def from_text(model: nn.Module, text: AnimaTextOutputs, dtype: torch.dtype | None = None) -> "AnimaConditioning":
        embeds = text.prompt_embeds.to(dtype) if dtype is not None else text.prompt_embeds
        with torch.no_grad():
            context = model.encode_context(embeds, text.t5_input_ids, text.t5_attn_mask, text.attn_mask)
        return AnimaConditioning(context)


@torch.no_grad()
def denoise(model: nn.Module, noise: Tensor, cond: AnimaConditioning, sigmas: list[float], *,
            neg: AnimaConditioning | None = None, cfg_scale: float = 1.0, progress: bool = True,
            before_step: Callable[[int], None] | None = None) -> Tensor:
    """Euler integration of the flow from sigmas[0] to sigmas[-1]. noise (B, 16, H/8, W/8); the
    model input has the context's dtype, x is integrated in float32."""
    use_cfg = cfg_scale > 1.0
    if use_cfg and neg is None:
        raise ValueError("classifier-free guidance (scale > 1) needs a negative conditioning")
    context = torch.cat((neg.context, cond.context)) if use_cfg else cond.context
    if use_cfg and neg.context.shape[1:] != cond.context.shape[1:]:
        raise ValueError("the negative and positive contexts must have the same length")
    dtype = context.dtype
    x = noise.float()
    steps = list(zip(sigmas[:-1], sigmas[1:]))
    for i, (sigma, sigma_next) in enumerate(tqdm(steps, disable=not progress, desc="sampling")):
        if before_step is not None:
            before_step(i)
        x_in = torch.cat((x, x)) if use_cfg else x
        t = torch.full((x_in.shape[0],), sigma, device=x.device, dtype=dtype)
        v = model(x_in.to(dtype), t, context).float()
        if use_cfg:
            v_neg, v_pos = v.chunk(2)
            v = v_neg + cfg_scale * (v_pos - v_neg)
        x = x + (sigma_next - sigma) * v
    return x


def latent_noise(width: int, height: int, seed: int | None, device: torch.device | str,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    return torch.randn(1, LATENT_CHANNELS, height // DOWNSCALE, width // DOWNSCALE, device=device, dtype=dtype,
                       generator=generator)


@torch.no_grad()
def generate_image(model: nn.Module, vae: nn.Module, cond: AnimaConditioning, *, neg: AnimaConditioning | None = None,
                   width: int = DEFAULT_SIZE, height: int = DEFAULT_SIZE, steps: int = DEFAULT_STEPS,
                   cfg_scale: float = DEFAULT_CFG_SCALE, flow_shift: float = DEFAULT_FLOW_SHIFT,
                   seed: int | None = None, progress: bool = True,
                   before_step: Callable[[int], None] | None = None):
    """Noise -> denoise -> VAE decode -> PIL image, for one prompt (batch 1)."""
    from PIL import Image

    width, height = round_image_size(width, height)
    device = cond.context.device
    noise = latent_noise(width, height, seed, device)
    latents = denoise(model, noise, cond, flow_shift_sigmas(steps, flow_shift), neg=neg, cfg_scale=cfg_scale,
                      progress=progress, before_step=before_step)
    image = vae.decode(latents).float().clamp(-1, 1)
    array = ((image[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))
