"""FLUX / Chroma sampling: latent packing, position ids, the shifted schedule and the Euler loop.

Conventions (sd-scripts, BFL): sigma runs from 1 (noise) to 0 (image); the model predicts the
velocity v = noise - image, so one Euler step is x += (t_next - t_cur) * v. The schedule is
linspace(1, 0, steps + 1), shifted towards noise for larger images with mu growing linearly
in the packed token count (0.5 at 256 tokens, 1.15 at 4096); schnell uses it unshifted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn
from tqdm import tqdm

LATENT_CHANNELS = 16
PATCH = 2


# ---------------------------------------------------------------------------------------------
# Packing and ids.

def pack_latents(latents: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, (H/2)(W/2), C*4): each 2x2 patch becomes one token (c, ph, pw order)."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=PATCH, pw=PATCH)


def unpack_latents(packed: Tensor, latent_height: int, latent_width: int) -> Tensor:
    """Inverse of pack_latents; latent_height/width are the unpacked latent sizes (image / 8)."""
    return rearrange(packed, "b (h w) (c ph pw) -> b c (h ph) (w pw)",
                     h=latent_height // PATCH, w=latent_width // PATCH, ph=PATCH, pw=PATCH)


def prepare_img_ids(batch_size: int, packed_height: int, packed_width: int,
                    device: torch.device | str | None = None) -> Tensor:
    """(B, h*w, 3) ids (0, row, col) over the packed grid (image / 16), row-major like pack_latents."""
    ids = torch.zeros(packed_height, packed_width, 3, device=device)
    ids[..., 1] = torch.arange(packed_height, device=device)[:, None]
    ids[..., 2] = torch.arange(packed_width, device=device)[None, :]
    return ids.reshape(1, packed_height * packed_width, 3).expand(batch_size, -1, -1).contiguous()


def prepare_txt_ids(batch_size: int, length: int, device: torch.device | str | None = None) -> Tensor:
    """Text tokens all sit at position (0, 0, 0)."""
    return torch.zeros(batch_size, length, 3, device=device)


# ---------------------------------------------------------------------------------------------
# Schedule.

def flux_shift_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
                  min_seq_len: int = 256, max_seq_len: int = 4096) -> float:
    """mu = m * L + b through (256, base_shift) and (4096, max_shift); L = packed token count."""
    m = (max_shift - base_shift) / (max_seq_len - min_seq_len)
    return m * image_seq_len + (base_shift - m * min_seq_len)


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    """e^mu / (e^mu + (1/t - 1)^sigma); maps 1 -> 1 and 0 -> 0, pushing the middle towards 1."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_schedule(num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
                 shift: bool = True) -> list[float]:
    """num_steps + 1 sigmas from 1 to 0."""
    timesteps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    if shift:
        timesteps = time_shift(flux_shift_mu(image_seq_len, base_shift, max_shift), 1.0, timesteps)
    return timesteps.tolist()


# ---------------------------------------------------------------------------------------------
# Denoising.

@dataclass
class FluxConditioning:
    """What the DiT is conditioned on for one prompt batch. txt_mask None = no T5 mask."""

    txt: Tensor
    txt_ids: Tensor
    vec: Tensor
    txt_mask: Tensor | None = None


def _cat_optional(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise ValueError("the negative and positive prompts must both have a T5 mask or neither")
    return torch.cat((a, b))


@torch.no_grad()
def denoise(model: nn.Module, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, vec: Tensor,
            txt_mask: Tensor | None, timesteps: list[float], guidance: float,
            neg: FluxConditioning | None = None, cfg_scale: float = 1.0, progress: bool = True,
            before_step: Callable[[int], None] | None = None) -> Tensor:
    """Euler integration of the flow from timesteps[0] to timesteps[-1].

    img (B, L, 64) packed noise; the conditioning tensors as for Flux.forward. With
    cfg_scale != 1 the negative conditioning `neg` runs batched with the positive one and
    pred = neg + cfg_scale * (pos - neg). `before_step(i)` runs before each model call (e.g. to
    reset a block-swap offloader). The model input has txt's dtype; x is integrated in float32."""
    use_cfg = cfg_scale != 1.0
    if use_cfg and neg is None:
        raise ValueError("classifier-free guidance (cfg_scale != 1) needs a negative conditioning")
    batch = img.shape[0]
    if use_cfg:
        txt, txt_ids, vec = torch.cat((neg.txt, txt)), torch.cat((neg.txt_ids, txt_ids)), torch.cat((neg.vec, vec))
        txt_mask = _cat_optional(neg.txt_mask, txt_mask)
        img_ids = torch.cat((img_ids, img_ids))
    model_batch = 2 * batch if use_cfg else batch
    compute_dtype = txt.dtype
    guidance_vec = torch.full((model_batch,), guidance, device=img.device, dtype=compute_dtype)
    x = img.float()
    steps = list(zip(timesteps[:-1], timesteps[1:]))
    for i, (t_cur, t_next) in enumerate(tqdm(steps, disable=not progress, desc="sampling")):
        if before_step is not None:
            before_step(i)
        x_in = torch.cat((x, x)) if use_cfg else x
        t_vec = torch.full((model_batch,), t_cur, device=img.device, dtype=compute_dtype)
        pred = model(x_in.to(compute_dtype), img_ids, txt, txt_ids, t_vec, vec, guidance_vec,
                     txt_attention_mask=txt_mask).float()
        if use_cfg:
            pred_neg, pred_pos = pred.chunk(2)
            pred = pred_neg + cfg_scale * (pred_pos - pred_neg)
        x = x + (t_next - t_cur) * pred
    return x


def round_image_size(width: int, height: int) -> tuple[int, int]:
    """sd-scripts' sample size rule: a multiple of 16, at least 64."""
    return max(64, width - width % 16), max(64, height - height % 16)


def packed_noise(width: int, height: int, seed: int | None, device: torch.device | str,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """(1, (H/16)(W/16), 64) Gaussian noise drawn directly in the packed layout, as sd-scripts does."""
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    return torch.randn(1, (height // 16) * (width // 16), LATENT_CHANNELS * PATCH * PATCH, device=device,
                       dtype=dtype, generator=generator)


@torch.no_grad()
def generate_image(model: nn.Module, ae: nn.Module, cond: FluxConditioning, *, width: int = 512,
                   height: int = 512, steps: int = 20, guidance: float = 3.5, seed: int | None = None,
                   shift: bool = True, cfg_scale: float = 1.0, neg: FluxConditioning | None = None,
                   progress: bool = True, before_step: Callable[[int], None] | None = None):
    """Noise -> denoise -> unpack -> AE decode -> PIL image, for one prompt (batch 1).
    `shift` False for schnell. The AE's decode takes scaled latents (see library.autoencoders)."""
    from PIL import Image

    width, height = round_image_size(width, height)
    device = cond.txt.device
    noise = packed_noise(width, height, seed, device, dtype=cond.txt.dtype)
    packed_h, packed_w = height // 16, width // 16
    img_ids = prepare_img_ids(1, packed_h, packed_w, device=device)
    timesteps = get_schedule(steps, packed_h * packed_w, shift=shift)
    x = denoise(model, noise, img_ids, cond.txt, cond.txt_ids, cond.vec, cond.txt_mask, timesteps, guidance,
                neg=neg, cfg_scale=cfg_scale, progress=progress, before_step=before_step)
    latents = unpack_latents(x, height // 8, width // 8)
    image = ae.decode(latents.to(ae.dtype)).float().clamp(-1, 1)
    array = ((image[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))
