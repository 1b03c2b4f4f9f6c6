"""The DreamBooth folder layout (`--train_data_dir` / `--reg_data_dir` without a dataset config).

Each sub-folder named `<repeats>_<class tokens>` (e.g. `10_sks dog`) becomes a subset with that
many repeats whose images without a caption file get the class tokens as caption.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from library.errors import DatasetError


@dataclass
class FolderLayout:
    config: dict                     # a dataset config equivalent to the folders
    ignored: list[str] = field(default_factory=list)


def parse_folder_name(name: str) -> tuple[int, str] | None:
    """`10_sks dog` -> (10, "sks dog"); None when the name does not start with a repeat count."""
    head, _, rest = name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        return None
    return repeats, rest


def _subsets(base: str, is_reg: bool, ignored: list[str]) -> list[dict]:
    option = "--reg_data_dir" if is_reg else "--train_data_dir"
    if not os.path.isdir(base):
        raise DatasetError(f"{option} '{base}' is not a folder")
    subsets = []
    for name in sorted(os.listdir(base)):
        path = os.path.join(base, name)
        if not os.path.isdir(path) or name.startswith("."):
            continue
        parsed = parse_folder_name(name)
        if parsed is None or parsed[0] < 1:
            ignored.append(f"{path}: the folder name does not start with '<repeats>_' (e.g. '10_{name}'), "
                           "so it is not used")
            continue
        repeats, class_tokens = parsed
        subsets.append({"image_dir": path, "num_repeats": repeats, "is_reg": is_reg, "class_tokens": class_tokens})
    return subsets


def dreambooth_folder_config(train_data_dir: str, reg_data_dir: str | None) -> FolderLayout:
    ignored: list[str] = []
    train = _subsets(train_data_dir, False, ignored)
    if not train:
        raise DatasetError(
            f"--train_data_dir '{train_data_dir}' has no sub-folders named '<repeats>_<class tokens>' "
            "(e.g. '10_sks dog'). Put the images in such a folder, or use --dataset_config."
        )
    reg = _subsets(reg_data_dir, True, ignored) if reg_data_dir else []
    return FolderLayout({"datasets": [{"subsets": train + reg}]}, ignored)
