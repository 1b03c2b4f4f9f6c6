"""Data-pipeline throughput: decode+resize+crop, and loading from the latent / text caches.

    python benchmarks/bench_data.py [--num_images 48] [--workers 0 2] [--width 1280 --height 960]

Makes a synthetic folder of JPEG photos (random smooth content, so the files compress like photos),
then times full epochs through DatasetGroup.loader():
  1. images: decode + resize + centre crop + to tensor (the uncached path), per worker count;
  2. latents from disk and from memory (FLUX-shaped: 16 x H/8 x W/8 float32);
  3. text outputs from disk (T5-shaped: 512 x 4096 bf16 + pooled 768).
No model is used: the encoders are cheap fakes, so the one caching pass that is timed measures the
decode + resize + write side only. Each row gives images/s as the median and the best of the timed
epochs, and the 1-minute load average is printed: other work on the machine skews every figure.
Results and settings: docs/benchmarks.md ("Data pipeline").
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Run as `python benchmarks/bench_data.py` from anywhere: the repository root holds `library`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.data import add_dataset_arguments, build_datasets  # noqa: E402


class FluxShapedLatents:
    identity = "bench-latents-16ch"
    file_suffix = "_bench"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(images, 8)
        return pooled.repeat(1, 6, 1, 1)[:, :16].contiguous()


class T5ShapedText:
    identity = "bench-text-t5-512"
    file_suffix = "_bench_te"

    def encode(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        return [{"t5_out": torch.full((512, 4096), float(len(c)), dtype=torch.bfloat16),
                 "l_pooled": torch.zeros(768)} for c in captions]


def make_photos(folder: Path, n: int, size: tuple[int, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(n):
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        img.save(folder / f"photo{i:04d}.jpg", quality=90)
        (folder / f"photo{i:04d}.txt").write_text(f"photo {i}, a test image")


def time_epoch(group, workers: int, epochs: int = 3) -> list[float]:
    """Steady-state images per second of each timed epoch: epoch 1 warms up (worker start-up, page
    cache) and is not timed; epochs 2..epochs are, one rate each (the median resists a neighbour
    process stealing the CPU for a moment; the best shows what the code can do on a quiet machine)."""
    loader = group.loader(seed=0, num_workers=workers, persistent_workers=workers > 0)
    for _ in loader.epoch(1):
        pass
    rates = []
    for epoch in range(2, epochs + 1):
        n = 0
        start = time.perf_counter()
        for batch in loader.epoch(epoch):
            n += len(batch["captions"])
        rates.append(n / (time.perf_counter() - start))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num_images", type=int, default=48)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=960)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--epochs", type=int, default=3, help="epochs per measurement (the first is warm-up)")
    ap.add_argument("--dir", type=str, default=None, help="work folder (default: a temporary one, deleted)")
    opts = ap.parse_args()
    if opts.epochs < 2:
        ap.error("--epochs must be 2 or more (the first epoch is warm-up and not timed)")

    load_start = os.getloadavg()[0]  # other work on the machine skews every figure: print it
    root = Path(opts.dir or tempfile.mkdtemp(prefix="bench_data_"))
    try:
        imgs = root / "imgs"
        make_photos(imgs, opts.num_images, (opts.width, opts.height))
        cfg = root / "d.toml"
        cfg.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = {opts.resolution}\n'
                       f'enable_bucket = true\nbatch_size = {opts.batch_size}\n'
                       f'[[datasets.subsets]]\nimage_dir = "{imgs}"\n')
        parser = argparse.ArgumentParser()
        add_dataset_arguments(parser)
        args = parser.parse_args(["--dataset_config", str(cfg)])

        rows = []
        train, _ = build_datasets(args)
        bucket = train.datasets[0].items[0]
        print(f"{opts.num_images} JPEGs {opts.width}x{opts.height} -> resized {bucket.resized} "
              f"-> bucket {bucket.bucket}")
        for w in opts.workers:
            rows.append((f"decode+resize+crop, {w} workers", time_epoch(train, w, opts.epochs)))

        t0 = time.perf_counter()
        train.cache_latents(FluxShapedLatents(), to_disk=True, batch_size=opts.batch_size, progress=False)
        rows.append(("cache latents to disk (decode+resize threads, fake encoder; one pass)",
                     [opts.num_images / (time.perf_counter() - t0)]))
        for w in opts.workers:
            rows.append((f"latents from disk, {w} workers", time_epoch(train, w, opts.epochs)))
        mem, _ = build_datasets(args)
        mem.cache_latents(FluxShapedLatents(), to_disk=False, progress=False)
        for w in opts.workers:
            rows.append((f"latents from memory, {w} workers", time_epoch(mem, w, opts.epochs)))

        text, _ = build_datasets(args)
        text.cache_latents(FluxShapedLatents(), to_disk=False, progress=False)
        text.cache_text_outputs(T5ShapedText(), to_disk=True, batch_size=8, progress=False)
        for w in opts.workers:
            rows.append((f"latents (memory) + T5 text from disk, {w} workers", time_epoch(text, w, opts.epochs)))

        print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}, Pillow {Image.__version__}; load average (1 min) "
              f"{load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end")
        print("| path | images/s (median of timed epochs) | best epoch |\n|---|---|---|")
        for name, rates in rows:
            print(f"| {name} | {statistics.median(rates):.1f} | {max(rates):.1f} |")
    finally:
        if opts.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
