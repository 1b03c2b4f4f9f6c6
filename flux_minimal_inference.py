"""Generate an image with FLUX.1 dev / schnell or Chroma, optionally with LoRA files.

    python flux_minimal_inference.py --ckpt flux1-dev.safetensors --clip_l clip_l.safetensors \
        --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors --prompt "a cat" --out cat.png \
        --lora "my_lora.safetensors;1.0"
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from library.autoencoders import load_flux_ae
from library.errors import ConfigError
from library.flux.loading import load_flux_dit
from library.flux.sampling import generate_image
from library.flux.text import FluxTextEncoding
from library.fp8 import quantize_linears_
from library.inference_common import DTYPES, default_device, load_lora, parse_lora_arg, run, save_image


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="FLUX.1 or Chroma model file")
    p.add_argument("--model_type", default="flux", choices=["flux", "chroma"])
    p.add_argument("--clip_l", default=None, help="CLIP-L file (FLUX.1 only)")
    p.add_argument("--t5xxl", required=True)
    p.add_argument("--ae", required=True)
    p.add_argument("--tokenizer_cache_dir", default=None, help="offline tokenizers (see README)")
    p.add_argument("--prompt", default="A photo of a cat")
    p.add_argument("--negative_prompt", default="", help="used when --cfg_scale is not 1")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--steps", type=int, default=None, help="default 28 (dev/Chroma) or 4 (schnell)")
    p.add_argument("--guidance", type=float, default=3.5, help="embedded guidance (FLUX.1 dev)")
    p.add_argument("--cfg_scale", type=float, default=1.0, help="classifier-free guidance; 1.0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="compute dtype")
    p.add_argument("--flux_dtype", default=None, help="dtype of the DiT weights: bf16, fp16, fp32, or fp8 (block weights stored as float8_e4m3fn, computed in --dtype)")
    p.add_argument("--t5xxl_max_token_length", type=int, default=None)
    p.add_argument("--apply_t5_attn_mask", action="store_true")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--offload", action="store_true", help="keep models on the CPU until they are needed")
    p.add_argument("--lora", action="append", default=[], metavar="PATH;MULTIPLIER",
                   help="LoRA file and strength, e.g. 'my.safetensors;0.8' (repeatable)")
    p.add_argument("--merge_lora_weights", action="store_true", help="merge LoRA into the weights (faster)")
    p.add_argument("--out", default=None, help="output PNG (default: a time-stamped name in the current folder)")
    return p


def apply_loras(loras: list[str], dit, text_encoders, ae, merge: bool) -> list:
    from networks import lora_flux

    networks = []
    for value in loras:
        path, mult = parse_lora_arg(value, "--lora")
        networks.append(load_lora(lora_flux.create_network_from_weights, path, mult, option="--lora", vae=ae,
                                  text_encoders=text_encoders, denoiser=dit, merge=merge,
                                  device=next(dit.parameters()).device))
        print(f"LoRA {path} x{mult}")
    return networks


def generate(args: argparse.Namespace) -> Path:
    fp8 = bool(args.flux_dtype) and "fp8" in args.flux_dtype.lower()
    if fp8 and args.merge_lora_weights:
        raise ConfigError("--merge_lora_weights cannot merge into fp8 weights (--flux_dtype fp8): leave out "
                          "--merge_lora_weights (the LoRA then runs beside the fp8 layers)")
    if args.model_type == "flux" and not args.clip_l:
        raise ConfigError("--clip_l is required for FLUX.1 (only Chroma runs without it)")
    device = default_device(args.device)
    dtype = DTYPES[args.dtype]
    flux_dtype = dtype if fp8 or not args.flux_dtype else DTYPES[args.flux_dtype]
    load_device = "cpu" if args.offload else device

    dit, info = load_flux_dit(args.ckpt, model_type=args.model_type, device=load_device, dtype=flux_dtype)
    dit.eval()
    if fp8:   # the block weights in float8_e4m3fn, computed in --dtype; before the LoRA wraps them
        print(quantize_linears_(dit, [dit.double_blocks, dit.single_blocks], compute_dtype=dtype))
    schnell = info.variant == "schnell"
    max_len = args.t5xxl_max_token_length or (256 if schnell else 512)
    apply_mask = args.apply_t5_attn_mask or args.model_type == "chroma"
    text = FluxTextEncoding.from_files(clip_l_path=args.clip_l, t5xxl_path=args.t5xxl, t5_max_length=max_len,
                                       apply_t5_attn_mask=apply_mask, tokenizer_cache_dir=args.tokenizer_cache_dir,
                                       device=load_device, dtype=dtype)
    ae = load_flux_ae(args.ae, device=load_device, dtype=dtype)
    apply_loras(args.lora, dit, [text.clip_l, text.t5], ae, args.merge_lora_weights)

    with torch.no_grad():
        if args.offload:
            for m in (text.clip_l, text.t5):
                if m is not None:
                    m.to(device)
        use_cfg = args.cfg_scale != 1.0
        prompts = [args.prompt] + ([args.negative_prompt] if use_cfg else [])
        outputs = text.encode(prompts).to(device)
        if args.offload:
            for m in (text.clip_l, text.t5):
                if m is not None:
                    m.to("cpu")
            dit.to(device)
            ae.to(device)
        cond_all = outputs.conditioning(apply_mask, dtype=dtype)
        pick = lambda c, i: type(c)(c.txt[i:i + 1], c.txt_ids[i:i + 1], c.vec[i:i + 1],
                                    None if c.txt_mask is None else c.txt_mask[i:i + 1])
        steps = args.steps or (4 if schnell else 28)
        image = generate_image(dit, ae, pick(cond_all, 0), width=args.width, height=args.height, steps=steps,
                               guidance=args.guidance, seed=args.seed, shift=not schnell, cfg_scale=args.cfg_scale,
                               neg=pick(cond_all, 1) if use_cfg else None)
    return save_image(image, Path(args.out or f"flux_{time.strftime('%Y%m%d%H%M%S')}.png"))


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), generate, argv)


if __name__ == "__main__":
    sys.exit(main())
