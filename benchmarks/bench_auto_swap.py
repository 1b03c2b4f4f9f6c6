"""Does `--blocks_to_swap auto` pick an N that fits, and how far is it from the smallest that does?

    python benchmarks/bench_auto_swap.py --caps 24 16 --out auto_swap.jsonl

For each memory cap (GiB; a smaller card emulated with torch.cuda.set_per_process_memory_fraction,
TARGETS.md's method), runs the full-size FLUX.1-dev step (bench_flux_train.py, the TARGETS setting)
with `--blocks_to_swap auto`, then with auto's N - 1, N - 2, ... until a run runs out of memory (or
N = 0 fits). The issue's target: auto's N runs without OOM and is within 2 of the smallest N that
fits. One JSON line per run goes to --out; a summary line per cap is printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent / "bench_flux_train.py"


def run(cap: float, blocks: str, steps: int, out) -> dict:
    cmd = [sys.executable, str(BENCH), "--device", "cuda", "--steps", str(steps), "--memory_cap_gib", str(cap),
           "--blocks_to_swap", blocks]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"oom": None, "error": proc.stderr[-2000:]}
    result["asked"] = blocks
    out.write(json.dumps(result) + "\n")
    out.flush()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--caps", type=float, nargs="+", default=[24.0, 16.0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max_probes", type=int, default=4, help="runs below auto's N per cap, at most")
    ap.add_argument("--out", type=Path, default=Path("auto_swap.jsonl"))
    a = ap.parse_args()
    with open(a.out, "w") as out:
        for cap in a.caps:
            auto = run(cap, "auto", a.steps, out)
            chosen = auto.get("blocks_to_swap")
            smallest_fit = chosen if auto.get("oom") is False else None
            n = chosen
            for _ in range(a.max_probes):
                if not isinstance(n, int) or n <= 0 or smallest_fit is None:
                    break
                n -= 1
                probe = run(cap, str(n), a.steps, out)
                if probe.get("oom") is not False:
                    break
                smallest_fit = n
            print(json.dumps({"cap_gib": cap, "auto": chosen, "auto_ran": auto.get("oom") is False,
                              "auto_peak_gib": auto.get("peak_alloc_gib"), "auto_s_per_step": auto.get("median_s"),
                              "smallest_fitting_n_found": smallest_fit,
                              "reason": auto.get("swap") or auto.get("error")}), flush=True)


if __name__ == "__main__":
    main()
