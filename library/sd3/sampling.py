"""SD3 sampling: the discrete-flow schedule with shift and the Euler sampler with CFG.

Conventions (SAI reference, sd-scripts, ComfyUI's "normal" scheduler): sigma runs from 1
(noise) to 0 (image); the model gets t = 1000 * sigma and predicts the velocity v, so the
denoised estimate is x0 = x - sigma * v. The schedule shifts sigma(t) = s t / (1 + (s - 1) t)
(s = 3.0 for sampling), spaced linearly in timestep between sigma_max and sigma_min, then 0.
Every step runs the positive and the negative prompt as one batch and guides the denoised
estimate: x0 = x0_neg + cfg * (x0_pos - x0_neg); Euler: x += (x - x0) / sigma * (sigma_next - sigma).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from library.sd3.text import SD3Conditioning

LATENT_CHANNELS = 16
SAMPLING_SHIFT = 3.0
NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(timestep: Tensor | float, shift: float) -> Tensor:
    """sigma for a timestep in [0, 1000]: t/1000 shifted by s t / (1 + (s - 1) t)."""
    t = torch.as_tensor(timestep, dtype=torch.float64) / NUM_TRAIN_TIMESTEPS
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def get_sigmas(steps: int, shift: float = SAMPLING_SHIFT) -> list[float]:
    """steps + 1 sigmas: `steps` values from sigma_max = sigma(1000) down to sigma_min = sigma(1),
    spaced linearly in timestep, then 0."""
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {steps}")
    sigma_max = shift_sigma(NUM_TRAIN_TIMESTEPS, shift)
    sigma_min = shift_sigma(1, shift)
    timesteps = torch.linspace(float(sigma_max) * NUM_TRAIN_TIMESTEPS, float(sigma_min) * NUM_TRAIN_TIMESTEPS, steps,
                               dtype=torch.float64)
    return shift_sigma(timesteps, shift).tolist() + [0.0]


def round_image_size(width: int, height: int) -> tuple[int, int]:
    """A multiple of 16 (8 for the VAE x 2 for the patch), at least 64. sd-scripts rounds to 8,
    which fails for sizes that are odd multiples of 8."""
    return max(64, width - width % 16), max(64, height - height % 16)


def initial_noise(width: int, height: int, seed: int | None, device: torch.device | str = "cpu",
                  batch_size: int = 1) -> Tensor:
    """(B, 16, H/8, W/8) float32 Gaussian noise drawn on the CPU (the same image on any device)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    noise = torch.randn(batch_size, LATENT_CHANNELS, height // 8, width // 8, generator=generator)
    return noise.to(device)


@torch.no_grad()
def denoise(model: nn.Module, noise: Tensor, cond: SD3Conditioning, neg: SD3Conditioning, sigmas: list[float],
            cfg_scale: float, progress: bool = True, before_step: Callable[[int], None] | None = None) -> Tensor:
    """Euler integration from sigmas[0] to sigmas[-1] with classifier-free guidance.

    noise (B, 16, h, w) starting latents (x = sigma_0 * noise; the image part is zero);
    cond / neg the positive and negative conditioning, each with batch B or 1. The model
    input has the conditioning's dtype; x is integrated in float32. `before_step(i)` runs before
    each model call (e.g. to reset a block-swap offloader)."""
    batch = noise.shape[0]
    compute_dtype = cond.context.dtype

    def expand(t: Tensor) -> Tensor:
        return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t

    context = torch.cat((expand(cond.context), expand(neg.context)))
    y = torch.cat((expand(cond.y), expand(neg.y)))
    x = sigmas[0] * noise.float()
    steps = list(zip(sigmas[:-1], sigmas[1:]))
    for i, (sigma, sigma_next) in enumerate(tqdm(steps, disable=not progress, desc="sampling")):
        if before_step is not None:
            before_step(i)
        t = torch.full((2 * batch,), sigma * NUM_TRAIN_TIMESTEPS, device=noise.device, dtype=torch.float32)
        v = model(torch.cat((x, x)).to(compute_dtype), t, y, context).float()
        denoised_pos, denoised_neg = (torch.cat((x, x)) - sigma * v).chunk(2)
        denoised = denoised_neg + cfg_scale * (denoised_pos - denoised_neg)
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
    return x


@torch.no_grad()
def generate_image(model: nn.Module, vae: nn.Module, cond: SD3Conditioning, neg: SD3Conditioning, *,
                   width: int = 512, height: int = 512, steps: int = 30, cfg_scale: float = 7.5,
                   seed: int | None = None, shift: float = SAMPLING_SHIFT, progress: bool = True,
                   before_step: Callable[[int], None] | None = None):
    """Noise -> denoise -> VAE decode -> PIL image, for one prompt. The VAE's decode takes the
    scaled latents (library.autoencoders applies SD3's scale and shift)."""
    from PIL import Image

    width, height = round_image_size(width, height)
    device = cond.context.device
    noise = initial_noise(width, height, seed, device)
    latents = denoise(model, noise, cond, neg, get_sigmas(steps, shift), cfg_scale, progress=progress,
                      before_step=before_step)
    image = vae.decode(latents.to(vae.dtype)).float().clamp(-1, 1)
    array = ((image[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))
