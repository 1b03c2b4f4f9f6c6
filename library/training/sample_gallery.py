"""`<output_dir>/sample/index.html`: samples as a grid (one row per sampling point, one column
per prompt) and the loss curve (training loss, and validation loss as blue dots when there is a
validation set), rewritten after every sampling so a browser shows progress.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SampleRow:
    label: str                                       # "step 200" / "epoch 3"
    images: dict[int, str] = field(default_factory=dict)  # prompt index -> file name


def _loss_svg(points: list[tuple[int, float]], val_points: list[tuple[int, float]] = (),
              width: int = 640, height: int = 200) -> str:
    if len(points) < 2:
        return "<p>(the loss curve appears after a few steps)</p>"
    steps = [p[0] for p in points]
    losses = [p[1] for p in points]
    # a moving average makes the trend readable; the raw points stay faint behind it
    k = max(1, len(losses) // 50)
    smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
    lo, hi = min(losses + [v for _, v in val_points]), max(losses + [v for _, v in val_points])
    hi = hi if hi > lo else lo + 1e-8
    s0, s1 = steps[0], max(steps[-1], steps[0] + 1, *(s for s, _ in val_points))

    def pos(s, v) -> tuple[float, float]:
        return 40 + (s - s0) / (s1 - s0) * (width - 50), 10 + (hi - v) / (hi - lo) * (height - 30)

    def line(pts) -> str:
        return " ".join("{:.1f},{:.1f}".format(*pos(s, v)) for s, v in pts)

    raw, avg, val = line(zip(steps, losses)), line(zip(steps, smooth)), line(val_points)
    dots = "".join('<circle cx="{:.1f}" cy="{:.1f}" r="3" fill="#36c"/>'.format(*pos(s, v)) for s, v in val_points)
    val_line = f'<polyline points="{val}" fill="none" stroke="#36c" stroke-width="1"/>' if len(val_points) > 1 else ""
    legend = (f'<text x="{width - 130}" y="14" font-size="11" fill="#c33">train</text>'
              f'<text x="{width - 90}" y="14" font-size="11" fill="#36c">validation</text>') if val_points else ""
    return (f'<svg width="{width}" height="{height}" style="background:#fff;border:1px solid #ccc">'
            f'<polyline points="{raw}" fill="none" stroke="#bbb" stroke-width="1"/>'
            f'<polyline points="{avg}" fill="none" stroke="#c33" stroke-width="2"/>{val_line}{dots}{legend}'
            f'<text x="2" y="14" font-size="11">{hi:.4g}</text>'
            f'<text x="2" y="{height - 18}" font-size="11">{lo:.4g}</text>'
            f'<text x="40" y="{height - 4}" font-size="11">step {s0}</text>'
            f'<text x="{width - 80}" y="{height - 4}" font-size="11">step {steps[-1]}</text></svg>')


def write_gallery(sample_dir: Path, title: str, prompts: list[str], rows: list[SampleRow],
                  metrics_file: Path | None = None) -> Path:
    points, val_points = [], []
    if metrics_file is not None and metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "loss" in rec:
                points.append((int(rec["step"]), float(rec["loss"])))
            if "val_loss" in rec:
                val_points.append((int(rec["step"]), float(rec["val_loss"])))
    head = "".join(f"<th>{i}: {html.escape(p[:120])}</th>" for i, p in enumerate(prompts))
    body = []
    for row in rows:
        cells = "".join(
            f'<td><a href="{html.escape(row.images[i])}"><img src="{html.escape(row.images[i])}"></a></td>'
            if i in row.images else "<td></td>" for i in range(len(prompts)))
        body.append(f"<tr><th>{html.escape(row.label)}</th>{cells}</tr>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}} img{{max-width:256px;max-height:256px}}
th{{font-weight:normal;font-size:12px;text-align:left;vertical-align:top;max-width:256px}}</style></head>
<body><h2>{html.escape(title)}</h2><h3>Loss</h3>{_loss_svg(points, val_points)}
<h3>Samples</h3><table><tr><th></th>{head}</tr>{''.join(reversed(body))}</table></body></html>"""
    out = sample_dir / "index.html"
    out.write_text(page, encoding="utf-8")
    return out
