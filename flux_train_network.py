"""Train a LoRA for FLUX.1 dev / schnell or Chroma (the sd-scripts command line).

    accelerate launch flux_train_network.py --pretrained_model_name_or_path flux1-dev.safetensors \
        --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors \
        --dataset_config my.toml --network_module networks.lora_flux --network_dim 16 ...

The loop is library/training/trainer.py; this file supplies only what FLUX does differently:
its files, its text encoding, packing latents into tokens, guidance, and its sampler.
"""

from __future__ import annotations

import argparse
import sys

import torch

from library.errors import ConfigError
from library.offload import estimate_activation_bytes, resolve_deprecated_swap_options
from library.flux import sampling as flux_sampling
from library.flux.loading import check_flux_checkpoint, load_flux_dit
from library.flux.text import FluxTextCacheEncoder, FluxTextEncoding, FluxTextOutputs
from library.autoencoders import load_flux_ae
from library.latent_cache import LatentCacheAdapter
from library.text_encoders import file_fingerprint
from library.training import memory
from library.training.flow_trainer import FlowMatchingTrainer
from library.training.flow_matching import add_flow_matching_arguments
from library.training.model_loading import load_dit_beside, load_with_cpu_fallback
from library.training.trainer import FamilyModels, NoisyInput
from networks.lora_flux import CLIP_L_INDEX, T5_INDEX
from networks.network_args import parse_bool_arg

ARCHITECTURES = {"dev": "flux-1-dev", "schnell": "flux-1-schnell", "chroma": "chroma"}
IMPLEMENTATIONS = {"flux": "https://github.com/black-forest-labs/flux",
                   "chroma": "https://huggingface.co/lodestones/Chroma"}


