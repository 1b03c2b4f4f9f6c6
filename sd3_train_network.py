"""Train a LoRA for SD3 Medium, SD3.5 Medium or SD3.5 Large (the sd-scripts command line).

    accelerate launch sd3_train_network.py --pretrained_model_name_or_path sd3.5_large.safetensors \
        --clip_l clip_l.safetensors --clip_g clip_g.safetensors --t5xxl t5xxl_fp16.safetensors \
        --dataset_config my.toml --network_module networks.lora_sd3 --network_dim 16 ...

The loop is library/training/trainer.py; this file supplies only what SD3 does differently: its
files (the VAE and the text encoders may sit inside the checkpoint), the CLIP-L + CLIP-G + T5
encoding with per-encoder dropout, its timestep sampling and x0 objective
(library/training/flow_matching.py, SD3 section), the positional-embedding options and its
sampler.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

import torch

from library.errors import ConfigError
from library.latent_cache import LatentCacheAdapter
from library.offload import estimate_activation_bytes
from library.sd3 import sampling as sd3_sampling
from library.sd3.loading import inspect_sd3_checkpoint, load_sd3_mmdit, load_sd3_vae
from library.sd3.pos_embed import latent_sizes_for_resolutions
from library.sd3.text import DEFAULT_T5_MAX_LENGTH, SD3TextCacheEncoder, SD3TextEncoding, SD3TextOutputs, TextDropout
from library.text_encoders import file_fingerprint
from library.training import flow_matching as fm
from library.training.losses import LossConfig
from library.training.model_loading import load_dit_beside, load_with_cpu_fallback
from library.training.sample_prompts import load_sample_prompts
from library.training.trainer import FamilyModels, NetworkTrainer, NoisyInput
from library.training import memory
from networks.lora_sd3 import CLIP_G_INDEX, CLIP_L_INDEX, T5_INDEX, expand_text_encoder_lrs
from networks.network_args import parse_bool_arg

IMPLEMENTATION = "diffusers"   # what sd-scripts writes as modelspec.implementation for SD3 LoRAs
SAMPLE_DEFAULTS = {"width": 512, "height": 512, "steps": 30, "cfg_scale": 7.5}
# Sample-prompt options that mean something for other families only: refused, never ignored.
_FOREIGN_PROMPT_OPTIONS = {
    "guidance_scale": "--g (embedded guidance, FLUX.1 only; SD3 uses --l for classifier-free guidance)",
    "sample_sampler": "--ss (SD 1.x/2.x samplers; SD3 samples with its Euler sampler)",
    "controlnet_image": "--cn (ControlNet images are not supported for SD3)",
    "cfg_trunc_ratio": "--ctr (Lumina only)",
    "renorm_cfg": "--rcfg (Lumina only)",
    "flow_shift": "--fs (Anima only; SD3 samples with shift 3.0)",
}


class SD3NetworkTrainer(NetworkTrainer):
    reso_step_multiple = 32
    default_resolution = 1024
    _dropout = TextDropout()   # set from the options by validate_family_args

    def cuda_graph_blockers(self, args) -> list[str]:
        drawn_on_cpu = [f"--{name}" for name in ("clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate",
                                                 "pos_emb_random_crop_rate") if getattr(args, name, 0)]
        return [f"{', '.join(drawn_on_cpu)} (drawn on the CPU each step)"] if drawn_on_cpu else []

    # ---- options ------------------------------------------------------------------------------
    def add_family_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("SD3 / SD3.5 model files and text")
        g.add_argument("--clip_l", type=str, default=None,
                       help="CLIP-L file (not needed when the checkpoint contains text_encoders.clip_l)")
        g.add_argument("--clip_g", type=str, default=None,
                       help="CLIP-G file (not needed when the checkpoint contains text_encoders.clip_g)")
        g.add_argument("--t5xxl", type=str, default=None,
                       help="T5-XXL file (not needed when the checkpoint contains text_encoders.t5xxl)")
        g.add_argument("--vae", type=str, default=None,
                       help="VAE file; not needed: the standard SD3 checkpoints contain the VAE")
        g.add_argument("--t5xxl_max_token_length", type=int, default=DEFAULT_T5_MAX_LENGTH,
                       help="T5 tokens per caption")
        g.add_argument("--apply_lg_attn_mask", action="store_true",
                       help="pass the CLIP-L/G padding masks to the CLIP encoders (the MMDiT attends to all tokens)")
        g.add_argument("--apply_t5_attn_mask", action="store_true",
                       help="pass the T5 padding mask to T5 (the MMDiT attends to all tokens)")
        g.add_argument("--clip_l_dropout_rate", type=float, default=0.0,
                       help="probability of zeroing a sample's CLIP-L output (states, pooled, mask)")
        g.add_argument("--clip_g_dropout_rate", type=float, default=0.0,
                       help="probability of zeroing a sample's CLIP-G output")
        g.add_argument("--t5_dropout_rate", type=float, default=0.0,
                       help="probability of zeroing a sample's T5 output")
        g.add_argument("--pos_emb_random_crop_rate", type=float, default=0.0,
                       help="probability that a training step uses a random window of the positional "
                            "embedding instead of the centre one (SD3.5 M model card)")
        g.add_argument("--enable_scaled_pos_embed", action="store_true",
                       help="experimental, for SD3.5 M multi-resolution training: one positional table per "
                            "dataset resolution, so every resolution sees the same central positions")
        fm.add_sd3_timestep_arguments(parser)

    def validate_family_args(self, args) -> None:
        problems = []
        if not args.pretrained_model_name_or_path:
            problems.append("--pretrained_model_name_or_path is required (the SD3 / SD3.5 .safetensors file)")
        for option in ("pretrained_model_name_or_path", "clip_l", "clip_g", "t5xxl", "vae"):
            path = getattr(args, option)
            if path and not os.path.exists(path):
                problems.append(f"--{option} {path}: file not found")
        if args.max_token_length is not None:
            problems.append(f"--max_token_length {args.max_token_length} is for SD 1.x/2.x: SD3's CLIP encoders read "
                            "77 tokens. Remove it (use --t5xxl_max_token_length for T5).")
        if args.sample_sampler != "ddim":
            problems.append(f"--sample_sampler {args.sample_sampler} is for SD 1.x/2.x: SD3 samples with its own "
                            "Euler sampler. Remove it.")
        if args.t5xxl_max_token_length < 1:
            problems.append(f"--t5xxl_max_token_length must be at least 1 (got {args.t5xxl_max_token_length})")
        for option in ("clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate", "pos_emb_random_crop_rate"):
            value = getattr(args, option)
            if not 0.0 <= value <= 1.0:
                problems.append(f"--{option} must be between 0 and 1 (got {value})")
        text_cached = args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk
        trains_te = not args.network_train_unet_only
        if text_cached and trains_te and parse_bool_arg(args.network_args, "train_t5xxl"):
            problems.append("--cache_text_encoder_outputs cannot be used while training a T5-XXL LoRA "
                            "(train_t5xxl=True): T5 must run live. Remove one of them (a CLIP-L + CLIP-G LoRA "
                            "alone can use cached T5 outputs).")
        if args.text_encoder_lr and not trains_te:
            problems.append("--text_encoder_lr has no effect with --network_train_unet_only (no text-encoder "
                            "LoRA is trained): remove one of them")
        try:
            lrs = expand_text_encoder_lrs(args.text_encoder_lr)
        except ConfigError as e:
            problems.append(str(e))
        else:
            # two values mean CLIP-L, CLIP-G, and CLIP-G's again for T5 (the SD3 guide)
            if lrs is not None and len(args.text_encoder_lr) == 2:
                args.text_encoder_lr = lrs
        if args.sample_prompts and os.path.isfile(args.sample_prompts):
            problems += foreign_prompt_options(args.sample_prompts)
        try:
            self._flow = fm.SD3FlowConfig.from_args(args)
        except ConfigError as e:
            problems.append(str(e).replace("\n", "\n  "))
        if problems:
            raise ConfigError("invalid SD3 options:\n  " + "\n  ".join(problems))
        self._dropout = TextDropout(args.clip_l_dropout_rate, args.clip_g_dropout_rate, args.t5_dropout_rate)

    def flow_config(self, args) -> fm.SD3FlowConfig:
        if getattr(self, "_flow", None) is None:
            self._flow = fm.SD3FlowConfig.from_args(args)
        return self._flow

    # ---- models -------------------------------------------------------------------------------
    def load_models(self, args, device, weight_dtype) -> FamilyModels:
        checkpoint = args.pretrained_model_name_or_path
        where = memory.load_device(args, device, [checkpoint, args.vae, args.clip_l, args.clip_g, args.t5xxl])
        info = inspect_sd3_checkpoint(checkpoint)   # a wrong file fails now, before anything loads
        print(f"{checkpoint}: {info.variant.label}, {info.params.depth} blocks")
        if args.enable_scaled_pos_embed and info.variant.name != "5-medium":
            print(f"note: --enable_scaled_pos_embed is an experimental feature meant for SD3.5 Medium; "
                  f"using it with {info.variant.label}")
        return load_with_cpu_fallback(
            args, where, lambda where: self._load_models(args, where, weight_dtype, info.params.context_in_features))

    def _load_models(self, args, where, weight_dtype, context_width: int) -> FamilyModels:
        checkpoint = args.pretrained_model_name_or_path

        def encoders():
            vae = load_sd3_vae(checkpoint, args.vae, device=where, dtype=weight_dtype)
            text = SD3TextEncoding.from_files(
                checkpoint=checkpoint, clip_l_path=args.clip_l, clip_g_path=args.clip_g, t5xxl_path=args.t5xxl,
                t5_max_length=args.t5xxl_max_token_length, apply_lg_attn_mask=args.apply_lg_attn_mask,
                apply_t5_attn_mask=args.apply_t5_attn_mask, tokenizer_cache_dir=args.tokenizer_cache_dir,
                device=where, dtype=weight_dtype, context_width=context_width)
            return vae, text

        # separate files are prefetched; the parts inside the checkpoint are read with their own keys
        (mmdit, info), (vae, text) = load_dit_beside(
            where, lambda: load_sd3_mmdit(checkpoint, device=where, dtype=weight_dtype), encoders,
            dit_files=[checkpoint], other_files=[args.vae, args.clip_l, args.clip_g, args.t5xxl])
        mmdit.set_pos_emb_random_crop_rate(args.pos_emb_random_crop_rate)
        return FamilyModels(denoiser=mmdit, text_encoders=[text.clip_l, text.clip_g, text.t5], vae=vae, info=info,
                            extra={"text": text, "vae_file": args.vae or checkpoint})

    def model_name(self, models) -> str:
        return models.info.variant.label

    def block_lists(self, models):
        return [models.denoiser.joint_blocks]

    def activation_bytes_estimate(self, args, models, batch, height, width):
        p = models.info.params
        tokens = (height // 16) * (width // 16) + 77 + args.t5xxl_max_token_length
        return estimate_activation_bytes(batch=batch, tokens=tokens, hidden=p.hidden_size, mlp_hidden=p.mlp_hidden_dim,
                                         num_blocks=p.depth, gradient_checkpointing=args.gradient_checkpointing,
                                         # under --selective_checkpointing: joint attention, MLP fc2
                                         kept_outputs_per_block=2 * getattr(args, "selective_checkpointing", False))

    def latent_encoder(self, args, models, device):
        if not hasattr(self, "_latent_encoder"):
            # scaled (z - 0.0609) * 1.5305 posterior samples; the file's fingerprint, not its path
            dtype = models.vae.dtype
            self._latent_encoder = LatentCacheAdapter(
                models.vae, f"sd3-vae:{file_fingerprint(models.extra['vae_file'])}:{dtype}:scaled-posterior-sample",
                device, dtype)
        return self._latent_encoder

    def text_encoding(self, args, models, device):
        for encoder in models.text_encoders:
            if encoder is not None:
                memory.place(encoder, device)
        return SD3TextCacheEncoder(models.extra["text"])

    def prepare_run(self, args, accelerator, device, weight_dtype, models, group, val_group=None):
        """Check every bucket and sample size against the positional table, and build the scaled
        tables (--enable_scaled_pos_embed) from the datasets' resolutions, before the loop."""
        if args.enable_scaled_pos_embed:
            sizes = latent_sizes_for_resolutions([ds.spec.resolution for ds in group.datasets])
            models.denoiser.enable_scaled_pos_embed(sizes)
            print(f"scaled positional embeddings for latent sizes {sizes}")
        check_image_sizes(args, models, [group, val_group])
        return super().prepare_run(args, accelerator, device, weight_dtype, models, group, val_group)

    # ---- text ---------------------------------------------------------------------------------
    def encode_text_for_training(self, args, models, captions, cached, trained, device):
        """The trained encoders (indices in `trained`: 0 CLIP-L, 1 CLIP-G, 2 T5) run live with
        gradients; the others come from `cached` when there is one, else run without gradients."""
        text: SD3TextEncoding = models.extra["text"]
        before = SD3TextOutputs.from_cache(cached) if cached is not None else None
        lw, pw = text.clip_l_width, text.clip_l_pooled_width

        def part(index: int, run, from_cache):
            if index not in trained and before is not None:
                return from_cache()
            with torch.set_grad_enabled(index in trained and torch.is_grad_enabled()):
                return run()

        l_states, l_pooled, l_mask = part(
            CLIP_L_INDEX, lambda: text.encode_clip_l(captions),
            lambda: (before.lg_out[..., :lw], before.lg_pooled[..., :pw], before.clip_l_attn_mask))
        g_states, g_pooled, g_mask = part(
            CLIP_G_INDEX, lambda: text.encode_clip_g(captions),
            lambda: (before.lg_out[..., lw:], before.lg_pooled[..., pw:], before.clip_g_attn_mask))
        t5_out, t5_mask = part(T5_INDEX, lambda: text.encode_t5_states(captions),
                               lambda: (before.t5_out, before.t5_attn_mask))
        return {
            "lg_out": torch.cat((l_states.to(device).float(), g_states.to(device).float()), dim=-1),
            "lg_pooled": torch.cat((l_pooled.to(device).float(), g_pooled.to(device).float()), dim=-1),
            "t5_out": t5_out.to(device),
            "clip_l_attn_mask": l_mask.to(device), "clip_g_attn_mask": g_mask.to(device),
            "t5_attn_mask": t5_mask.to(device),
        }

    def batch_text(self, state, batch):
        """The batch's text outputs, with --clip_l/--clip_g/--t5_dropout_rate applied while
        training (the network is in training mode; validation and sampling run in eval mode)."""
        text = super().batch_text(state, batch)
        if not (state.network.training and self._dropout.active):
            return text
        encoding: SD3TextEncoding = state.models.extra["text"]
        dropped = self._dropout.apply(SD3TextOutputs.from_cache(text), encoding.clip_l_width,
                                      encoding.clip_l_pooled_width)
        return {**text, **{k: getattr(dropped, k) for k in SD3TextOutputs.CACHE_KEYS}}

    # ---- timesteps, forward, loss -------------------------------------------------------------
    def noisy_input(self, args, latents, noise) -> NoisyInput:
        cfg = self.flow_config(args)
        timesteps = fm.sample_sd3_timesteps(cfg, latents.shape[0], device=latents.device)
        sigmas = timesteps / fm.NUM_TRAIN_TIMESTEPS
        noise = fm.offset_noise(cfg.noise, noise, latents=latents)
        noisy = fm.make_noisy_input(cfg.noise, latents, noise, sigmas)
        return NoisyInput(noisy=noisy, timesteps=timesteps, sigmas=sigmas, target=latents)

    def noisy_input_at(self, args, latents, noise, sigma) -> NoisyInput:
        sigmas = torch.full((latents.shape[0],), float(sigma), device=latents.device)
        noisy = (1 - sigma) * latents + sigma * noise
        return NoisyInput(noisy=noisy, timesteps=sigmas * fm.NUM_TRAIN_TIMESTEPS, sigmas=sigmas, target=latents)

    def batch_loss(self, state, batch, noisy, text):
        with random_pos_crop(state.models.denoiser, state.network.training and state.args.pos_emb_random_crop_rate > 0):
            return super().batch_loss(state, batch, noisy, text)

    def denoise(self, args, models, noisy: NoisyInput, text: dict) -> torch.Tensor:
        # the embedder's dtype: block weights may be stored in fp8 (--fp8_base), the embedders never
        dtype = models.denoiser.x_embedder.proj.weight.dtype
        cond = SD3TextOutputs.from_cache(text).conditioning(dtype)
        return models.denoiser(noisy.noisy.to(dtype), noisy.timesteps, cond.y, cond.context)

    def loss_terms(self, args, model_pred, noisy: NoisyInput):
        cfg = self.flow_config(args)
        pred = fm.sd3_x0_prediction(model_pred, noisy.noisy.float(), noisy.sigmas)
        weighting = fm.sd3_loss_weighting(cfg.weighting_scheme, noisy.sigmas) if cfg.weights_loss else None
        return pred, weighting

    def loss_config(self, args) -> LossConfig:
        return LossConfig.from_args(args, flow=True)

    # ---- sampling -----------------------------------------------------------------------------
    def generate_sample(self, args, models, prompt, conds, device, dtype):
        def conditioning(text: str):
            entry = {k: conds[text][k].unsqueeze(0).to(device) for k in SD3TextOutputs.CACHE_KEYS}
            return SD3TextOutputs.from_cache(entry).conditioning(dtype)

        models.vae.to(device)
        return sd3_sampling.generate_image(
            models.denoiser, models.vae, conditioning(prompt.prompt), conditioning(prompt.negative_prompt or ""),
            width=prompt.width or SAMPLE_DEFAULTS["width"], height=prompt.height or SAMPLE_DEFAULTS["height"],
            steps=prompt.sample_steps or SAMPLE_DEFAULTS["steps"],
            cfg_scale=prompt.scale if prompt.scale is not None else SAMPLE_DEFAULTS["cfg_scale"],
            seed=prompt.seed, progress=False)

    # ---- metadata -----------------------------------------------------------------------------
    def metadata_extras(self, args, models):
        variant = models.info.variant
        family = {
            "ss_apply_lg_attn_mask": args.apply_lg_attn_mask, "ss_apply_t5_attn_mask": args.apply_t5_attn_mask,
            **self.flow_config(args).metadata(),
            "ss_t5xxl_max_token_length": args.t5xxl_max_token_length,
            "ss_clip_l_dropout_rate": args.clip_l_dropout_rate, "ss_clip_g_dropout_rate": args.clip_g_dropout_rate,
            "ss_t5_dropout_rate": args.t5_dropout_rate, "ss_pos_emb_random_crop_rate": args.pos_emb_random_crop_rate,
            "ss_enable_scaled_pos_embed": args.enable_scaled_pos_embed,
        }
        modelspec = {"architecture": variant.modelspec_architecture, "implementation": IMPLEMENTATION,
                     "prediction_type": None, "default_resolution": 1024}
        return variant.name, family, modelspec


