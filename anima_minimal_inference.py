"""Generate an image with Anima, optionally with LoRA files (DiT, LLM-adapter and Qwen3 LoRA alike).

    python anima_minimal_inference.py --dit anima-preview.safetensors --text_encoder qwen_3_06b_base.safetensors \
        --vae qwen_image_vae.safetensors --prompt "1girl, cherry blossoms" --negative_prompt "lowres" \
        --image_size 1024 1024 --infer_steps 30 --guidance_scale 4.0 --seed 42 \
        --lora_weights "my_lora.safetensors;0.8" "style.safetensors;0.5" --save_path out/

The option names are sd-scripts' (--dit, --text_encoder, --image_size H W, --infer_steps, --guidance_scale,
--flow_shift, --lora_weight + --lora_multiplier, --save_path) with the aliases the other scripts here use
(--ckpt, --qwen3, --width/--height, --steps, --cfg_scale, --lora "path;mult", --out). The sampler is
library/anima/sampling.py: Euler on the shifted flow schedule, CFG with the negative prompt when the scale
is above 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from library.anima.arguments import add_anima_arguments, apply_attention_options, check_anima_arguments
from library.anima.loading import load_anima_dit
from library.anima.sampling import SIZE_MULTIPLE, AnimaConditioning, generate_image
from library.anima.text import AnimaTextEncoding, AnimaTextOutputs
from library.anima.vae import load_qwen_image_vae
from library.errors import ConfigError
from library.inference_common import (DTYPES, default_device, image_output_path, load_lora, lora_multiplier, run,
                                      save_image)



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dit", "--ckpt", "--pretrained_model_name_or_path", dest="dit", required=True,
                   help="Anima DiT file (with its LLM adapter, or give --llm_adapter_path)")
    add_anima_arguments(p)   # --qwen3, --vae, --llm_adapter_path, --t5_tokenizer_path, lengths, attention, VAE memory
    p.add_argument("--text_encoder", dest="qwen3", default=None, help="alias of --qwen3 (sd-scripts' name)")
    p.add_argument("--tokenizer_cache_dir", default=None,
                   help="offline tokenizers: DIR/Qwen_Qwen3-0.6B and DIR/google_t5-v1_1-xxl")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative_prompt", default="", help="used when --guidance_scale is above 1")
    p.add_argument("--image_size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                   help="image height and width (default 1024 1024); multiples of 16")
    p.add_argument("--width", type=int, default=None, help="image width (instead of --image_size)")
    p.add_argument("--height", type=int, default=None, help="image height (instead of --image_size)")
    p.add_argument("--infer_steps", "--steps", dest="infer_steps", type=int, default=50, help="sampling steps")
    p.add_argument("--guidance_scale", "--cfg_scale", dest="guidance_scale", type=float, default=3.5,
                   help="classifier-free guidance scale; 1.0 or less turns CFG off (no negative prompt)")
    p.add_argument("--flow_shift", type=float, default=5.0, help="shift of the flow schedule s*t/(1+(s-1)*t)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lora_weights", "--lora_weight", "--lora", dest="lora_weights", nargs="+", action="extend",
                   default=[], metavar="PATH[;MULTIPLIER]",
                   help="LoRA files, each 'path;multiplier' (e.g. 'my.safetensors;0.8'); without ';' the multiplier "
                        "comes from --lora_multiplier, else 1.0. Repeatable.")
    p.add_argument("--lora_multiplier", type=float, nargs="+", default=None,
                   help="multipliers for the --lora_weights given without ';multiplier', in order (sd-scripts' form)")
    p.add_argument("--merge_lora_weights", action="store_true",
                   help="merge the LoRA into the weights instead of applying it at run time (faster sampling)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="weights and compute dtype")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--save_path", "--out", dest="save_path", default=None,
                   help="output image file (.png/.jpg/.webp) or folder (a time-stamped PNG is written there); "
                        "default: the current folder")
    return p


def parse_lora_specs(values: list[str], multipliers: list[float] | None) -> list[tuple[str, float]]:
    """'path;mult' entries; entries without ';' take the next --lora_multiplier value (else 1.0)."""
    plain = [v for v in values if ";" not in v]
    if multipliers is not None and len(multipliers) not in (1, len(plain)):
        raise ConfigError(f"--lora_multiplier has {len(multipliers)} values for {len(plain)} LoRA files given without "
                          "';multiplier': give one value for all, or one per file")
    specs, index = [], 0
    for value in values:
        path, sep, mult = value.partition(";")
        if sep:
            specs.append((path, lora_multiplier(mult, value, "--lora_weights")))
            continue
        if multipliers is None:
            specs.append((path, 1.0))
        else:
            specs.append((path, multipliers[0] if len(multipliers) == 1 else multipliers[index]))
        index += 1
    if multipliers is not None and not plain:
        raise ConfigError("--lora_multiplier is given, but every --lora_weights entry has its own ';multiplier': "
                          "remove one of them")
    for path, _ in specs:
        if not Path(path).is_file():
            raise ConfigError(f"--lora_weights {path}: file not found")
    return specs


def image_size(args) -> tuple[int, int]:
    """(width, height), checked."""
    if args.image_size is not None and (args.width is not None or args.height is not None):
        raise ConfigError("give the size once: --image_size HEIGHT WIDTH, or --width / --height")
    height, width = args.image_size if args.image_size is not None else (args.height or 1024, args.width or 1024)
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE or min(width, height) < 64:
        raise ConfigError(f"image size {width}x{height}: width and height must be multiples of {SIZE_MULTIPLE} "
                          "(the VAE's 8x times the DiT's 2x2 patches), at least 64")
    return width, height


def apply_loras(specs: list[tuple[str, float]], dit, text: AnimaTextEncoding, vae, merge: bool, device) -> list:
    """Each file becomes a network shaped like it (DiT, adapter and Qwen3 modules); applied or merged."""
    from networks import lora_anima

    networks = []
    for path, mult in specs:
        network = load_lora(lora_anima.create_network_from_weights, path, mult, option="--lora_weights", vae=vae,
                            text_encoders=[text.qwen3], denoiser=dit, merge=merge, device=device)
        networks.append(network)
        parts = f"{len(network.unet_loras)} DiT" + (f" + {len(network.text_encoder_loras)} Qwen3"
                                                     if network.has_text_encoder_loras() else "")
        print(f"LoRA {path} x{mult} ({parts} modules{', merged' if merge else ''})")
    return networks


@torch.no_grad()
def generate(args: argparse.Namespace) -> Path:
    check_anima_arguments(args, training=False)
    width, height = image_size(args)
    if args.infer_steps < 1:
        raise ConfigError("--infer_steps must be at least 1")
    if args.flow_shift <= 0:
        raise ConfigError(f"--flow_shift must be > 0, got {args.flow_shift}")
    specs = parse_lora_specs(args.lora_weights, args.lora_multiplier)
    device = default_device(args.device)
    dtype = DTYPES[args.dtype]

    dit, info = load_anima_dit(args.dit, llm_adapter_path=args.llm_adapter_path, device=device, dtype=dtype)
    apply_attention_options(args, dit)
    text = AnimaTextEncoding.from_files(args.qwen3, t5_tokenizer_path=args.t5_tokenizer_path,
                                        tokenizer_cache_dir=args.tokenizer_cache_dir,
                                        qwen3_max_length=args.qwen3_max_token_length,
                                        t5_max_length=args.t5_max_token_length, device=device, dtype=dtype)
    vae = load_qwen_image_vae(args.vae, device=device, dtype=dtype, chunk_size=args.vae_chunk_size,
                              disable_cache=args.vae_disable_cache)
    apply_loras(specs, dit, text, vae, args.merge_lora_weights, device)

    use_cfg = args.guidance_scale > 1.0
    prompts = [args.prompt] + ([args.negative_prompt] if use_cfg else [])
    outputs = text.encode(prompts)   # after the LoRA: a Qwen3 LoRA changes the encoding

    def conditioning(i: int) -> AnimaConditioning:
        one = AnimaTextOutputs(*(getattr(outputs, k)[i:i + 1] for k in AnimaTextOutputs.CACHE_KEYS))
        return AnimaConditioning.from_text(dit, one, dtype)

    print(f"Anima ({info.params.num_blocks} blocks) {width}x{height}, {args.infer_steps} steps, "
          f"CFG {args.guidance_scale}, flow shift {args.flow_shift}, seed {args.seed}")
    image = generate_image(dit, vae, conditioning(0), neg=conditioning(1) if use_cfg else None, width=width,
                           height=height, steps=args.infer_steps, cfg_scale=args.guidance_scale,
                           flow_shift=args.flow_shift, seed=args.seed)
    return save_image(image, image_output_path(args.save_path, args.seed, "anima"))


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), generate, argv)


if __name__ == "__main__":
    sys.exit(main())
