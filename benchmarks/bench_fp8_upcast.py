"""fp8 -> bf16 weight upcast at FLUX.1's block weight shapes: PyTorch's cast (what --fp8_base pays per
Linear, three times per training step) against a torch.compile'd one.

Measured on an H200 (docs/benchmarks.md, 2026-12-02): PyTorch's cast runs at ~1.0 TB/s (a
non-vectorised kernel); the compiled one at 1.5-2.0 TB/s on the large weights, but each call costs
~75 us on the host, so in the host-bound eager step it gained nothing and is not used.

    python benchmarks/bench_fp8_upcast.py            # on a CUDA GPU; one JSON line
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.fp8 import FP8  # noqa: E402

SHAPES = {"qkv": (9216, 3072), "proj": (3072, 3072), "mlp_up": (12288, 3072), "mlp_down": (3072, 12288),
          "single_linear1": (21504, 3072), "single_linear2": (3072, 15360)}


def _time_us(fn, reps: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def main() -> None:
    compiled_cast = torch.compile(lambda w: w.to(torch.bfloat16), dynamic=True)
    out = {"bench": "fp8_upcast", "device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    for name, shape in SHAPES.items():
        w = torch.randn(shape, device="cuda").to(FP8)
        eager = _time_us(lambda: w.to(torch.bfloat16))
        compiled = _time_us(lambda: compiled_cast(w))
        gb = w.numel() * 3 / 1e9                     # 1 byte read + 2 written per weight
        out["shapes"][name] = {"eager_us": round(eager, 1), "compiled_us": round(compiled, 1),
                               "eager_tb_per_s": round(gb / eager * 1e3, 2),
                               "compiled_tb_per_s": round(gb / compiled * 1e3, 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
