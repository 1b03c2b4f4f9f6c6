"""Model loading at full size: the CPU route (load, then move) against straight-to-GPU reads.

    python benchmarks/bench_load.py --models /tmp/flux_full     # after bench_launch.py wrote the set
    python benchmarks/bench_load.py --tiny --models /tmp/tiny   # CPU check of the script

For the FLUX.1-dev DiT and T5-XXL files (in the page cache: each is read once before timing):
seconds to load onto the CPU and then move to the GPU (the route when the models do not all
fit), seconds to read straight into GPU memory (library/device_reader.py, the route when they
fit), and seconds to move T5 back to the CPU (what freeing it after caching costs). One JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_launch import warm_page_cache, write_full_size_set, write_tiny_set  # noqa: E402
from library import text_encoders as te  # noqa: E402
from library.flux.loading import load_flux_dit  # noqa: E402


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, round(time.perf_counter() - start, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, default=Path("/tmp/flux_full"))
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    paths = write_tiny_set(a.models) if a.tiny else write_full_size_set(a.models)
    gpu = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {"bench": "model_loading", "device": torch.cuda.get_device_name() if gpu.type == "cuda" else "cpu",
           "torch": torch.__version__}
    loaders = {"dit": lambda where: load_flux_dit(paths["dit"], device=where, dtype=torch.bfloat16)[0],
               "t5xxl": lambda where: te.load_t5xxl(paths["t5xxl"], device=where, dtype=torch.bfloat16)}
    for name, load in loaders.items():
        path = paths[name]
        warm_page_cache([path])
        gib = path.stat().st_size / 2**30
        on_cpu, cpu_s = _timed(lambda: load("cpu"))
        _, move_s = _timed(lambda: on_cpu.to(gpu))   # in place
        on_cpu = _ = None
        torch.cuda.empty_cache() if gpu.type == "cuda" else None
        direct, direct_s = _timed(lambda: load(gpu))
        entry = {"file_gib": round(gib, 2), "cpu_load_s": cpu_s, "move_to_gpu_s": move_s, "direct_to_gpu_s": direct_s,
                 "direct_gb_per_s": round(gib * 2**30 / 1e9 / max(direct_s, 1e-3), 1)}
        if name == "t5xxl":
            _, entry["move_back_to_cpu_s"] = _timed(lambda: direct.to("cpu"))
        direct = None
        torch.cuda.empty_cache() if gpu.type == "cuda" else None
        out[name] = entry
    print(json.dumps(out))


if __name__ == "__main__":
    main()