class FluxNetworkTrainer(FlowMatchingTrainer):
    reso_step_multiple = 64
    default_resolution = 1024

    def add_family_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("FLUX.1 / Chroma")
        g.add_argument("--model_type", type=str, default="flux", choices=["flux", "chroma"])
        g.add_argument("--clip_l", type=str, default=None, help="CLIP-L file (not used by Chroma)")
        g.add_argument("--t5xxl", type=str, default=None, help="T5-XXL file")
        g.add_argument("--ae", type=str, default=None, help="FLUX autoencoder file (ae.safetensors)")
        g.add_argument("--t5xxl_max_token_length", type=int, default=None,
                       help="T5 tokens per caption (default 512 for dev and Chroma, 256 for schnell)")
        g.add_argument("--apply_t5_attn_mask", action="store_true",
                       help="mask T5 padding in T5 and in the DiT attention (always on for Chroma)")
        g.add_argument("--guidance_scale", type=float, default=3.5,
                       help="embedded guidance fed to FLUX.1 dev while training (1.0 recommended; "
                            "ignored by schnell; 0.0 for Chroma)")
        g.add_argument("--split_mode", action="store_true", help="deprecated: means --blocks_to_swap 18")
        g.add_argument("--double_blocks_to_swap", type=int, default=None,
                       help="deprecated: D double + S single blocks mean --blocks_to_swap D + S // 2")
        g.add_argument("--single_blocks_to_swap", type=int, default=None, help="deprecated: see --double_blocks_to_swap")
        add_flow_matching_arguments(
            parser, default_timestep_sampling="sigma", default_discrete_flow_shift=3.0,
            default_model_prediction_type="sigma_scaled",
            timestep_sampling_choices=["sigma", "uniform", "sigmoid", "shift", "flux_shift"])

    def validate_family_args(self, args) -> None:
        problems = []
        if not args.pretrained_model_name_or_path:
            problems.append("--pretrained_model_name_or_path is required (the FLUX.1 or Chroma file)")
        if not args.t5xxl:
            problems.append("--t5xxl is required")
        if not args.ae:
            problems.append("--ae is required (ae.safetensors)")
        if args.model_type == "flux" and not args.clip_l:
            problems.append("--clip_l is required for FLUX.1 (only Chroma runs without it)")
        if args.model_type == "chroma" and args.clip_l:
            problems.append("--clip_l is not used by Chroma: remove it")
        try:
            resolved = resolve_deprecated_swap_options(
                args.blocks_to_swap, double_blocks_to_swap=args.double_blocks_to_swap,
                single_blocks_to_swap=args.single_blocks_to_swap, split_mode=args.split_mode)
        except ConfigError as e:
            problems.append(str(e))
        else:
            args.blocks_to_swap = resolved.blocks_to_swap
            for message in resolved.messages:
                print(f"note: {message}")
        text_cached = args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk
        trains_t5 = not args.network_train_unet_only and parse_bool_arg(args.network_args, "train_t5xxl")
        if text_cached and trains_t5:
            problems.append("--cache_text_encoder_outputs cannot be used while training a T5-XXL LoRA "
                            "(train_t5xxl=True): T5 must run live. Remove one of them (CLIP-L LoRA alone can "
                            "use cached T5 outputs).")
        if args.model_type == "chroma" and args.network_train_text_encoder_only and not trains_t5:
            problems.append("--network_train_text_encoder_only with Chroma trains nothing: Chroma has no CLIP-L; "
                            'add --network_args "train_t5xxl=True" to train a T5-XXL LoRA')
        if args.v2 if hasattr(args, "v2") else False:
            problems.append("--v2 is for SD 2.x, not FLUX")
        if problems:
            raise ConfigError("invalid FLUX options:\n  " + "\n  ".join(problems))
        if args.model_type == "chroma":
            args.apply_t5_attn_mask = True

    # ---- models -------------------------------------------------------------------------------
    def load_models(self, args, device, weight_dtype) -> FamilyModels:
        clip_l = args.clip_l if args.model_type == "flux" else None
        where = memory.load_device(args, device, [args.pretrained_model_name_or_path, args.ae, args.t5xxl, clip_l])
        variant = check_flux_checkpoint(args.pretrained_model_name_or_path, args.model_type).variant  # a wrong file fails now
        if args.t5xxl_max_token_length is None:
            args.t5xxl_max_token_length = 256 if variant == "schnell" else 512
        return load_with_cpu_fallback(args, where, lambda where: self._load_models(args, where, weight_dtype, clip_l))

    def _load_models(self, args, where, weight_dtype, clip_l: str | None) -> FamilyModels:
        def encoders():
            ae = load_flux_ae(args.ae, device=where, dtype=weight_dtype)
            text = FluxTextEncoding.from_files(
                clip_l_path=clip_l, t5xxl_path=args.t5xxl, t5_max_length=args.t5xxl_max_token_length,
                apply_t5_attn_mask=args.apply_t5_attn_mask, tokenizer_cache_dir=args.tokenizer_cache_dir,
                device=where, dtype=weight_dtype, t5_fp8_storage=args.fp8_base and not args.fp8_base_unet)
            return ae, text

        (dit, info), (ae, text) = load_dit_beside(
            where, lambda: load_flux_dit(args.pretrained_model_name_or_path, model_type=args.model_type,
                                         device=where, dtype=weight_dtype),
            encoders, dit_files=[args.pretrained_model_name_or_path], other_files=[args.ae, args.t5xxl, clip_l])
        return FamilyModels(denoiser=dit, text_encoders=[text.clip_l, text.t5], vae=ae, info=info,
                            extra={"text": text})

    def latent_encoder(self, args, models, device):
        if not hasattr(self, "_latent_encoder"):
            # the file's fingerprint, not its path: a replaced file must invalidate the cache
            self._latent_encoder = LatentCacheAdapter(
                models.vae, f"flux-ae:{file_fingerprint(args.ae)}:posterior-sample", device,
                next(models.vae.parameters()).dtype)
        return self._latent_encoder

    def text_encoding(self, args, models, device):
        text = models.extra["text"]
        for encoder in (text.clip_l, text.t5):
            if encoder is not None:
                memory.place(encoder, device)
        return FluxTextCacheEncoder(text)

    def encode_text_for_training(self, args, models, captions, cached, trained, device):
        """CLIP-L (index 0) and T5 (index 1) run live when trained; otherwise their cached outputs
        are used when there are some, else they run without gradients."""
        text = models.extra["text"]

        def part(index: int, run, cached_value):
            if index not in trained and cached_value is not None:
                return cached_value
            with torch.set_grad_enabled(index in trained and torch.is_grad_enabled()):
                return run()

        t5_out, mask = part(T5_INDEX, lambda: text.encode_t5(captions),
                            (cached["t5_out"], cached["t5_attn_mask"]) if cached is not None else None)
        l_pooled = part(CLIP_L_INDEX, lambda: text.encode_clip_pooled(captions),
                        cached["l_pooled"] if cached is not None else None)
        return {"l_pooled": l_pooled.to(device), "t5_out": t5_out.to(device), "t5_attn_mask": mask.to(device),
                "txt_ids": flux_sampling.prepare_txt_ids(len(captions), t5_out.shape[1], device=device)}

    def block_lists(self, models):
        return [models.denoiser.double_blocks, models.denoiser.single_blocks]

    def model_name(self, models):
        return {"dev": "FLUX.1 dev", "schnell": "FLUX.1 schnell", "chroma": "Chroma"}[models.info.variant]

    def activation_bytes_estimate(self, args, models, batch, height, width):
        p = models.denoiser.params
        tokens = (height // 16) * (width // 16) + args.t5xxl_max_token_length
        return estimate_activation_bytes(batch=batch, tokens=tokens, hidden=p.hidden_size,
                                         mlp_hidden=int(p.hidden_size * p.mlp_ratio),
                                         num_blocks=p.depth + p.depth_single_blocks,
                                         gradient_checkpointing=args.gradient_checkpointing,
                                         # under --selective_checkpointing: joint attention, MLP down-projections
                                         kept_outputs_per_block=2 * getattr(args, "selective_checkpointing", False))

    # ---- the forward --------------------------------------------------------------------------
    def denoise(self, args, models, noisy: NoisyInput, text: dict) -> torch.Tensor:
        b, _, h, w = noisy.noisy.shape
        img = flux_sampling.pack_latents(noisy.noisy)
        img_ids = flux_sampling.prepare_img_ids(b, h // 2, w // 2, device=img.device)
        guidance = None
        if models.info.variant == "dev":
            guidance = torch.full((b,), args.guidance_scale, device=img.device)
        mask = text["t5_attn_mask"] if args.apply_t5_attn_mask else None
        dtype = next(models.denoiser.parameters()).dtype
        pred = models.denoiser(img.to(dtype), img_ids, text["t5_out"].to(dtype), text["txt_ids"],
                               noisy.sigmas.to(dtype), text["l_pooled"].to(dtype), guidance=guidance,
                               txt_attention_mask=mask)
        return flux_sampling.unpack_latents(pred, h, w)

    # ---- sampling -----------------------------------------------------------------------------
    def generate_sample(self, args, models, prompt, conds, device, dtype):
        def conditioning(text: str):
            entry = {k: v.unsqueeze(0).to(device) for k, v in conds[text].items() if k in FluxTextOutputs.CACHE_KEYS}
            return FluxTextOutputs.from_cache(entry).conditioning(args.apply_t5_attn_mask, dtype=dtype)

        cfg_scale = prompt.scale if prompt.scale is not None else 1.0
        models.vae.to(device)
        return flux_sampling.generate_image(
            models.denoiser, models.vae, conditioning(prompt.prompt),
            neg=conditioning(prompt.negative_prompt or "") if cfg_scale != 1.0 else None,
            width=prompt.width or 512, height=prompt.height or 512, steps=prompt.sample_steps or 20,
            guidance=prompt.guidance_scale if prompt.guidance_scale is not None else 3.5,
            cfg_scale=cfg_scale, seed=prompt.seed, shift=models.info.variant != "schnell", progress=False)

    # ---- metadata -----------------------------------------------------------------------------
    def metadata_extras(self, args, models):
        variant = models.info.variant
        family = {"ss_model_type": args.model_type, "ss_apply_t5_attn_mask": args.apply_t5_attn_mask,
                  "ss_guidance_scale": args.guidance_scale, **self.flow_metadata(args)}
        modelspec = {"architecture": f"{ARCHITECTURES[variant]}/lora",
                     "implementation": IMPLEMENTATIONS[args.model_type], "prediction_type": None,
                     "default_resolution": 1024}
        return ("chroma" if variant == "chroma" else "flux1"), family, modelspec


def main(argv: list[str] | None = None) -> int:
    return FluxNetworkTrainer().run(argv)


if __name__ == "__main__":
    sys.exit(main())
