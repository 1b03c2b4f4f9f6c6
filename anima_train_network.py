"""Train a LoRA for Anima (the sd-scripts command line).

    accelerate launch anima_train_network.py --pretrained_model_name_or_path anima-preview.safetensors \
        --qwen3 qwen_3_06b_base.safetensors --vae qwen_image_vae.safetensors \
        --dataset_config my.toml --network_module networks.lora_anima --network_dim 8 ...

The loop is library/training/trainer.py and the rectified-flow math library/training/flow_trainer.py;
this file supplies only what Anima does differently: its files (DiT + LLM adapter, Qwen3-0.6B, the
Qwen-Image VAE), its text step (Qwen3 states + T5 ids for the adapter), the always-weighted loss,
per-component learning rates of the LoRA, and its sampler. See docs/anima_train_network.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from library.anima import sampling as anima_sampling
from library.anima.arguments import add_anima_arguments, apply_attention_options, check_anima_arguments
from library.anima.loading import inspect_anima_checkpoint, load_anima_dit
from library.anima.text import AnimaTextCacheEncoder, AnimaTextEncoding, AnimaTextOutputs
from library.anima.vae import load_qwen_image_vae
from library.errors import ConfigError
from library.latent_cache import LatentCacheAdapter
from library.text_encoders import file_fingerprint
from library.training.flow_matching import add_flow_matching_arguments
from library.training.flow_trainer import FlowMatchingTrainer
from library.training.model_loading import load_dit_beside, load_with_cpu_fallback
from library.training.sample_prompts import SamplePrompt, load_sample_prompts
from library.training.trainer import FamilyModels, NoisyInput, parse_network_args
from library.training import memory

ARCHITECTURE = "anima-preview/lora"
IMPLEMENTATION = "https://huggingface.co/circlestone-labs/Anima"


# ---------------------------------------------------------------------------------------------
# Per-component learning rates (--self_attn_lr ...): data, not branches.

@dataclass(frozen=True)
class ComponentLR:
    option: str                       # the argparse dest, e.g. "self_attn_lr"
    what: str                         # how messages name the component
    matches: Callable[[str], bool]    # on the dotted original module name
    hint: str                         # how to get LoRA modules of this component when there are none


def _in_blocks(part: str) -> Callable[[str], bool]:
    return lambda name: name.startswith("blocks.") and f".{part}" in name


# The adapter comes first: its blocks have self_attn / cross_attn / mlp too, and they are the adapter's.
COMPONENT_LRS: tuple[ComponentLR, ...] = (
    ComponentLR("llm_adapter_lr", "LLM adapter", lambda name: name.startswith("llm_adapter."),
                'add --network_args "train_llm_adapter=True"'),
    ComponentLR("self_attn_lr", "self-attention", _in_blocks("self_attn."),
                "self-attention layers are LoRA targets by default; check exclude_patterns"),
    ComponentLR("cross_attn_lr", "cross-attention", _in_blocks("cross_attn."),
                "cross-attention layers are LoRA targets by default; check exclude_patterns"),
    ComponentLR("mlp_lr", "MLP", _in_blocks("mlp."), "MLP layers are LoRA targets by default; check exclude_patterns"),
    ComponentLR("mod_lr", "AdaLN modulation", _in_blocks("adaln_modulation"),
                "modulation layers are excluded by default: add --network_args "
                "\"include_patterns=['.*adaln_modulation.*']\""),
)


def component_of(name: str) -> ComponentLR | None:
    """The component a DiT module (dotted original name) belongs to, or None (embedders, final layer)."""
    for component in COMPONENT_LRS:
        if component.matches(name):
            return component
    return None


def given_component_lrs(args) -> dict[str, float]:
    return {c.option: getattr(args, c.option) for c in COMPONENT_LRS if getattr(args, c.option) is not None}


def unmatched_component_lrs_error(given: dict[str, float], dit_names) -> ConfigError | None:
    """The error for component learning rates that match none of these DiT module names (they
    would change nothing), or None."""
    hit = {component_of(name).option for name in dit_names if component_of(name) is not None}
    missing = [c for c in COMPONENT_LRS if c.option in given and c.option not in hit]
    if not missing:
        return None
    return ConfigError("these learning rates match no LoRA module, so they would change nothing:\n  " + "\n  ".join(
        f"--{c.option}: the LoRA has no {c.what} module ({c.hint}), or remove --{c.option}" for c in missing))


def apply_component_lrs(args, network, dit: torch.nn.Module) -> dict[str, int]:
    """Give each DiT LoRA module the learning rate of its component when that option is set.
    A module that network_reg_lrs already gave an lr keeps it (the regex is the more specific
    rule). 0 freezes (the LoRA core leaves lr-0 groups out of the optimizer). Returns how many
    modules each option set; an option that matches no module is an error (it would be ignored)."""
    given = given_component_lrs(args)
    if not given:
        return {}
    loras = getattr(network, "unet_loras", None)
    if loras is None:
        raise ConfigError(f"--{', --'.join(given)}: per-component learning rates need a LoRA network from "
                          f"networks.lora_anima; {args.network_module} does not expose its modules. Use "
                          "networks.lora_anima or remove these options.")
    names = {id(module): name for name, module in dit.named_modules()}
    lora_names = [names.get(id(lora.base), "") for lora in loras]
    error = unmatched_component_lrs_error(given, lora_names)
    if error is not None:
        raise error
    counts = dict.fromkeys(given, 0)
    overridden = 0
    for lora, name in zip(loras, lora_names):
        component = component_of(name)
        if component is None or component.option not in given:
            continue
        counts[component.option] += 1
        if lora.lr is None:
            lora.lr = float(given[component.option])
        else:
            overridden += 1
    for option, count in counts.items():
        state = "frozen" if given[option] == 0 else f"lr {given[option]:g}"
        print(f"--{option}: {count} LoRA modules, {state}")
    if overridden:
        print(f"note: {overridden} of these modules keep the learning rate network_reg_lrs gives them")
    return counts


# ---------------------------------------------------------------------------------------------
# Latents.

# ---------------------------------------------------------------------------------------------
# The trainer.

class AnimaNetworkTrainer(FlowMatchingTrainer):
    always_weight_loss = True      # FORMATS 3.3: raw velocity, loss always weighted by --weighting_scheme
    reso_step_multiple = 16        # VAE 8x times the DiT's 2x2 patches
    default_resolution = 1024

    def add_family_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_anima_arguments(parser)
        # --attn_mode defaults to torch, or to xformers with the generic --xformers flag (resolved in check_args)
        parser.set_defaults(attn_mode=None)
        g = parser.add_argument_group("Anima: learning rate per DiT component (LoRA modules of that component; "
                                      "0 freezes them; network_reg_lrs takes precedence)")
        for component, default in (("self_attn", "self-attention"), ("cross_attn", "cross-attention"),
                                   ("mlp", "MLP"), ("mod", "AdaLN modulation (needs include_patterns)"),
                                   ("llm_adapter", "LLM adapter (needs train_llm_adapter=True)")):
            g.add_argument(f"--{component}_lr", type=float, default=None,
                           help=f"learning rate of the {default} LoRA modules (default: --unet_lr, else "
                                "--learning_rate)")
        sd = parser.add_argument_group("options of other scripts (refused: they have no meaning for Anima LoRA)")
        sd.add_argument("--v2", action="store_true", help="SD 2.x only: refused")
        sd.add_argument("--v_parameterization", action="store_true", help="SD 2.x only: refused")
        sd.add_argument("--clip_skip", type=int, default=None, help="SD only: refused")
        add_flow_matching_arguments(
            parser, default_timestep_sampling="sigmoid", default_discrete_flow_shift=1.0,
            default_model_prediction_type=None,
            timestep_sampling_choices=["sigma", "uniform", "sigmoid", "shift", "flux_shift"])

    # The generic --xformers flag means --attn_mode xformers here, as in sd-scripts.
    handled_options = frozenset({"xformers"})

    def check_args(self, args) -> None:
        # An explicit --attn_mode takes precedence over --xformers.
        if args.attn_mode is None:
            args.attn_mode = "xformers" if args.xformers else "torch"
        if args.xformers:
            print(f"note: --xformers: Anima's attention follows --attn_mode ({args.attn_mode})")
        super().check_args(args)

    def validate_family_args(self, args) -> None:
        problems = []
        if not args.pretrained_model_name_or_path:
            problems.append("--pretrained_model_name_or_path is required (the Anima DiT file, e.g. "
                            "anima-preview.safetensors)")
        for flag in ("v2", "v_parameterization"):
            if getattr(args, flag):
                problems.append(f"--{flag} is for Stable Diffusion 2.x, not Anima: remove it")
        if args.clip_skip is not None:
            problems.append("--clip_skip is for Stable Diffusion's CLIP, not Anima's Qwen3: remove it")
        for c in COMPONENT_LRS:
            value = getattr(args, c.option)
            if value is not None and value < 0:
                problems.append(f"--{c.option} must be 0 (frozen) or more, got {value}")
        text_cached = bool(args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk)
        if text_cached and args.network_train_text_encoder_only:
            problems.append("--network_train_text_encoder_only trains a Qwen3 LoRA, which needs Qwen3 to run live: "
                            "remove --cache_text_encoder_outputs (or train the DiT)")
        trains_qwen3 = not args.network_train_unet_only and not text_cached
        if args.text_encoder_lr:
            if not trains_qwen3:
                why = "--cache_text_encoder_outputs" if text_cached else "--network_train_unet_only"
                problems.append(f"--text_encoder_lr sets the Qwen3 LoRA's learning rate, but {why} means no Qwen3 "
                                "LoRA is trained: remove --text_encoder_lr")
            elif len(args.text_encoder_lr) > 1:
                problems.append(f"--text_encoder_lr has {len(args.text_encoder_lr)} values; Anima has one text "
                                "encoder (Qwen3): give one value")
        try:
            check_anima_arguments(args, training=True)
        except ConfigError as e:
            problems.extend(str(e).splitlines()[1:])
        if args.sample_prompts:
            problems.extend(foreign_prompt_options(load_sample_prompts(args.sample_prompts)))
        if problems:
            raise ConfigError("invalid Anima options:\n  " + "\n  ".join(p.strip() for p in problems))

        for flag in ("fp8_base", "fp8_base_unet"):
            if getattr(args, flag, False):
                print(f"warning: --{flag} is not supported for Anima (as in sd-scripts); it is disabled and the "
                      "DiT trains in the --mixed_precision dtype")
                setattr(args, flag, False)
        if text_cached and not args.network_train_unet_only:
            # The guide: Qwen3 LoRA is trained only without --network_train_unet_only AND without cached outputs.
            print("note: with --cache_text_encoder_outputs Qwen3 does not run during training, so only the DiT LoRA "
                  "is trained (as with --network_train_unet_only). Remove the caching to train a Qwen3 LoRA too.")
            args.network_train_unet_only = True

    # ---- models -------------------------------------------------------------------------------
    def load_models(self, args, device, weight_dtype) -> FamilyModels:
        dit_files = [args.pretrained_model_name_or_path, args.llm_adapter_path]
        where = memory.load_device(args, device, dit_files + [args.vae, args.qwen3])
        inspect_anima_checkpoint(args.pretrained_model_name_or_path, args.llm_adapter_path)   # a wrong file fails now
        models = load_with_cpu_fallback(
            args, where, lambda where: self._load_models(args, where, weight_dtype, dit_files))
        apply_attention_options(args, models.denoiser)
        self.check_network_args_early(args, models.denoiser)
        return models

    def _load_models(self, args, where, weight_dtype, dit_files) -> FamilyModels:
        def encoders():
            vae = load_qwen_image_vae(args.vae, device=where, dtype=weight_dtype, chunk_size=args.vae_chunk_size,
                                      disable_cache=args.vae_disable_cache)
            text = AnimaTextEncoding.from_files(
                args.qwen3, t5_tokenizer_path=args.t5_tokenizer_path, tokenizer_cache_dir=args.tokenizer_cache_dir,
                qwen3_max_length=args.qwen3_max_token_length, t5_max_length=args.t5_max_token_length, device=where,
                dtype=weight_dtype)
            return vae, text

        # a .pth VAE is read by torch.load, not prefetched
        vae_file = args.vae if Path(args.vae).suffix == ".safetensors" else None
        (dit, info), (vae, text) = load_dit_beside(
            where, lambda: load_anima_dit(args.pretrained_model_name_or_path, llm_adapter_path=args.llm_adapter_path,
                                          device=where, dtype=weight_dtype),
            encoders, dit_files=dit_files, other_files=[vae_file, args.qwen3])
        return FamilyModels(denoiser=dit, text_encoders=[text.qwen3], vae=vae, info=info,
                            extra={"text": text, "compute_dtype": weight_dtype})

    @staticmethod
    def check_network_args_early(args, dit) -> None:
        """The LoRA is created after caching; check its --network_args (unknown keys, bad patterns) and
        the component learning rates against the modules it will have now, before caching takes time."""
        if args.network_module != "networks.lora_anima" or args.dim_from_weights:
            return
        from networks import lora_anima

        names = lora_anima.target_names(dit, None, args.network_dim, **parse_network_args(args.network_args))
        error = unmatched_component_lrs_error(given_component_lrs(args), names)
        if error is not None:
            raise error

    def create_network(self, args, models: FamilyModels) -> torch.nn.Module:
        network = super().create_network(args, models)
        apply_component_lrs(args, network, models.denoiser)
        return network

    def latent_encoder(self, args, models, device):
        if getattr(self, "_latent_encoder", None) is None:
            # normalised posterior modes, `<stem>_<WxH>_anima.safetensors` (as sd-scripts' `_anima.npz`); the
            # file's fingerprint, not its path; chunking and the frame cache never change the result, the dtype does
            vae = models.vae
            self._latent_encoder = LatentCacheAdapter(
                vae, f"qwen-image-vae:{file_fingerprint(args.vae)}:mode-normalised:{vae.dtype}", device, vae.dtype,
                encode=lambda v, images: v.encode(images), file_suffix="_anima")
        return self._latent_encoder

    def text_encoding(self, args, models, device):
        text = models.extra["text"]
        memory.place(text.qwen3, device)
        return AnimaTextCacheEncoder(text)

    def encode_text_for_training(self, args, models, captions, cached, trained, device):
        """Qwen3 LoRA: Qwen3 runs live with gradients (Anima has no other text encoder, so nothing
        cached is reused)."""
        out = models.extra["text"].encode(captions)
        return {k: getattr(out, k).to(device) for k in AnimaTextOutputs.CACHE_KEYS}

    def block_lists(self, models):
        return [models.denoiser.blocks]

    def model_name(self, models) -> str:
        return f"Anima ({models.denoiser.params.num_blocks} blocks)"

    def activation_bytes_estimate(self, args, models, batch, height, width):
        from library.offload import estimate_activation_bytes

        p = models.denoiser.params
        patch = 8 * p.patch_spatial
        return estimate_activation_bytes(batch=batch, tokens=(height // patch) * (width // patch),
                                         hidden=p.model_channels, mlp_hidden=int(p.model_channels * p.mlp_ratio),
                                         num_blocks=p.num_blocks, gradient_checkpointing=args.gradient_checkpointing,
                                         # under --selective_checkpointing: self- and cross-attention, MLP down
                                         kept_outputs_per_block=3 * getattr(args, "selective_checkpointing", False))

    # ---- the forward --------------------------------------------------------------------------
    def denoise(self, args, models, noisy: NoisyInput, text: dict) -> torch.Tensor:
        """The DiT runs the LLM adapter itself (Qwen3 states + T5 ids -> context), so an adapter
        LoRA trains inside the module the accelerator sees. σ goes in as float32 (the sinusoid
        needs its precision); latents and text in the compute dtype."""
        dtype = models.extra["compute_dtype"]
        return models.denoiser(
            noisy.noisy.to(dtype), self.model_time(noisy.sigmas).float(), text["prompt_embeds"].to(dtype),
            t5_input_ids=text["t5_input_ids"], t5_attn_mask=text["t5_attn_mask"], qwen3_attn_mask=text["attn_mask"])

    # ---- sampling -----------------------------------------------------------------------------
    def generate_sample(self, args, models, prompt, conds, device, dtype):
        """FORMATS 6.3: 30 steps, 512x512, CFG 7.5 with the negative prompt, flow shift 3.0 (--fs)."""
        dit = models.denoiser

        def conditioning(text: str) -> anima_sampling.AnimaConditioning:
            entry = {k: v.unsqueeze(0).to(device) for k, v in conds[text].items() if k in AnimaTextOutputs.CACHE_KEYS}
            return anima_sampling.AnimaConditioning.from_text(dit, AnimaTextOutputs.from_cache(entry), dtype)

        cfg_scale = prompt.scale if prompt.scale is not None else anima_sampling.DEFAULT_CFG_SCALE
        models.vae.to(device)
        return anima_sampling.generate_image(
            dit, models.vae, conditioning(prompt.prompt),
            neg=conditioning(prompt.negative_prompt or "") if cfg_scale > 1.0 else None,
            width=prompt.width or anima_sampling.DEFAULT_SIZE, height=prompt.height or anima_sampling.DEFAULT_SIZE,
            steps=prompt.sample_steps or anima_sampling.DEFAULT_STEPS, cfg_scale=cfg_scale,
            flow_shift=prompt.flow_shift if prompt.flow_shift is not None else anima_sampling.DEFAULT_FLOW_SHIFT,
            seed=prompt.seed, progress=False)

    # ---- metadata -----------------------------------------------------------------------------
    def metadata_extras(self, args, models):
        # FORMATS 4.7: Lumina's extras minus ss_model_prediction_type (the flow config omits it: no option)
        modelspec = {"architecture": ARCHITECTURE, "implementation": IMPLEMENTATION, "prediction_type": None,
                     "default_resolution": 1024}
        return "anima", self.flow_metadata(args), modelspec


# Prompt-file options of other families: sd-scripts' Anima sampler ignores them; here they are refused.
_FOREIGN_PROMPT_OPTIONS = {"guidance_scale": "--g (FLUX's embedded guidance)", "sample_sampler": "--ss (SD's sampler)",
                           "controlnet_image": "--cn (ControlNet)", "cfg_trunc_ratio": "--ctr (Lumina)",
                           "renorm_cfg": "--rcfg (Lumina)"}


def foreign_prompt_options(prompts: list[SamplePrompt]) -> list[str]:
    """One problem per sample prompt that uses an option Anima's sampler has no use for."""
    problems = []
    for p in prompts:
        foreign = [flag for name, flag in _FOREIGN_PROMPT_OPTIONS.items() if getattr(p, name) is not None]
        if foreign:
            problems.append(f"--sample_prompts, prompt {p.index} ({p.prompt[:40]!r}): {', '.join(foreign)} is not used "
                            "by Anima; remove it. Anima's options: --w --h --d --s --l (CFG scale) --n (negative "
                            "prompt) --fs (flow shift)")
    return problems


def main(argv: list[str] | None = None) -> int:
    return AnimaNetworkTrainer().run(argv)


if __name__ == "__main__":
    sys.exit(main())
