r"""Generate an image with SD3 Medium, SD3.5 Medium or SD3.5 Large, optionally with LoRA files.

    python sd3_minimal_inference.py --ckpt_path sd3.5_large.safetensors --clip_l clip_l.safetensors \
        --clip_g clip_g.safetensors --t5xxl t5xxl_fp16.safetensors --prompt "a cat" \
        --negative_prompt "blurry" --cfg_scale 5.0 --steps 40 --seed 1 --output_dir out \
        --lora_weights "my_sd3_lora.safetensors;1.0"

The text encoders and the VAE come from the checkpoint when it contains them (the "incl_clips"
files), else from --clip_l / --clip_g / --t5xxl / --vae. Without any T5-XXL the prompt is
encoded with zeros in its place, as SD3 allows (a note says so).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from library.errors import ConfigError, UserError
from library.inference_common import DTYPES, default_device, load_lora, parse_lora_arg, run, save_image
from library.sd3.loading import load_sd3_mmdit, load_sd3_vae
from library.sd3.sampling import SAMPLING_SHIFT, generate_image, round_image_size
from library.sd3.text import DEFAULT_T5_MAX_LENGTH, SD3TextEncoding
from library.training.sample_prompts import parse_prompt_line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_path", "--ckpt", dest="ckpt_path", required=True, help="SD3 / SD3.5 model file")
    p.add_argument("--clip_l", default=None, help="CLIP-L file (when the checkpoint has none inside)")
    p.add_argument("--clip_g", default=None, help="CLIP-G file (when the checkpoint has none inside)")
    p.add_argument("--t5xxl", default=None, help="T5-XXL file (when the checkpoint has none inside)")
    p.add_argument("--vae", default=None, help="VAE file (when the checkpoint has none inside)")
    p.add_argument("--tokenizer_cache_dir", default=None, help="offline tokenizers (see README)")
    p.add_argument("--t5xxl_token_length", "--t5xxl_max_token_length", dest="t5xxl_token_length", type=int,
                   default=DEFAULT_T5_MAX_LENGTH, help="T5 tokens for the prompt")
    p.add_argument("--apply_lg_attn_mask", action="store_true", help="mask CLIP padding inside the CLIP encoders")
    p.add_argument("--apply_t5_attn_mask", action="store_true", help="mask T5 padding inside T5")
    p.add_argument("--prompt", default="A photo of a cat")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--cfg_scale", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--width", type=int, default=1024, help="rounded down to a multiple of 16")
    p.add_argument("--height", type=int, default=1024, help="rounded down to a multiple of 16")
    p.add_argument("--shift", type=float, default=SAMPLING_SHIFT, help="flow shift of the sampling schedule")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="compute dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--fp16", action="store_true", help="same as --dtype float16")
    p.add_argument("--bf16", action="store_true", help="same as --dtype bfloat16")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--offload", action="store_true", help="keep models on the CPU until they are needed")
    p.add_argument("--lora_weights", "--lora", dest="lora_weights", nargs="*", action="extend", default=[],
                   metavar="PATH;MULTIPLIER", help="LoRA files with strengths, e.g. 'my.safetensors;0.8' (several)")
    p.add_argument("--merge_lora_weights", action="store_true", help="merge the LoRA into the weights (faster)")
    p.add_argument("--output_dir", default=".", help="folder for the PNG (named by the time)")
    p.add_argument("--out", default=None, help="output PNG path (instead of --output_dir)")
    p.add_argument("--interactive", action="store_true",
                   help="read prompts from the console: 'prompt --w 1024 --h 1024 --s 40 --d 1 --l 5 --n negative'; "
                        "an empty line ends")
    return p


def compute_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    chosen = [name for name, flag in (("float16", args.fp16), ("bfloat16", args.bf16)) if flag]
    if args.dtype:
        chosen.append(args.dtype)
    if len({DTYPES[c] for c in chosen}) > 1:
        raise ConfigError(f"--dtype/--fp16/--bf16 disagree ({', '.join(chosen)}): give one")
    if chosen:
        return DTYPES[chosen[0]]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def apply_loras(loras: list[str], mmdit, text_encoders, vae, merge: bool, device) -> list:
    from networks import lora_sd3

    networks = []
    for value in loras:
        path, mult = parse_lora_arg(value, "--lora_weights")
        network = load_lora(lora_sd3.create_network_from_weights, path, mult, option="--lora_weights", vae=vae,
                            text_encoders=text_encoders, denoiser=mmdit, merge=merge, device=device)
        networks.append(network)
        print(f"LoRA {path} x{mult}: {len(network.unet_loras)} MMDiT and {len(network.text_encoder_loras)} "
              "text-encoder modules")
    return networks


class Generator:
    """The loaded models; `image(...)` encodes a prompt pair and samples one image."""

    def __init__(self, args: argparse.Namespace):
        self.device = default_device(args.device)
        self.dtype = compute_dtype(args, self.device)
        self.offload = args.offload
        load_device = "cpu" if args.offload else self.device
        self.mmdit, info = load_sd3_mmdit(args.ckpt_path, device=load_device, dtype=self.dtype)
        self.text = SD3TextEncoding.from_files(
            checkpoint=args.ckpt_path, clip_l_path=args.clip_l, clip_g_path=args.clip_g, t5xxl_path=args.t5xxl,
            t5_max_length=args.t5xxl_token_length, apply_lg_attn_mask=args.apply_lg_attn_mask,
            apply_t5_attn_mask=args.apply_t5_attn_mask, tokenizer_cache_dir=args.tokenizer_cache_dir,
            device=load_device, dtype=self.dtype, require_t5=False, context_width=info.params.context_in_features)
        if self.text.t5 is None:
            print("note: no T5-XXL (neither --t5xxl nor inside the checkpoint): the prompt is encoded with zeros "
                  "in T5's place")
        self.vae = load_sd3_vae(args.ckpt_path, args.vae, device=load_device, dtype=self.dtype)
        print(f"{Path(args.ckpt_path).name}: {info.variant.label}, {self.dtype}, {self.device}")
        self.label = info.variant.label
        self.max_pixels = info.params.pos_embed_max_size * 8 * info.params.patch_size
        self.encoders = [self.text.clip_l, self.text.clip_g, self.text.t5]
        self.networks = apply_loras(args.lora_weights, self.mmdit, self.encoders, self.vae, args.merge_lora_weights,
                                    load_device)
        self.shift = args.shift

    def _place(self, models, device) -> None:
        for m in models:
            if m is not None:
                m.to(device)

    @torch.no_grad()
    def image(self, prompt: str, negative_prompt: str, *, width: int, height: int, steps: int, cfg_scale: float,
              seed: int | None):
        w, h = round_image_size(width, height)
        if w > self.max_pixels or h > self.max_pixels:
            raise ConfigError(f"{w}x{h}: {self.label}'s positional embedding covers at most "
                              f"{self.max_pixels}x{self.max_pixels} pixels; choose a smaller size")
        if self.offload:
            self._place(self.encoders + self.networks, self.device)
        outputs = self.text.encode([prompt, negative_prompt]).to(self.device)
        cond_all = outputs.conditioning(self.dtype)
        cond = type(cond_all)(cond_all.context[:1], cond_all.y[:1])
        neg = type(cond_all)(cond_all.context[1:], cond_all.y[1:])
        if self.offload:
            self._place(self.encoders, "cpu")
            self._place([self.mmdit, self.vae], self.device)
        try:
            return generate_image(self.mmdit, self.vae, cond, neg, width=width, height=height, steps=steps,
                                  cfg_scale=cfg_scale, seed=seed, shift=self.shift)
        finally:
            if self.offload:
                self._place([self.mmdit, self.vae], "cpu")


def output_path(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    return Path(args.output_dir) / f"{time.strftime('%Y%m%d_%H%M%S')}.png"


def check_args(args: argparse.Namespace) -> None:
    problems = []
    if args.steps < 1:
        problems.append(f"--steps must be at least 1 (got {args.steps})")
    if args.width < 64 or args.height < 64:
        problems.append(f"--width/--height must be at least 64 (got {args.width}x{args.height})")
    if args.t5xxl_token_length < 1:
        problems.append(f"--t5xxl_token_length must be at least 1 (got {args.t5xxl_token_length})")
    if args.interactive and args.out:
        problems.append("--out names one file; with --interactive give --output_dir instead")
    for value in args.lora_weights:
        path, _ = parse_lora_arg(value, "--lora_weights")
        if not Path(path).is_file():
            problems.append(f"--lora_weights {path}: file not found")
    if problems:
        raise ConfigError("invalid options:\n  " + "\n  ".join(problems))


def interactive(gen: Generator, args: argparse.Namespace) -> None:
    print("Enter a prompt with options (--w --h --s --d --l --n), or an empty line to end.")
    index = 0
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        try:
            p = parse_prompt_line(line, index)
            image = gen.image(p.prompt, p.negative_prompt if p.negative_prompt is not None else args.negative_prompt,
                              width=p.width or args.width, height=p.height or args.height,
                              steps=p.sample_steps or args.steps,
                              cfg_scale=p.scale if p.scale is not None else args.cfg_scale,
                              seed=p.seed if p.seed is not None else args.seed)
        except UserError as e:
            print(f"error: {e}")
            continue
        save_image(image, Path(args.output_dir) / f"{time.strftime('%Y%m%d_%H%M%S')}_{index:02d}.png")
        index += 1


def generate(args: argparse.Namespace) -> Path | None:
    check_args(args)
    gen = Generator(args)
    if args.interactive:
        interactive(gen, args)
        return None
    image = gen.image(args.prompt, args.negative_prompt, width=args.width, height=args.height, steps=args.steps,
                      cfg_scale=args.cfg_scale, seed=args.seed)
    return save_image(image, output_path(args))


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), generate, argv)


if __name__ == "__main__":
    sys.exit(main())
