"""Sample images for SD 1.x / 2.x: diffusers' schedulers on the training UNet.

The scheduler is made as sd-scripts makes it for sample images: the SD training schedule
(1000 steps, scaled_linear betas 0.00085 -> 0.012), the scheduler's own defaults otherwise,
`prediction_type="v_prediction"` with --v_parameterization, and clip_sample switched on where a
scheduler has it. With a CFG scale above 1 the negative prompt (default "") and the prompt run as
one batch: pred = neg + scale·(pos − neg). Noise is drawn on the CPU from the seed, so a seed
gives the same image on any device.
"""

from __future__ import annotations

import inspect

import torch
from PIL import Image
from torch import Tensor, nn

from library.errors import ConfigError

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END, BETA_SCHEDULE = 0.00085, 0.012, "scaled_linear"
LATENT_CHANNELS = 4
DEFAULT_STEPS, DEFAULT_SIZE, DEFAULT_SCALE = 30, 512, 7.5

# --sample_sampler / --ss name -> (diffusers scheduler class, extra init arguments)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # diffusers refuses dpmsolver (not ++) with its default final_sigmas_type "zero"
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}


def check_sampler(name: str, where: str = "--sample_sampler") -> str:
    key = name.strip().lower()
    if key not in SAMPLERS:
        raise ConfigError(f"{where} {name!r}: unknown sampler; choose one of {', '.join(SAMPLERS)}.")
    return key


def make_scheduler(name: str, *, v_prediction: bool):
    import diffusers

    cls_name, extra = SAMPLERS[check_sampler(name)]
    kwargs = dict(extra)
    if v_prediction:
        kwargs["prediction_type"] = "v_prediction"
    scheduler = getattr(diffusers, cls_name)(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START,
                                             beta_end=BETA_END, beta_schedule=BETA_SCHEDULE, **kwargs)
    if getattr(scheduler.config, "clip_sample", None) is False:
        scheduler.register_to_config(clip_sample=True)
    return scheduler


def uses_cfg(scale: float) -> bool:
    """Classifier-free guidance (with the negative prompt) runs only for a scale above 1."""
    return scale > 1.0


def round_size(width: int, height: int) -> tuple[int, int]:
    """A multiple of 8 (the VAE stride), at least 64 (sd-scripts' rule)."""
    return max(64, width - width % 8), max(64, height - height % 8)


@torch.no_grad()
def denoise(unet: nn.Module, scheduler, latents: Tensor, cond: Tensor, uncond: Tensor | None, scale: float,
            steps: int, generator: torch.Generator | None) -> Tensor:
    """Run the scheduler from pure noise `latents` (unscaled N(0,1)); cond/uncond (1, L, D)."""
    device = latents.device
    scheduler.set_timesteps(steps, device=device)
    x = latents * scheduler.init_noise_sigma
    context = cond if uncond is None else torch.cat([uncond, cond])
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    dtype = context.dtype
    for t in scheduler.timesteps:
        model_in = x if uncond is None else torch.cat([x, x])
        model_in = scheduler.scale_model_input(model_in, t)
        pred = unet(model_in.to(dtype), t.expand(model_in.shape[0]).to(device), context).float()
        if uncond is not None:
            neg, pos = pred.chunk(2)
            pred = neg + scale * (pos - neg)
        x = scheduler.step(pred, t, x, **step_kwargs).prev_sample
    return x


@torch.no_grad()
def decode_to_image(vae: nn.Module, latents: Tensor) -> Image.Image:
    """Scaled latents (1, 4, h, w) -> an RGB PIL image."""
    z = latents / vae.config.scaling_factor
    image = vae.decode(z.to(vae.dtype)).sample.float()
    image = (image[0].clamp(-1, 1) + 1) * 127.5
    return Image.fromarray(image.round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())


def generate_image(unet: nn.Module, vae: nn.Module, cond: Tensor, uncond: Tensor | None, *, width: int = DEFAULT_SIZE,
                   height: int = DEFAULT_SIZE, steps: int = DEFAULT_STEPS, scale: float = DEFAULT_SCALE,
                   seed: int | None = None, sampler: str = "ddim", v_prediction: bool = False,
                   device: torch.device | str = "cpu") -> Image.Image:
    """One image. `unet` is called as unet(x, t, context) (SDUNet); `uncond` None means no CFG."""
    width, height = round_size(width, height)
    steps = min(max(int(steps), 1), 1000)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    noise = torch.randn(1, LATENT_CHANNELS, height // 8, width // 8, generator=generator).to(device)
    scheduler = make_scheduler(sampler, v_prediction=v_prediction)
    latents = denoise(unet, scheduler, noise, cond.to(device), None if uncond is None else uncond.to(device), scale,
                      steps, generator)
    return decode_to_image(vae, latents)


__all__ = ["SAMPLERS", "check_sampler", "make_scheduler", "uses_cfg", "round_size", "denoise", "decode_to_image",
           "generate_image"]
