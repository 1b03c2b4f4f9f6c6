"""Write tiny random checkpoints and tokenizers for tests, the quickstart and benchmarks.

    python -m library.tiny flux --variant dev --out DIR [--seed 0] [--dtype fp32|bf16|fp16]

Prints the written paths as JSON. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m library.tiny", description=__doc__.splitlines()[0])
    families = parser.add_subparsers(dest="family", required=True)
    flux = families.add_parser("flux", help="tiny FLUX.1 dev/schnell or Chroma set (DiT, AE, CLIP-L, T5, tokenizers)")
    flux.add_argument("--variant", choices=["dev", "schnell", "chroma"], default="dev")
    flux.add_argument("--out", required=True, help="output folder (created if needed)")
    flux.add_argument("--seed", type=int, default=0)
    flux.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="dtype of the written tensors")
    args = parser.parse_args(argv)

    from library.tiny.flux import write_tiny_flux_set

    paths = write_tiny_flux_set(args.out, variant=args.variant, seed=args.seed, dtype=_DTYPES[args.dtype])
    print(json.dumps({k: (str(v) if v is not None else None) for k, v in vars(paths).items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
