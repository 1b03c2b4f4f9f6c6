"""train_network.py: the shared LoRA trainer and (later) the SD 1.x / 2.x family.

`NetworkTrainer`, the one training loop, lives in library/training/trainer.py so it can be
imported and tested; family scripts (flux_train_network.py, ...) subclass it. Run directly,
this script will train SD 1.x/2.x LoRA; that family is not built yet, so it says so.
"""

from __future__ import annotations

import sys

from library.training.trainer import FamilyModels, NetworkTrainer, NoisyInput  # noqa: F401  (re-exported)


def main(argv: list[str] | None = None) -> int:
    print("error: SD 1.x/2.x LoRA training (train_network.py) is not available yet. "
          "FLUX.1 and Chroma are: use flux_train_network.py.")
    return 2


if __name__ == "__main__":
    sys.exit(main())
