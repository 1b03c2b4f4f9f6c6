"""Generate an image with Lumina Image 2.0, optionally with LoRA files.

    python lumina_minimal_inference.py --pretrained_model_name_or_path lumina-image-2.safetensors \
        --gemma2_path gemma_2_2b_fp16.safetensors --ae_path ae.safetensors --output_dir outputs \
        --seed 1234 --prompt "A mountain landscape at sunset" \
        --system_prompt "You are an assistant designed to generate high-quality images based on user prompts." \
        --lora_weights "my_lumina_lora.safetensors;1.0"

The image goes to <output_dir>/image_<YYYYmmddHHMMSS>_<seed>.png. Sampling: the shifted Euler
schedule (--discrete_flow_shift, 6.0 as Lumina 2 was trained), classifier-free guidance on the
early, noisy steps only (--cfg_trunc_ratio) and renormalised (--renorm_cfg), see
library/lumina/sampling.py.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

from library.attention import set_attention_backend
from library.autoencoders import load_flux_ae
from library import inference_common
from library.errors import ConfigError
from library.inference_common import default_device, load_lora, lora_multiplier, run, save_image
from library.lumina.loading import load_lumina_dit
from library.lumina.sampling import (DEFAULT_CFG_TRUNC_RATIO, DEFAULT_RENORM_CFG, DEFAULT_SHIFT, LuminaConditioning,
                                     decode_to_image, sample_latents)
from library.lumina.text import LuminaTextEncoding, add_text_arguments

DTYPES = {**inference_common.DTYPES, "float": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("models")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="Lumina Image 2.0 DiT (lumina-image-2.safetensors or lumina_2_model_bf16.safetensors)")
    g.add_argument("--gemma2_path", required=True, help="Gemma2 2B text encoder (gemma_2_2b_fp16.safetensors)")
    g.add_argument("--ae_path", required=True, help="the FLUX autoencoder (ae.safetensors)")
    g.add_argument("--tokenizer_cache_dir", default=None,
                   help="offline Gemma tokenizer (DIR/google_gemma-2-2b), for Gemma2 files without an embedded one")
    g.add_argument("--lora_weights", nargs="*", default=[], metavar="PATH;MULTIPLIER",
                   help="LoRA files with optional strengths, e.g. 'my_lora.safetensors;0.8' (several allowed; "
                        "a file with Gemma2 modules also changes the text encoding)")
    g.add_argument("--merge_lora_weights", action="store_true",
                   help="merge the LoRA into the weights instead of running it beside them (slightly faster)")

    g = p.add_argument_group("prompt")
    g.add_argument("--prompt", default="A beautiful sunset over the mountains")
    g.add_argument("--negative_prompt", default="", help="negative prompt for classifier-free guidance (default empty)")
    add_text_arguments(g)
    g.add_argument("--add_system_prompt_to_negative_prompt", action="store_true",
                   help="join the system prompt before the negative prompt too (default: the negative prompt "
                        "goes to Gemma2 as it is)")

    g = p.add_argument_group("sampling")
    g.add_argument("--image_width", type=int, default=1024, help="rounded down to a multiple of 16")
    g.add_argument("--image_height", type=int, default=1024, help="rounded down to a multiple of 16")
    g.add_argument("--steps", type=int, default=30, help="Euler steps")
    g.add_argument("--guidance_scale", "--cfg_scale", dest="guidance_scale", type=float, default=4.0,
                   help="classifier-free guidance scale (1.0 = the positive prompt only)")
    g.add_argument("--cfg_trunc_ratio", type=float, default=DEFAULT_CFG_TRUNC_RATIO,
                   help="guidance runs while the model time (1 - sigma) is below this: the early, noisy steps")
    g.add_argument("--renorm_cfg", type=float, default=DEFAULT_RENORM_CFG,
                   help="cap the guided prediction's norm at this times the positive one's (0 = off)")
    g.add_argument("--discrete_flow_shift", type=float, default=DEFAULT_SHIFT, help="schedule shift")
    g.add_argument("--seed", type=int, default=None, help="default: a random seed (written in the file name)")

    g = p.add_argument_group("device and precision")
    g.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="DiT compute dtype")
    g.add_argument("--gemma2_dtype", default="bf16", choices=sorted(DTYPES),
                   help="Gemma2 dtype (it overflows in fp16; bf16 or float32)")
    g.add_argument("--ae_dtype", default="bf16", choices=sorted(DTYPES), help="autoencoder dtype")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--offload", action="store_true",
                   help="keep each model on the CPU until it is needed (Gemma2, then the DiT, then the AE)")
    g.add_argument("--use_flash_attn", action="store_true", help="flash-attn kernels (pip install flash-attn)")
    g.add_argument("--use_sage_attn", action="store_true",
                   help="SageAttention kernels for the unmasked attention calls (pip install sageattention)")
    g.add_argument("--output_dir", default="outputs", help="where the PNG goes")
    return p


def parse_lora_arg(value: str) -> tuple[str, float]:
    """'path;multiplier' -> (path, multiplier); a missing or blank multiplier is 1.0 (blank too,
    unlike inference_common.parse_lora_arg)."""
    path, _, mult = value.partition(";")
    return path, lora_multiplier(mult, value, "--lora_weights") if mult.strip() else 1.0


def apply_loras(values: list[str], dit, gemma2, ae, merge: bool, device: torch.device) -> list:
    """Load each LoRA onto the DiT (and Gemma2 when the file has Gemma2 modules). Unmerged LoRA
    weights are small: they live on the compute device even while --offload parks a model on the CPU."""
    from networks import lora_lumina

    networks = []
    for value in values:
        path, mult = parse_lora_arg(value)
        network = load_lora(lora_lumina.create_network_from_weights, path, mult, option="--lora_weights", vae=ae,
                            text_encoders=[gemma2], denoiser=dit, merge=merge, device=device)
        networks.append(network)
        print(f"LoRA {path} x{mult} ({len(network.loras)} modules)")
    return networks


def check_args(args: argparse.Namespace) -> None:
    problems = []
    for name in ("pretrained_model_name_or_path", "gemma2_path", "ae_path"):
        if not Path(getattr(args, name)).is_file():
            problems.append(f"--{name} {getattr(args, name)}: file not found")
    if args.steps < 1:
        problems.append(f"--steps must be at least 1 (got {args.steps})")
    if args.image_width < 64 or args.image_height < 64:
        problems.append("--image_width and --image_height must be at least 64")
    if args.use_flash_attn and args.use_sage_attn:
        problems.append("--use_flash_attn and --use_sage_attn exclude each other: pick one")
    if DTYPES[args.gemma2_dtype] == torch.float16:
        problems.append("--gemma2_dtype fp16: Gemma2's activations overflow in float16; use bf16 or float32")
    if problems:
        raise ConfigError("invalid options:\n  " + "\n  ".join(problems))
    for flag, backend in (("--use_flash_attn", "flash"), ("--use_sage_attn", "sage")):
        if getattr(args, flag[2:]):
            try:
                set_attention_backend(backend)
            except ConfigError as e:
                raise ConfigError(f"{flag}: {e}") from e


def generate(args: argparse.Namespace) -> Path:
    check_args(args)
    device = default_device(args.device)
    dtype, gemma2_dtype, ae_dtype = DTYPES[args.dtype], DTYPES[args.gemma2_dtype], DTYPES[args.ae_dtype]
    load_device = "cpu" if args.offload else device

    dit, _ = load_lumina_dit(args.pretrained_model_name_or_path, device=load_device, dtype=dtype)
    text = LuminaTextEncoding.from_files(gemma2_path=args.gemma2_path, max_length=args.gemma2_max_token_length,
                                         system_prompt=args.system_prompt, tokenizer_cache_dir=args.tokenizer_cache_dir,
                                         device=load_device, dtype=gemma2_dtype)
    ae = load_flux_ae(args.ae_path, device=load_device, dtype=ae_dtype)
    apply_loras(args.lora_weights, dit, text.gemma2, ae, args.merge_lora_weights, device)
    seed = args.seed if args.seed is not None else random.randint(0, 2**31 - 1)

    with torch.no_grad():
        text.gemma2.to(device)
        cond = text.encode([args.prompt])
        neg = text.encode([args.negative_prompt], add_system_prompt=args.add_system_prompt_to_negative_prompt)
        if args.offload:
            text.gemma2.to("cpu")
            dit.to(device)

        def conditioning(out) -> LuminaConditioning:
            return LuminaConditioning(out.hidden_state.to(device, dtype), out.attention_mask.to(device))

        x = sample_latents(dit, conditioning(cond), neg=conditioning(neg), width=args.image_width,
                           height=args.image_height, steps=args.steps, cfg_scale=args.guidance_scale,
                           cfg_trunc_ratio=args.cfg_trunc_ratio, renorm_cfg=args.renorm_cfg, seed=seed,
                           shift=args.discrete_flow_shift)
        if args.offload:
            dit.to("cpu")
        ae.to(device)
        image = decode_to_image(ae, x)
    return save_image(image, Path(args.output_dir) / f"image_{time.strftime('%Y%m%d%H%M%S')}_{seed}.png")


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), generate, argv)


if __name__ == "__main__":
    sys.exit(main())
