"""Check a dataset config and print what training would see, without loading any model:

    python -m library.data.report --dataset_config my_dataset.toml [--resolution 1024] [--reso_step_multiple 64]

Exit status 2 (and the list of problems) when the config or the images are unusable.
"""

from __future__ import annotations

import argparse
import sys

from library.data.arguments import add_dataset_arguments
from library.data.build import build_datasets
from library.data.summary import debug_dataset_text, group_report
from library.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a dataset config and print what training would see.")
    add_dataset_arguments(parser)
    parser.add_argument("--reso_step_multiple", type=int, default=64,
                        help="bucket_reso_steps must be a multiple of this (64 FLUX/SD/Lumina, 32 SD3, 16 Anima)")
    parser.add_argument("--default_resolution", type=int, default=1024,
                        help="resolution used when neither the config nor --resolution gives one")
    parser.add_argument("--seed", type=int, default=None, help="seed for the validation split and --debug_dataset")
    args = parser.parse_args(argv)
    try:
        train, _val = build_datasets(args, reso_step_multiple=args.reso_step_multiple,
                                     default_resolution=args.default_resolution)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(group_report(train))
    if args.debug_dataset:
        print(debug_dataset_text(train, seed=args.seed or 0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
