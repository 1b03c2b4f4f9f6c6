"""Train a LoRA for Stable Diffusion 1.x / 2.x (the sd-scripts command line).

    accelerate launch train_network.py --pretrained_model_name_or_path v1-5-pruned-emaonly.safetensors \
        --dataset_config my.toml --network_module networks.lora --network_dim 16 --output_dir out ...
    (SD 2.x: add --v2, and --v_parameterization for the 768-v models)

The loop is library/training/trainer.py (`NetworkTrainer`, re-exported here); this file supplies
only what SD 1.x/2.x does differently: its files (ldm single files or diffusers folders, read
by library/sd/loading.py), CLIP text encoding with --clip_skip and --max_token_length, DDPM
noising with ε or v targets and the SNR loss weights (library/training/ddpm.py), and sample
images with diffusers' schedulers.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from library.errors import ConfigError, ModelFileError
from library.latent_cache import LatentCacheAdapter
from library.sd import sampling as sd_sampling
from library.sd.loading import VAE_SCALE_FACTOR, fingerprint, inspect_sd_checkpoint, load_sd_model
from library.sd.model import SDUNet, require_xformers
from library.sd.text import CACHE_KEY, SDTextCacheEncoder, SDTextEncoding, build_text_encoding
from library.training import ddpm
from library.training.losses import LossConfig
from library.training.sample_prompts import load_sample_prompts
from library.training.trainer import FamilyModels, NetworkTrainer, NoisyInput  # noqa: F401  (re-exported)
from library.training import memory

IMPLEMENTATION = "diffusers"   # modelspec.implementation of SD LoRAs (sd-scripts)
SAMPLE_DEFAULTS = {"width": sd_sampling.DEFAULT_SIZE, "height": sd_sampling.DEFAULT_SIZE,
                   "steps": sd_sampling.DEFAULT_STEPS, "scale": sd_sampling.DEFAULT_SCALE}
# Sample-prompt options that mean something for other families only: refused, never ignored.
_FOREIGN_PROMPT_OPTIONS = {
    "guidance_scale": "--g (embedded guidance, FLUX.1 only; SD uses --l for classifier-free guidance)",
    "controlnet_image": "--cn (ControlNet images are not supported for sample images)",
    "cfg_trunc_ratio": "--ctr (Lumina only)",
    "renorm_cfg": "--rcfg (Lumina only)",
    "flow_shift": "--fs (Anima only)",
}


class SDNetworkTrainer(NetworkTrainer):
    reso_step_multiple = 64
    default_resolution = 512

    # ---- options ------------------------------------------------------------------------------
    def add_family_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("Stable Diffusion 1.x / 2.x")
        g.add_argument("--v2", action="store_true",
                       help="the model is SD 2.x (OpenCLIP text encoder); it must agree with the file")
        g.add_argument("--v_parameterization", action="store_true",
                       help="train with the v-prediction target (SD 2.x 768-v models, or v-prediction fine-tunes)")
        g.add_argument("--vae", type=str, default=None,
                       help="use this VAE instead of the checkpoint's (ldm or diffusers file, or diffusers folder)")
        g.add_argument("--no_half_vae", action="store_true",
                       help="keep the VAE in float32 under --mixed_precision fp16/bf16 (avoids NaN latents)")
        g.add_argument("--clip_skip", type=int, default=None,
                       help="use the text encoder's k-th layer from the end (then its final layer norm); 2 for "
                            "models trained that way (NovelAI-style anime models). Default: the last layer")
        g.add_argument("--weighted_captions", action="store_true",
                       help="read A1111 weighting syntax in captions ((word), [word], (word:1.2), \\( escapes): the "
                            "words' text-encoder states are scaled, then rescaled to the unweighted mean (as "
                            "sample prompts always are). Keep commas out of brackets when shuffling or dropping "
                            "tags, or the brackets get split")
        ddpm.add_ddpm_arguments(parser)

    # SD maps these onto its UNet's attention (xformers when installed, SDPA for --mem_eff_attn).
    handled_options = frozenset({"xformers", "mem_eff_attn"})

    def cuda_graph_blockers(self, args) -> list[str]:
        # Timesteps are drawn on the GPU under --cuda_graph (noisy_input); the Huber c's snr
        # schedule still indexes ᾱ on the host.
        if args.loss_type in ("huber", "smooth_l1"):
            return [f"--loss_type {args.loss_type} (its per-timestep c is computed on the CPU); use l2 or l1"]
        return []

    def check_args(self, args) -> None:
        super().check_args(args)
        if args.xformers:
            require_xformers()
        if args.mem_eff_attn:
            print("note: --mem_eff_attn: the UNet uses PyTorch SDPA attention, whose kernels are memory-efficient")

    def validate_family_args(self, args) -> None:
        problems = []
        if getattr(args, "selective_checkpointing", False):
            problems.append("--selective_checkpointing is for the DiT families; the SD UNet checkpoints with "
                            "diffusers' own per-block checkpointing. Remove it")
        path = args.pretrained_model_name_or_path
        if not path:
            problems.append("--pretrained_model_name_or_path is required (an SD 1.x/2.x .safetensors file or a "
                            "diffusers folder)")
        elif not os.path.exists(path):
            problems.append(f"--pretrained_model_name_or_path {path}: file not found")
        elif os.path.isdir(path) or path.endswith(".safetensors"):
            try:   # header only: a wrong family or a --v2 mismatch fails before any dataset work
                inspect_sd_checkpoint(path, v2=args.v2)
            except (ConfigError, ModelFileError) as e:
                problems.append(str(e))
        if args.vae and not os.path.exists(args.vae):
            problems.append(f"--vae {args.vae}: file not found")
        if args.clip_skip is not None and args.clip_skip < 1:
            problems.append(f"--clip_skip must be at least 1 (got {args.clip_skip}); 1 is the last layer")
        try:
            sd_sampling.check_sampler(args.sample_sampler)
        except ConfigError as e:
            problems.append(str(e))
        if args.sample_prompts and os.path.isfile(args.sample_prompts):
            problems += prompt_problems(args.sample_prompts)
        if args.text_encoder_lr and len(args.text_encoder_lr) > 1:
            problems.append(f"--text_encoder_lr takes one value for SD 1.x/2.x (one text encoder); got "
                            f"{len(args.text_encoder_lr)}")
        trains_te = not args.network_train_unet_only
        text_cached = args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk
        if text_cached and trains_te:
            problems.append("--cache_text_encoder_outputs needs a frozen text encoder, but its LoRA is trained: add "
                            "--network_train_unet_only, or remove the text-encoder caching")
        if args.text_encoder_lr and not trains_te:
            problems.append("--text_encoder_lr has no effect with --network_train_unet_only (no text-encoder LoRA is "
                            "trained): remove one of them")
        # the UNet declares no transformer block lists (library/training/memory.py): refuse these
        # now rather than after caching
        if args.torch_compile:
            problems.append("--torch_compile is not supported for the SD 1.x/2.x UNet yet: remove it")
        if getattr(args, "blocks_to_swap", None) not in (None, 0):
            problems.append("--blocks_to_swap is not supported for the SD 1.x/2.x UNet (it fits in GPU memory; use "
                            "--gradient_checkpointing to save more): remove it")
        if getattr(args, "fp8_base", False) or getattr(args, "fp8_base_unet", False):
            problems.append("--fp8_base / --fp8_base_unet are not supported for the SD 1.x/2.x UNet: remove them "
                            "(train in bf16 or fp16)")
        try:
            self._ddpm = ddpm.DDPMConfig.from_args(args)
        except ConfigError as e:
            problems.append(str(e).replace("\n", "\n  "))
        if problems:
            raise ConfigError("invalid SD 1.x/2.x options:\n  " + "\n  ".join(problems))
        self._schedule = ddpm.DDPMSchedule.sd(zero_terminal_snr=args.zero_terminal_snr)

    def ddpm_config(self, args) -> ddpm.DDPMConfig:
        if getattr(self, "_ddpm", None) is None:
            self._ddpm = ddpm.DDPMConfig.from_args(args)
            self._schedule = ddpm.DDPMSchedule.sd(zero_terminal_snr=args.zero_terminal_snr)
        return self._ddpm

    # ---- models -------------------------------------------------------------------------------
    def load_models(self, args, device, weight_dtype) -> FamilyModels:
        where = memory.load_device(args, device)   # the GPU with --lowram, else the CPU
        path = args.pretrained_model_name_or_path
        vae_dtype = torch.float32 if args.no_half_vae else weight_dtype
        parts = load_sd_model(path, v2=args.v2, vae_path=args.vae, device=where, dtype=weight_dtype,
                              vae_dtype=vae_dtype)
        info = parts.info
        print(f"{path}: {info.label} ({info.layout}), UNet widths {info.unet_config['block_out_channels']}, text "
              f"encoder {parts.text_encoder.config.num_hidden_layers} layers x {parts.text_encoder.config.hidden_size}")
        text = build_text_encoding(parts.text_encoder, info.v2, tokenizer_cache_dir=args.tokenizer_cache_dir,
                                   tokenizer_dir=parts.tokenizer_dir, clip_skip=args.clip_skip,
                                   max_token_length=args.max_token_length,
                                   weights_identity=fingerprint(path, "text_encoder"),
                                   weighted_captions=args.weighted_captions)
        unet = SDUNet(parts.unet)
        unet.set_attention("xformers" if args.xformers else "sdpa")
        vae_identity = fingerprint(args.vae, "vae") if args.vae else fingerprint(path, "vae")
        return FamilyModels(denoiser=unet, text_encoders=[parts.text_encoder], vae=parts.vae, info=info,
                            extra={"text": text, "vae_identity": vae_identity})

    def model_name(self, models) -> str:
        return f"{models.info.label} UNet"

    def latent_encoder(self, args, models, device):
        if not hasattr(self, "_latent_encoder"):
            vae = models.vae   # a diffusers AutoencoderKL: scaled posterior samples
            self._latent_encoder = LatentCacheAdapter(
                vae, f"sd-vae:{models.extra['vae_identity']}:{vae.dtype}:scale={VAE_SCALE_FACTOR}:posterior-sample",
                device, vae.dtype, encode=lambda v, images: v.encode(images).latent_dist.sample() * VAE_SCALE_FACTOR)
        return self._latent_encoder

    def text_encoding(self, args, models, device):
        memory.place(models.text_encoders[0], device)
        return SDTextCacheEncoder(models.extra["text"])

    def encode_text_for_training(self, args, models, captions, cached, trained, device):
        """The text encoder runs live with gradients when its LoRA is trained (index 0)."""
        if 0 not in trained and cached is not None:
            return cached
        text: SDTextEncoding = models.extra["text"]
        with torch.set_grad_enabled(0 in trained and torch.is_grad_enabled()):
            states = text.encode(captions)
        return {CACHE_KEY: states.to(device)}

    def encode_prompts_for_sampling(self, args, models, prompts, device) -> dict:
        """Sample prompts are read with A1111 weighting ((word), [word], (word:1.5)), as in
        sd-scripts; a prompt without that syntax is encoded exactly as a caption."""
        self.text_encoding(args, models, device)   # puts the text encoder on the device
        text: SDTextEncoding = models.extra["text"]
        texts = sorted({p.prompt for p in prompts} | {p.negative_prompt or "" for p in prompts})
        with torch.no_grad():
            states = text.encode_weighted(texts).float().cpu()
        return {t: {CACHE_KEY: states[i]} for i, t in enumerate(texts)}

    def refresh_sample_conds(self, state) -> None:
        """Text-encoder LoRA: re-encode the sample prompts (weighted) with the encoder as trained."""
        text: SDTextEncoding = state.models.extra["text"]
        texts = list(state.sample_conds)
        with torch.no_grad(), state.accelerator.autocast():
            states = text.encode_weighted(texts).to(state.device)
        state.sample_conds = {t: {CACHE_KEY: states[i]} for i, t in enumerate(texts)}

    # ---- timesteps, forward, loss -------------------------------------------------------------
    def noisy_input(self, args, latents, noise) -> NoisyInput:
        cfg = self.ddpm_config(args)
        # --cuda_graph draws them on the GPU (a recorded step cannot draw on the CPU): another
        # random stream than sd-scripts' (docs/compatibility.md)
        timesteps = ddpm.sample_timesteps(cfg, latents.shape[0], device=latents.device,
                                          on_device=bool(getattr(args, "cuda_graph", False)))
        noise = ddpm.noise_with_options(cfg, noise, latents)
        return self._noisy(cfg, latents, noise, ddpm.input_noise(cfg, noise), timesteps)

    def noisy_input_at(self, args, latents, noise, sigma) -> NoisyInput:
        """Validation: the DDPM timestep round(1000·σ) (σ = 0.1 ... 0.9 -> t = 100 ... 900)."""
        cfg = self.ddpm_config(args)
        t = min(max(round(float(sigma) * ddpm.NUM_TRAIN_TIMESTEPS), 0), ddpm.NUM_TRAIN_TIMESTEPS - 1)
        timesteps = torch.full((latents.shape[0],), t, dtype=torch.long, device=latents.device)
        return self._noisy(cfg, latents, noise, noise, timesteps)

    def _noisy(self, cfg, latents, noise, input_noise, timesteps) -> NoisyInput:
        schedule = self._schedule
        noisy = schedule.add_noise(latents, input_noise, timesteps)
        target = schedule.velocity(latents, noise, timesteps) if cfg.v_parameterization else noise
        return NoisyInput(noisy=noisy, timesteps=timesteps, sigmas=timesteps.float() / ddpm.NUM_TRAIN_TIMESTEPS,
                          target=target)

    def denoise(self, args, models, noisy: NoisyInput, text: dict) -> torch.Tensor:
        dtype = models.denoiser.dtype
        return models.denoiser(noisy.noisy.to(dtype), noisy.timesteps, text[CACHE_KEY].to(dtype))

    def loss_terms(self, args, model_pred, noisy: NoisyInput):
        """The prediction as is (ε or v), weighted per sample by the SNR options."""
        return model_pred, ddpm.loss_weights(self.ddpm_config(args), self._schedule, noisy.timesteps)

    def loss_config(self, args) -> LossConfig:
        self.ddpm_config(args)
        return LossConfig.from_args(args, flow=False, alphas_cumprod=self._schedule.alphas_cumprod)

    # ---- sampling -----------------------------------------------------------------------------
    def generate_sample(self, args, models, prompt, conds, device, dtype):
        scale = prompt.scale if prompt.scale is not None else SAMPLE_DEFAULTS["scale"]

        def states(text: str) -> torch.Tensor:
            return conds[text][CACHE_KEY].unsqueeze(0).to(device, dtype)

        models.vae.to(device)
        return sd_sampling.generate_image(
            models.denoiser, models.vae, states(prompt.prompt),
            states(prompt.negative_prompt or "") if sd_sampling.uses_cfg(scale) else None,
            width=prompt.width or SAMPLE_DEFAULTS["width"], height=prompt.height or SAMPLE_DEFAULTS["height"],
            steps=prompt.sample_steps or SAMPLE_DEFAULTS["steps"], scale=scale, seed=prompt.seed,
            sampler=prompt.sample_sampler or args.sample_sampler, v_prediction=args.v_parameterization, device=device)

    # ---- metadata -----------------------------------------------------------------------------
    def metadata_extras(self, args, models):
        v2, v_pred = models.info.v2, args.v_parameterization
        base = "sd" + ("_v2" if v2 else "_v1") + ("_v" if v_pred else "")
        arch = ("stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512") if v2 else "stable-diffusion-v1"
        modelspec = {"architecture": f"{arch}/lora", "implementation": IMPLEMENTATION,
                     "prediction_type": "v" if v_pred else "epsilon",
                     "default_resolution": 768 if (v2 and v_pred) else 512}
        return base, {}, modelspec


def prompt_problems(path: str) -> list[str]:
    """Unknown samplers and options for other families in a sample-prompt file."""
    problems = []
    for prompt in load_sample_prompts(path):
        if prompt.sample_sampler is not None:
            try:
                sd_sampling.check_sampler(prompt.sample_sampler, where=f"--sample_prompts: prompt {prompt.index} --ss")
            except ConfigError as e:
                problems.append(str(e))
        for name, what in _FOREIGN_PROMPT_OPTIONS.items():
            if getattr(prompt, name) is not None:
                problems.append(f"--sample_prompts: prompt {prompt.index} sets {what}: remove it")
    return problems


def main(argv: list[str] | None = None) -> int:
    return SDNetworkTrainer().run(argv)


if __name__ == "__main__":
    sys.exit(main())
