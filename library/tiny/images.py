"""A small synthetic captioned image set: coloured shapes whose captions say what they show.

Used by the quickstart and the end-to-end tests. The pictures are simple enough for a tiny
model to learn something in a few dozen CPU steps, and come in a few aspect ratios so that
bucketing is exercised.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((128, 128), (192, 128), (128, 192))


def draw_shape(size: tuple[int, int], shape: str, fg: tuple, bg: tuple) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    r = min(w, h) * 0.3
    cx, cy = w / 2, h / 2
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    return img


def write_shapes_dataset(out_dir: str | Path, count: int = 12, seed: int = 0,
                         caption_extension: str = ".txt") -> Path:
    """Write `count` PNGs with captions into out_dir; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLOURS)
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        fg, bg = rng.sample(names, 2)
        size = SIZES[i % len(SIZES)]
        draw_shape(size, shape, COLOURS[fg], COLOURS[bg]).save(out / f"shape_{i:03d}.png")
        (out / f"shape_{i:03d}{caption_extension}").write_text(f"a {fg} {shape} on a {bg} background")
    return out
