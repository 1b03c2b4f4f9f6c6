"""Draw step time and peak memory per memory option (FLUX.1-dev LoRA step, full size) as a PNG.

    python benchmarks/plot_flux_memory.py benchmarks/results/2026-12-01_h200_flux_memory.jsonl \
        docs/flux_memory_options.png

Reads the JSON lines `bench_flux_train.py` prints; the last line of each configuration wins (so
a re-measurement replaces an earlier one). Pillow only: no plotting library needed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# sd-scripts on the same GPU model (../shared/TARGETS.md): (s/step, peak GiB) per configuration.
REFERENCE = {"bf16": (1.02, 25.7), "swap 18": (1.39, 15.2), "fp8": (1.09, 15.0)}
ORDER = ["bf16", "offloaded checkpoints", "swap 18", "swap 35", "fp8", "fp8 + swap 18"]


def label(row: dict) -> str:
    swap, fp8 = row.get("blocks_to_swap") or 0, row.get("fp8_base")
    if row.get("cpu_offload_checkpointing"):
        return "offloaded checkpoints"
    if fp8:
        return "fp8" if not swap else f"fp8 + swap {swap}"
    return "bf16" if not swap else f"swap {swap}"


def load(path: Path) -> dict[str, dict]:
    rows = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows[label(row)] = row
    return rows


def draw(rows: dict[str, dict], out: Path) -> None:
    names = [n for n in ORDER if n in rows] + sorted(set(rows) - set(ORDER))
    font = ImageFont.load_default()
    width, row_h, left, panel_w, gap = 1000, 34, 170, 360, 60
    height = 70 + row_h * len(names) + 50
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    first = next(iter(rows.values()))
    d.text((10, 8), f"FLUX.1-dev LoRA step, 1024x1024, rank 16, bf16, grad ckpt ({first.get('device')}, "
                    f"torch {first.get('torch')})", fill="black", font=font)
    panels = [("seconds per step", "median_s", 1.6, 0), ("peak allocated GiB", "peak_alloc_gib", 30.0, 1)]
    for title, key, vmax, k in panels:
        x0 = left + k * (panel_w + gap)
        d.text((x0, 30), title + "   (grey tick: sd-scripts)", fill="black", font=font)
        for i, name in enumerate(names):
            y = 55 + i * row_h
            if k == 0:
                d.text((10, y + 8), name, fill="black", font=font)
            value = float(rows[name][key])
            d.rectangle([x0, y + 4, x0 + int(panel_w * value / vmax), y + row_h - 6],
                        fill=(70, 120, 200) if k == 0 else (90, 170, 110))
            text_x = x0 + int(panel_w * value / vmax) + 4
            ref = REFERENCE.get(name)
            if ref:
                rx = x0 + int(panel_w * ref[k] / vmax)
                d.line([rx, y, rx, y + row_h - 2], fill=(110, 110, 110), width=3)
                text_x = max(text_x, rx + 6)
            d.text((text_x, y + 8), f"{value:.3g}", fill="black", font=font)
        d.line([x0, 50, x0, 55 + row_h * len(names)], fill="black")
    modes = ", ".join(f"{n}: {rows[n].get('fp8_matmul') or 'scaled fp8 matmul'}" for n in names if rows[n].get("fp8_base"))
    d.text((10, height - 30), f"fp8 = block weights in float8_e4m3fn ({modes}); swap N = N blocks wait in pinned "
                              "CPU memory, copies overlap compute", fill=(60, 60, 60), font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    draw(load(Path(sys.argv[1])), Path(sys.argv[2]))
    print(f"wrote {sys.argv[2]}")


if __name__ == "__main__":
    main()
