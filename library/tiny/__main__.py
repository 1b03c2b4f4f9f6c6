"""Write tiny random checkpoints and tokenizers for tests, the quickstart and benchmarks.

    python -m library.tiny flux --variant dev --out DIR [--seed 0] [--dtype fp32|bf16|fp16]
    python -m library.tiny <family> --help          (families: see FAMILY_MODULES)

Prints the written paths as JSON. Nothing is downloaded.

Each family lives in its own module `library.tiny.<family>`, which provides
    add_cli_arguments(parser)           the family's own flags (--out, --seed, --dtype are common)
    write_cli(args) -> dict[str, Path]  writes the set and returns name -> path
A family module that does not exist yet is simply not offered.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FAMILY_MODULES = {
    "flux": "library.tiny.flux",
    "sd3": "library.tiny.sd3",
    "lumina": "library.tiny.lumina",
    "anima": "library.tiny.anima",
    "sd": "library.tiny.sd",
}


def _available_families() -> dict[str, object]:
    return {name: importlib.import_module(mod) for name, mod in FAMILY_MODULES.items()
            if importlib.util.find_spec(mod) is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m library.tiny", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="family", required=True)
    modules = _available_families()
    for name, module in modules.items():
        p = sub.add_parser(name, help=(module.__doc__ or name).strip().splitlines()[0])
        p.add_argument("--out", required=True, help="output folder (created if needed)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written tensors")
        module.add_cli_arguments(p)
    args = parser.parse_args(argv)
    args.torch_dtype = DTYPES[args.dtype]
    paths = modules[args.family].write_cli(args)
    print(json.dumps({k: (str(v) if v is not None else None) for k, v in paths.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
