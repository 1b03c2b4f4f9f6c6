"""What the <family>_minimal_inference.py scripts share: the dtype names, the default device,
LoRA files given as "path;multiplier" and put on the loaded models, saving the image, and the
entry point that prints a UserError instead of a traceback (house rule: exit status 2).

Each script keeps its own flags, defaults and messages; the family's LoRA module is passed in,
so nothing here knows a family.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from library.errors import ConfigError, UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def default_device(name: str | None) -> torch.device:
    """--device, else CUDA when there is one, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def lora_multiplier(text: str, value: str, option: str) -> float:
    """The multiplier part of a "path;multiplier" argument `value` given to `option`."""
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{option} '{value}': write 'path;multiplier', e.g. 'my_lora.safetensors;0.8'") from None


def parse_lora_arg(value: str, option: str) -> tuple[str, float]:
    """'path;multiplier' -> (path, multiplier); without a multiplier ('path' or 'path;') it is 1.0."""
    path, _, mult = value.partition(";")
    return path, lora_multiplier(mult, value, option) if mult else 1.0


def load_lora(create_network_from_weights: Callable[..., Any], path: str, multiplier: float, *, option: str,
              vae: Any, text_encoders: Sequence[Any], denoiser: torch.nn.Module, merge: bool,
              device: torch.device | str) -> Any:
    """The LoRA file at `path` (given with `option`) on the loaded models, through the family's
    `create_network_from_weights`: merged into their weights, or run beside them at `multiplier`
    with its small weights on `device`. Modules for a text encoder change the prompt encoding too."""
    if not Path(path).is_file():
        raise ConfigError(f"{option} {path}: file not found")
    network, weights = create_network_from_weights(multiplier, path, vae, text_encoders, denoiser, for_inference=True)
    if merge:
        network.merge_to(weights, multiplier=multiplier)
    else:
        network.apply_to(text_encoders, denoiser, apply_text_encoder=network.has_text_encoder_loras(), apply_unet=True)
        network.load_weights(weights)
        network.set_multiplier(multiplier)
        network.to(device)
    return network


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def image_output_path(out: str | None, seed: int | None, prefix: str) -> Path:
    """Where an image goes: `out` when it names an image file; else a time-stamped
    `<prefix>_<time>[_<seed>].png` in the folder `out` (or in the current folder)."""
    stamp = time.strftime("%Y%m%d%H%M%S") + (f"_{seed}" if seed is not None else "")
    name = f"{prefix}_{stamp}.png"
    if out is None:
        return Path(name)
    path = Path(out)
    return path / name if path.is_dir() or path.suffix.lower() not in IMAGE_SUFFIXES else path


def save_image(image: Any, path: Path) -> Path:
    """Write the PIL image (its folder is created) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    print(f"saved {path}")
    return path


def run(parser: argparse.ArgumentParser, generate: Callable[[argparse.Namespace], Any],
        argv: list[str] | None) -> int:
    """An inference script's main(): 0 on success; a UserError is printed as "error: ..." (no
    traceback) and gives 2."""
    args = parser.parse_args(argv)
    try:
        generate(args)
    except UserError as e:
        print(f"error: {e}")
        return 2
    return 0
