"""Train a LoRA for Lumina Image 2.0 (the sd-scripts command line).

    accelerate launch lumina_train_network.py --pretrained_model_name_or_path lumina-image-2.safetensors \
        --gemma2 gemma_2_2b_fp16.safetensors --ae ae.safetensors --dataset_config my.toml \
        --network_module networks.lora_lumina --network_dim 8 --timestep_sampling nextdit_shift \
        --system_prompt "You are an assistant designed to generate high-quality images based on user prompts." ...

The loop is library/training/trainer.py and the flow-matching math library/training/flow_matching.py;
this file supplies only what Lumina does differently: its files (Next-DiT, Gemma2, the FLUX AE),
the system prompt and caption mask, the reversed time and target (the DiT is fed 1 - sigma and
predicts the velocity towards the image, FORMATS 3.3), and its sampler (CFG truncation and
renormalisation).
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from library.attention import set_attention_backend
from library.autoencoders import load_flux_ae
from library.errors import ConfigError
from library.fp8 import quantize_linears_
from library.latent_cache import LatentCacheAdapter
from library.lumina.loading import describe_variant, inspect_lumina_checkpoint, load_lumina_dit
from library.lumina.model import VARIANTS
from library.lumina.sampling import (DEFAULT_CFG_SCALE, DEFAULT_CFG_TRUNC_RATIO, DEFAULT_RENORM_CFG, DEFAULT_SHIFT,
                                     DEFAULT_SIZE, DEFAULT_STEPS, LuminaConditioning, generate_image)
from library.lumina.text import (LuminaTextCacheEncoder, LuminaTextEncoding, LuminaTextOutputs, add_text_arguments,
                                 check_max_length)
from library.offload import estimate_activation_bytes
from library.text_encoders import file_fingerprint
from library.training.flow_matching import add_flow_matching_arguments
from library.training.flow_trainer import FlowMatchingTrainer
from library.training.model_loading import load_dit_beside, load_with_cpu_fallback
from library.training.sample_prompts import SamplePrompt, load_sample_prompts
from library.training.trainer import FamilyModels, NoisyInput
from library.training import memory
from networks.lora_lumina import GEMMA2_INDEX

TIMESTEP_SAMPLING_CHOICES = ["sigma", "uniform", "sigmoid", "shift", "flux_shift", "nextdit_shift"]
# Sample-prompt options of other families; Lumina's sampler has no use for them.
_FOREIGN_PROMPT_OPTIONS = {"guidance_scale": "--g (FLUX embedded guidance)", "sample_sampler": "--ss (SD sampler)",
                           "controlnet_image": "--cn (ControlNet image)", "flow_shift": "--fs (Anima flow shift)"}


class LuminaNetworkTrainer(FlowMatchingTrainer):
    reversed_time = True          # the DiT is fed t = 1 - sigma (1 = clean image)
    reversed_target = True        # ... and predicts x0 - noise
    # One latent patch is 16 pixels (AE stride 8 x patch 2): every bucket size that is a multiple
    # of 16 works (sd-scripts asks for multiples of 32).
    reso_step_multiple = 16
    default_resolution = 1024

    def cuda_graph_blockers(self, args) -> list[str]:
        # Under --cuda_graph the DiT keeps the captions' padded length (denoise: fixed_length) and
        # masks on the device; flash-attn's varlen packing would read the lengths to the host.
        if args.use_flash_attn:
            return ["--use_flash_attn (its varlen kernel packs the real tokens by lengths read to the host); "
                    "remove it: SDPA runs the masked attention"]
        return []

    def add_family_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("Lumina Image 2.0")
        g.add_argument("--gemma2", type=str, default=None,
                       help="Gemma2 2B text encoder (gemma_2_2b_fp16.safetensors; its embedded tokenizer is used)")
        g.add_argument("--ae", type=str, default=None, help="the autoencoder: FLUX's ae.safetensors")
        add_text_arguments(g)
        g.add_argument("--use_flash_attn", action="store_true",
                       help="flash-attn kernels (varlen: no compute on caption padding); needs "
                            "`pip install flash-attn` and a CUDA GPU. Default: PyTorch SDPA (cuDNN first)")
        g.add_argument("--use_sage_attn", action="store_true",
                       help="refused for training (SageAttention has no backward pass); use it with "
                            "lumina_minimal_inference.py")
        add_flow_matching_arguments(
            parser, default_timestep_sampling="shift", default_discrete_flow_shift=6.0,
            default_model_prediction_type="raw", timestep_sampling_choices=TIMESTEP_SAMPLING_CHOICES)
        sd = parser.add_argument_group("SD 1.x/2.x options (declared so old command lines get a clear error; "
                                       "refused for Lumina)")
        sd.add_argument("--v2", action="store_true", help="SD 2.x only: refused here")
        sd.add_argument("--v_parameterization", action="store_true", help="SD 2.x only: refused here")
        sd.add_argument("--clip_skip", type=int, default=None, help="SD 1.x/2.x only: refused here")

    def validate_family_args(self, args) -> None:
        problems = []
        if not args.pretrained_model_name_or_path:
            problems.append("--pretrained_model_name_or_path is required (lumina-image-2.safetensors or "
                            "lumina_2_model_bf16.safetensors)")
        if not args.gemma2:
            problems.append("--gemma2 is required (gemma_2_2b_fp16.safetensors)")
        if not args.ae:
            problems.append("--ae is required (the FLUX autoencoder, ae.safetensors)")
        for flag, value in (("--v2", args.v2), ("--v_parameterization", args.v_parameterization),
                            ("--clip_skip", args.clip_skip is not None)):
            if value:
                problems.append(f"{flag} is a Stable Diffusion 1.x/2.x option and has no meaning for Lumina Image "
                                "2.0: remove it")
        if args.use_sage_attn:
            problems.append("--use_sage_attn cannot train: SageAttention has no backward pass. Remove it (use "
                            "--use_flash_attn or the default SDPA); it speeds up lumina_minimal_inference.py")
        try:
            check_max_length(args.gemma2_max_token_length)
        except ConfigError as e:
            problems.append(str(e))
        text_cached = args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk
        if text_cached and not args.network_train_unet_only:
            if args.network_train_text_encoder_only:
                problems.append("--network_train_text_encoder_only trains Gemma2, which then runs on every step: "
                                "remove --cache_text_encoder_outputs")
            else:
                # The guide's own command caches text outputs without --network_train_unet_only: as for
                # Anima, cached text means the DiT alone is trained; said, not silent.
                print("note: --cache_text_encoder_outputs without --network_train_unet_only: the text outputs are "
                      "cached, so only the DiT LoRA is trained. Remove --cache_text_encoder_outputs to train a "
                      "Gemma2 LoRA too.")
                args.network_train_unet_only = True
        if args.text_encoder_lr is not None and len(args.text_encoder_lr) > 1:
            problems.append(f"--text_encoder_lr got {len(args.text_encoder_lr)} values; Lumina has one text "
                            "encoder (Gemma2): give one value")
        if problems:
            raise ConfigError("invalid Lumina options:\n  " + "\n  ".join(problems))
        if args.sample_prompts:
            check_sample_prompts(load_sample_prompts(args.sample_prompts))
        if args.use_flash_attn:
            try:
                set_attention_backend("flash")
            except ConfigError as e:
                raise ConfigError(f"--use_flash_attn: {e} Or remove --use_flash_attn.") from e
        if args.mixed_precision == "fp16":
            print("warning: --mixed_precision fp16 is less stable for Lumina Image 2.0, which was trained in "
                  "bfloat16 (activations can overflow); prefer --mixed_precision bf16. Gemma2 runs in float32 "
                  "here, as it overflows in float16.")

    # ---- models -------------------------------------------------------------------------------
    @staticmethod
    def gemma2_dtype(weight_dtype: torch.dtype) -> torch.dtype:
        """Gemma2's activations overflow in float16: it stays in float32 under fp16 mixed precision."""
        return torch.float32 if weight_dtype == torch.float16 else weight_dtype

    def load_models(self, args, device, weight_dtype) -> FamilyModels:
        where = memory.load_device(args, device, [args.pretrained_model_name_or_path, args.ae, args.gemma2])
        print(describe_variant(inspect_lumina_checkpoint(args.pretrained_model_name_or_path)))   # a wrong file fails now
        return load_with_cpu_fallback(args, where, lambda where: self._load_models(args, where, weight_dtype))

    def _load_models(self, args, where, weight_dtype) -> FamilyModels:
        def encoders():
            ae = load_flux_ae(args.ae, device=where, dtype=weight_dtype)
            text = LuminaTextEncoding.from_files(
                gemma2_path=args.gemma2, max_length=args.gemma2_max_token_length, system_prompt=args.system_prompt,
                tokenizer_cache_dir=args.tokenizer_cache_dir, device=where, dtype=self.gemma2_dtype(weight_dtype))
            if args.fp8_base and not args.fp8_base_unet:
                # as sd-scripts: --fp8_base stores the text encoder's matrices in fp8 too (not with --fp8_base_unet)
                report = quantize_linears_(text.gemma2, [text.gemma2.layers],
                                           compute_dtype=self.gemma2_dtype(weight_dtype))
                print(f"Gemma2: {report}")
            return ae, text

        (dit, info), (ae, text) = load_dit_beside(
            where, lambda: load_lumina_dit(args.pretrained_model_name_or_path, device=where, dtype=weight_dtype),
            encoders, dit_files=[args.pretrained_model_name_or_path], other_files=[args.ae, args.gemma2])
        return FamilyModels(denoiser=dit, text_encoders=[text.gemma2], vae=ae, info=info, extra={"text": text})

    def model_name(self, models) -> str:
        return f"Lumina Image 2.0 ({models.denoiser.params.n_layers} layers)"

    def activation_bytes_estimate(self, args, models, batch, height, width):
        """For --blocks_to_swap auto: the joint sequence (image patches + the longest caption) through
        the main layers and, about as long, the noise refiners."""
        p = models.denoiser.params
        tokens = (height // 16) * (width // 16) + args.gemma2_max_token_length
        return estimate_activation_bytes(batch=batch, tokens=tokens, hidden=p.dim, mlp_hidden=p.ffn_hidden_dim,
                                         num_blocks=p.n_layers + p.n_refiner_layers,
                                         gradient_checkpointing=args.gradient_checkpointing,
                                         # under --selective_checkpointing: attention, FFN w2
                                         kept_outputs_per_block=2 * getattr(args, "selective_checkpointing", False))

    def latent_encoder(self, args, models, device):
        if not hasattr(self, "_latent_encoder"):
            # the FLUX AE; the file's fingerprint, not its path: a replaced file must invalidate the cache
            self._latent_encoder = LatentCacheAdapter(
                models.vae, f"flux-ae:{file_fingerprint(args.ae)}:posterior-sample", device,
                next(models.vae.parameters()).dtype, file_suffix="_lumina")
        return self._latent_encoder

    def text_encoding(self, args, models, device):
        text: LuminaTextEncoding = models.extra["text"]
        memory.place(text.gemma2, device)
        return LuminaTextCacheEncoder(text)

    @staticmethod
    def gemma2_precision(text: LuminaTextEncoding):
        """No autocast around a float32 Gemma2 (fp16 mixed precision would run it in float16)."""
        weight = text.gemma2.embed_tokens.weight
        if weight.dtype == torch.float32 and torch.is_autocast_enabled(weight.device.type):
            return torch.autocast(weight.device.type, enabled=False)
        return contextlib.nullcontext()

    def encode_text_for_training(self, args, models, captions, cached, trained, device):
        """Gemma2 LoRA: Gemma2 runs on every step with gradients (its outputs are never cached then)."""
        text: LuminaTextEncoding = models.extra["text"]
        with torch.set_grad_enabled(GEMMA2_INDEX in trained and torch.is_grad_enabled()), self.gemma2_precision(text):
            out = text.encode(captions)
        return {"hidden_state": out.hidden_state.to(device), "attention_mask": out.attention_mask.to(device),
                "input_ids": out.input_ids.to(device)}

    def block_lists(self, models):
        """The 26 main `layers` only (what --blocks_to_swap swaps, --fp8_base stores in fp8 and
        --torch_compile compiles). The two noise and two context refiners stay outside: they run on
        the image or the caption alone (a small share of compute and weights), and sd-scripts'
        block swap counts only `layers` (at most 24 of 26), so --blocks_to_swap N means the same."""
        return [models.denoiser.layers]

    # ---- the forward --------------------------------------------------------------------------
    def denoise(self, args, models, noisy: NoisyInput, text: dict) -> torch.Tensor:
        dit = models.denoiser
        dtype = dit.x_embedder.weight.dtype
        # t stays float32: the sinusoidal embedding of 1 - sigma needs more than bf16's 8 bits near 1
        t = self.model_time(noisy.sigmas).float()
        # --cuda_graph: the caption lengths stay on the device, the padded length is kept (same outputs)
        return dit(noisy.noisy.to(dtype), t, text["hidden_state"].to(dtype), text["attention_mask"],
                   fixed_length=bool(getattr(args, "cuda_graph", False)))

    # ---- sampling -----------------------------------------------------------------------------
    def encode_prompts_for_sampling(self, args, models, prompts, device):
        """Prompts get the system prompt, negative prompts do not (FORMATS 2); keyed
        ("prompt", text) / ("negative", text)."""
        check_sample_prompts(prompts)
        self.text_encoding(args, models, device)
        keys = sorted({("prompt", p.prompt) for p in prompts} | {("negative", p.negative_prompt or "") for p in prompts})
        return self._encode_sample_texts(models, keys)

    def _encode_sample_texts(self, models, keys: list[tuple[str, str]]) -> dict:
        text: LuminaTextEncoding = models.extra["text"]
        conds = {}
        with torch.no_grad(), self.gemma2_precision(text):
            for kind in ("prompt", "negative"):
                texts = [t for k, t in keys if k == kind]
                if texts:
                    out = text.encode(texts, add_system_prompt=kind == "prompt")
                    for i, t in enumerate(texts):
                        conds[(kind, t)] = {k: getattr(out, k)[i] for k in LuminaTextOutputs.CACHE_KEYS}
        return conds

    def refresh_sample_conds(self, state) -> None:
        """With a Gemma2 LoRA the prompts' encodings change as it trains: encode them again."""
        with state.accelerator.autocast():
            state.sample_conds = self._encode_sample_texts(state.models, list(state.sample_conds))

    def generate_sample(self, args, models, prompt, conds, device, dtype):
        def conditioning(key) -> LuminaConditioning:
            entry = conds[key]
            return LuminaConditioning(entry["hidden_state"][None].to(device, dtype),
                                      entry["attention_mask"][None].to(device))

        models.vae.to(device)
        return generate_image(
            models.denoiser, models.vae, conditioning(("prompt", prompt.prompt)),
            neg=conditioning(("negative", prompt.negative_prompt or "")),
            width=prompt.width or DEFAULT_SIZE, height=prompt.height or DEFAULT_SIZE,
            steps=prompt.sample_steps or DEFAULT_STEPS,
            cfg_scale=prompt.scale if prompt.scale is not None else DEFAULT_CFG_SCALE,
            cfg_trunc_ratio=prompt.cfg_trunc_ratio if prompt.cfg_trunc_ratio is not None else DEFAULT_CFG_TRUNC_RATIO,
            renorm_cfg=prompt.renorm_cfg if prompt.renorm_cfg is not None else DEFAULT_RENORM_CFG,
            seed=prompt.seed, shift=DEFAULT_SHIFT, progress=False)

    # ---- metadata -----------------------------------------------------------------------------
    def metadata_extras(self, args, models):
        variant = VARIANTS[models.info.variant]
        modelspec = {"architecture": variant.modelspec_architecture,
                     "implementation": variant.modelspec_implementation,
                     # "epsilon" (what sd-scripts writes) is false for a flow model: leave it out
                     "prediction_type": None, "default_resolution": self.default_resolution}
        return variant.base_model_version, self.flow_metadata(args), modelspec


def check_sample_prompts(prompts: list[SamplePrompt]) -> None:
    """Refuse prompt options of other families (before any model is loaded)."""
    for p in prompts:
        foreign = [flag for name, flag in _FOREIGN_PROMPT_OPTIONS.items() if getattr(p, name) is not None]
        if foreign:
            raise ConfigError(f"--sample_prompts, prompt {p.index} ({p.prompt[:40]!r}): {', '.join(foreign)} is not "
                              "used by Lumina Image 2.0; remove it. Lumina's options: --w --h --d --s --l (CFG scale) "
                              "--n (negative prompt) --ctr (CFG truncation ratio) --rcfg (renorm CFG)")


def main(argv: list[str] | None = None) -> int:
    return LuminaNetworkTrainer().run(argv)


if __name__ == "__main__":
    sys.exit(main())