@contextmanager
def random_pos_crop(mmdit: torch.nn.Module, enabled: bool):
    """The MMDiT draws a random positional window (--pos_emb_random_crop_rate) only in training
    mode; it is kept in eval mode otherwise, so samples and validation use the centre window.
    The window is drawn before the blocks run, so checkpoint recomputation reuses it."""
    if not enabled:
        yield
        return
    mmdit.train()
    try:
        yield
    finally:
        mmdit.eval()


def check_image_sizes(args, models: FamilyModels, groups) -> None:
    """Every bucket and sample size must fit the positional embedding (the table of G x G
    patches of 16 px, or the scaled tables with --enable_scaled_pos_embed): asked of the model
    itself, before training starts instead of at the first batch or sample that does not fit."""
    pixels_per_patch = 8 * models.info.params.patch_size
    sizes: dict[tuple[int, int], str] = {}
    for group in groups:
        if group is None:
            continue
        for ds in group.datasets:
            for w, h in ds.bucket_slots:
                sizes.setdefault((w, h), f"bucket {w}x{h}")
    if args.sample_prompts:
        for p in load_sample_prompts(args.sample_prompts):
            w, h = sd3_sampling.round_image_size(p.width or SAMPLE_DEFAULTS["width"],
                                                 p.height or SAMPLE_DEFAULTS["height"])
            sizes.setdefault((w, h), f"sample prompt {p.index} ({w}x{h})")
    problems = []
    for (w, h), what in sizes.items():
        try:
            models.denoiser.positional_embedding(h // pixels_per_patch, w // pixels_per_patch)
        except ValueError as e:
            problems.append(f"{what}: {e}")
    if problems:
        raise ConfigError(f"these image sizes do not fit {models.info.variant.label}'s positional embedding:\n  "
                          + "\n  ".join(problems) + "\nLower max_bucket_reso / the resolution, or the sample size.")


def foreign_prompt_options(path: str) -> list[str]:
    """A problem for each sample prompt that sets an option SD3's sampler has no use for."""
    problems = []
    for prompt in load_sample_prompts(path):
        for name, what in _FOREIGN_PROMPT_OPTIONS.items():
            if getattr(prompt, name) is not None:
                problems.append(f"--sample_prompts: prompt {prompt.index} sets {what}: remove it")
    return problems


def main(argv: list[str] | None = None) -> int:
    return SD3NetworkTrainer().run(argv)


if __name__ == "__main__":
    sys.exit(main())
