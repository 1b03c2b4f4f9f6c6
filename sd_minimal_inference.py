r"""Generate an image with Stable Diffusion 1.x / 2.x, optionally with LoRA files.

    python sd_minimal_inference.py --ckpt v1-5-pruned-emaonly.safetensors --prompt "a cat" \
        --negative_prompt "blurry" --steps 30 --cfg_scale 7.5 --seed 1 --out cat.png \
        --lora "my_sd15_lora.safetensors;0.8"
    (SD 2.x: add --v2, and --v_parameterization for the 768-v models, as for train_network.py)

The model loads exactly as train_network.py loads it (library/sd/loading.py: an ldm .safetensors
file, a .ckpt read with torch.load(weights_only=True), or a diffusers folder; --v2 is checked
against the file), prompts are encoded with the same --clip_skip / --max_token_length rules (and the
sample prompts' A1111 weighting, library/sd/prompt_weighting.py), and
the image comes from the trainer's sample-image sampler (library/sd/sampling.py: the same
schedulers, CFG rule and seeded CPU noise as the sample images). LoRA files are sd-scripts'
`networks.lora` files (U-Net and text-encoder modules, LierLa or C3Lier); a LoRA made for the
other SD version or another model family is refused with a message saying what it is.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from library.errors import ConfigError, ModelFileError
from library.inference_common import (DTYPES, default_device, image_output_path, load_lora, parse_lora_arg, run,
                                      save_image)
from library.sd import sampling as sd_sampling
from library.sd.loading import SDCheckpointInfo, inspect_sd_checkpoint, load_sd_model
from library.sd.model import SDUNet
from library.sd.text import build_text_encoding

MAX_TOKEN_LENGTHS = (150, 225)     # as train_network.py's --max_token_length


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", "--pretrained_model_name_or_path", dest="ckpt", required=True,
                   help="SD 1.x/2.x checkpoint: ldm .safetensors, .ckpt (weights only) or a diffusers folder")
    g.add_argument("--v2", action="store_true", help="the model is SD 2.x; it must agree with the file")
    g.add_argument("--v_parameterization", action="store_true",
                   help="the model predicts v (SD 2.0/2.1 768-v models and v-prediction fine-tunes)")
    g.add_argument("--vae", default=None, help="use this VAE instead of the checkpoint's (file or diffusers folder)")
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 under --dtype fp16/bf16")
    g.add_argument("--tokenizer_cache_dir", default=None,
                   help="offline tokenizers: DIR/openai_clip-vit-large-patch14 (SD 1.x), "
                        "DIR/stabilityai_stable-diffusion-2 (SD 2.x)")
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weights and compute dtype (default: float16 on CUDA, float32 on the CPU)")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")

    g = p.add_argument_group("prompt and sampling")
    g.add_argument("--prompt", default="A photo of a cat",
                   help="A1111 weighting works here and in --negative_prompt: (word) x1.1, [word] /1.1, (word:1.5)")
    g.add_argument("--negative_prompt", default="", help="used when --cfg_scale is above 1")
    g.add_argument("--width", type=int, default=sd_sampling.DEFAULT_SIZE, help="a multiple of 8, at least 64")
    g.add_argument("--height", type=int, default=sd_sampling.DEFAULT_SIZE, help="a multiple of 8, at least 64")
    g.add_argument("--steps", type=int, default=sd_sampling.DEFAULT_STEPS, help="sampling steps (1-1000)")
    g.add_argument("--cfg_scale", "--scale", dest="cfg_scale", type=float, default=sd_sampling.DEFAULT_SCALE,
                   help="classifier-free guidance scale; 1.0 or less turns CFG (and the negative prompt) off")
    g.add_argument("--seed", type=int, default=None, help="default: a random image")
    g.add_argument("--sampler", default="ddim", help=f"one of {', '.join(sd_sampling.SAMPLERS)} (the trainer's "
                                                     "--sample_sampler names)")
    g.add_argument("--clip_skip", type=int, default=None,
                   help="use the text encoder's k-th layer from the end (as the LoRA was trained, e.g. 2)")
    g.add_argument("--max_token_length", type=int, default=None, choices=MAX_TOKEN_LENGTHS,
                   help="long prompts: 150 or 225 tokens (default 75)")

    g = p.add_argument_group("LoRA and output")
    g.add_argument("--lora", "--lora_weights", dest="lora", nargs="+", action="extend", default=[],
                   metavar="PATH;MULTIPLIER",
                   help="LoRA file and strength, e.g. 'my_lora.safetensors;0.8' (quote it: ';' ends a shell "
                        "command); the multiplier defaults to 1.0. Repeatable")
    g.add_argument("--merge_lora_weights", action="store_true",
                   help="merge the LoRA into the weights instead of running it beside them (faster sampling)")
    g.add_argument("--out", default=None,
                   help="output PNG path, or a folder for a time-stamped PNG (default: the current folder)")
    return p


# ---------------------------------------------------------------------------------------------
# Options.

@dataclass(frozen=True)
class LoraSpec:
    path: Path
    multiplier: float


def parse_lora(value: str) -> LoraSpec:
    path, multiplier = parse_lora_arg(value, "--lora")
    return LoraSpec(Path(path), multiplier)


def lora_base_model(path: Path) -> tuple[str | None, bool | None]:
    """(what the LoRA's metadata says it was trained on, v-prediction or None) for the error
    messages: "SD 1.x", "SD 2.x", another family's ss_base_model_version, or None if unsaid."""
    if path.suffix != ".safetensors":
        return None, None
    from library.safetensors_io import read_metadata

    try:
        meta = read_metadata(path)
    except Exception:   # an unreadable header: the LoRA loader says what is wrong with the file
        return None, None
    base = (meta.get("ss_base_model_version") or "").strip()
    arch = (meta.get("modelspec.architecture") or "").strip()
    prediction = meta.get("modelspec.prediction_type")
    v_pred = {"v": True, "epsilon": False}.get(prediction or "")
    m = re.fullmatch(r"sd_v([12])(_v)?", base)
    if m:
        return f"SD {m.group(1)}.x", bool(m.group(2)) if v_pred is None else v_pred
    m = re.match(r"stable-diffusion-v([12])(-|/|$)", arch)
    if m:
        return f"SD {m.group(1)}.x", v_pred
    if base:
        return base, v_pred
    if meta.get("ss_v2") in ("True", "False"):
        return ("SD 2.x" if meta["ss_v2"] == "True" else "SD 1.x"), v_pred
    return None, v_pred


def lora_problems(specs: list[LoraSpec], info: SDCheckpointInfo, v_parameterization: bool) -> list[str]:
    """LoRAs whose metadata names another base model; a note for a v-prediction mismatch."""
    problems = []
    for spec in specs:
        base, v_pred = lora_base_model(spec.path)
        if base is None:
            continue
        if base != info.label:
            problems.append(f"--lora {spec.path}: this LoRA was trained on {base}, but {info.path.name} is an "
                            f"{info.label} model. Use a LoRA trained on {info.label}, or the model the LoRA was "
                            "made for.")
        elif v_pred is not None and v_pred != v_parameterization:
            print(f"note: {spec.path.name} was trained with "
                  f"{'v-prediction' if v_pred else 'ε-prediction'}; the model runs with "
                  f"{'v-prediction (--v_parameterization)' if v_parameterization else 'ε-prediction'}"
                  f"{'' if v_parameterization else ' (add --v_parameterization for a v model)'}")
    return problems


def check_args(args: argparse.Namespace) -> tuple[list[LoraSpec], SDCheckpointInfo | None]:
    """Every problem with the options at once, before any weights load. The checkpoint is
    inspected here when that is cheap (a .safetensors header or a diffusers folder)."""
    problems: list[str] = []
    info = None
    ckpt = Path(args.ckpt)
    if not ckpt.exists():
        problems.append(f"--ckpt {ckpt}: file not found")
    elif ckpt.is_dir() or ckpt.suffix == ".safetensors":
        try:
            info = inspect_sd_checkpoint(ckpt, v2=args.v2)
        except (ConfigError, ModelFileError) as e:
            problems.append(str(e))
    if args.vae and not Path(args.vae).exists():
        problems.append(f"--vae {args.vae}: file not found")
    if args.width % 8 or args.height % 8 or min(args.width, args.height) < 64:
        problems.append(f"--width/--height {args.width}x{args.height}: both must be multiples of 8 (the VAE's "
                        "stride), at least 64")
    if not 1 <= args.steps <= sd_sampling.NUM_TRAIN_TIMESTEPS:
        problems.append(f"--steps must be between 1 and {sd_sampling.NUM_TRAIN_TIMESTEPS} (got {args.steps})")
    if args.clip_skip is not None and args.clip_skip < 1:
        problems.append(f"--clip_skip must be at least 1 (got {args.clip_skip}); 1 is the last layer")
    try:
        sd_sampling.check_sampler(args.sampler, where="--sampler")
    except ConfigError as e:
        problems.append(str(e))
    specs = []
    for value in args.lora:
        try:
            spec = parse_lora(value)
        except ConfigError as e:
            problems.append(str(e))
            continue
        if not spec.path.is_file():
            problems.append(f"--lora {spec.path}: file not found")
            continue
        specs.append(spec)
    if info is not None:
        problems += lora_problems(specs, info, args.v_parameterization)
    if problems:
        raise ConfigError("invalid options:\n  " + "\n  ".join(problems))
    return specs, info


# ---------------------------------------------------------------------------------------------
# LoRA.

def apply_loras(specs: list[LoraSpec], unet: SDUNet, text_encoder, info: SDCheckpointInfo, merge: bool,
                device) -> list:
    """Each file becomes a network shaped like it (networks.lora); merged into the weights, or
    run beside them at its multiplier. A file that does not fit is refused, naming what the
    model is."""
    from networks import lora

    networks = []
    for spec in specs:
        try:
            network = load_lora(lora.create_network_from_weights, str(spec.path), spec.multiplier, option="--lora",
                                vae=None, text_encoders=[text_encoder], denoiser=unet, merge=merge, device=device)
        except ModelFileError as e:
            raise ModelFileError(f"--lora {e} ({info.path.name} is an {info.label} model.)") from e
        networks.append(network)
        parts = f"{len(network.unet_loras)} U-Net" + (f" + {len(network.text_encoder_loras)} text-encoder"
                                                      if network.has_text_encoder_loras() else "")
        print(f"LoRA {spec.path.name} x{spec.multiplier} ({parts} modules{', merged' if merge else ''})")
    return networks


# ---------------------------------------------------------------------------------------------
# Generating.

@torch.no_grad()
def generate(args: argparse.Namespace) -> Path:
    specs, info = check_args(args)
    device = default_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    vae_dtype = torch.float32 if args.no_half_vae else dtype

    parts = load_sd_model(args.ckpt, v2=args.v2, vae_path=args.vae, device=device, dtype=dtype, vae_dtype=vae_dtype)
    if info is None:   # a .ckpt: known only now
        problems = lora_problems(specs, parts.info, args.v_parameterization)
        if problems:
            raise ConfigError("invalid options:\n  " + "\n  ".join(problems))
    info = parts.info
    print(f"{Path(args.ckpt).name}: {info.label} ({info.layout}), "
          f"{'v-prediction' if args.v_parameterization else 'ε-prediction'}, {dtype}, {device}")
    unet = SDUNet(parts.unet)
    apply_loras(specs, unet, parts.text_encoder, info, args.merge_lora_weights, device)

    text = build_text_encoding(parts.text_encoder, info.v2, tokenizer_cache_dir=args.tokenizer_cache_dir,
                               tokenizer_dir=parts.tokenizer_dir, clip_skip=args.clip_skip,
                               max_token_length=args.max_token_length)
    use_cfg = sd_sampling.uses_cfg(args.cfg_scale)
    # after the LoRA: a text-encoder LoRA changes the encoding
    # A1111 prompt weighting ((word), [word], (word:1.5)), as for sample images
    states = text.encode_weighted([args.prompt] + ([args.negative_prompt] if use_cfg else [])).to(device, dtype)
    print(f"{args.width}x{args.height}, {args.steps} steps of {args.sampler}, CFG {args.cfg_scale}, seed {args.seed}")
    image = sd_sampling.generate_image(unet, parts.vae, states[:1], states[1:] if use_cfg else None,
                                       width=args.width, height=args.height, steps=args.steps, scale=args.cfg_scale,
                                       seed=args.seed, sampler=args.sampler, v_prediction=args.v_parameterization,
                                       device=device)
    return save_image(image, image_output_path(args.out, args.seed, "sd"))


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), generate, argv)


if __name__ == "__main__":
    sys.exit(main())
