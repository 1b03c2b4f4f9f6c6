"""Shared helpers for the data-pipeline tests (tiny random images, arguments, fake encoders)."""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from library.data import add_dataset_arguments


def make_image(path: str | os.PathLike, size: tuple[int, int], *, mode: str = "RGB", seed: int = 0, **save_kw) -> str:
    """A random image of `size` = (w, h) saved at `path` in `mode`."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode in ("RGB", "RGBA", "CMYK"):
        arr = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
        img = Image.fromarray(arr, mode)
    elif mode == "L":
        img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    else:
        raise ValueError(mode)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **save_kw)
    return str(path)


def make_folder(folder: str | os.PathLike, sizes: list[tuple[int, int]], *, captions: list[str | None] | None = None,
                ext: str = ".png", caption_ext: str = ".txt", prefix: str = "img") -> list[str]:
    """Images named img0, img1... with optional caption files."""
    paths = []
    for i, size in enumerate(sizes):
        p = make_image(Path(folder) / f"{prefix}{i}{ext}", size, seed=i)
        paths.append(p)
        if captions is not None and captions[i] is not None:
            Path(folder, f"{prefix}{i}{caption_ext}").write_text(captions[i], encoding="utf-8")
    return paths


def parse_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    parser.add_argument("--seed", type=int, default=None)
    return parser.parse_args(list(argv))


def write_toml(path: str | os.PathLike, text: str) -> str:
    Path(path).write_text(text, encoding="utf-8")
    return str(path)


class FakeLatentEncoder:
    """8x8 average pooling, channels repeated to 4: deterministic, counts what it encodes."""

    def __init__(self, identity: str = "fake-vae-1", file_suffix: str | None = "_fake"):
        self.identity = identity
        if file_suffix is not None:
            self.file_suffix = file_suffix
        self.images_encoded = 0
        self.calls = 0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.float32 and images.ndim == 4 and images.shape[1] == 3
        assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0
        self.images_encoded += images.shape[0]
        self.calls += 1
        pooled = F.avg_pool2d(images, 8)
        return torch.cat([pooled, pooled[:, :1]], dim=1)


def expected_latent(pixels: torch.Tensor) -> torch.Tensor:
    pooled = F.avg_pool2d(pixels[None], 8)
    return torch.cat([pooled, pooled[:, :1]], dim=1)[0]


def caption_vector(caption: str) -> torch.Tensor:
    digest = hashlib.sha256(caption.encode("utf-8")).digest()
    return torch.tensor(list(digest[:8]), dtype=torch.float32)


class FakeTextEncoder:
    """One vector per caption derived from its sha256, so tests can check which caption was used."""

    def __init__(self, identity: str = "fake-te-1", file_suffix: str | None = "_fake_te"):
        self.identity = identity
        if file_suffix is not None:
            self.file_suffix = file_suffix
        self.captions_encoded: list[str] = []

    def encode(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        self.captions_encoded.extend(captions)
        return [{"emb": caption_vector(c).reshape(2, 4), "length": torch.tensor([len(c)])} for c in captions]
