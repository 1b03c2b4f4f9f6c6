"""Every dataset-config key: its type, the sections it may appear in, its CLI twin and default.

This table is the single source of truth for validation (config.py), precedence resolution and
the user guide (docs/dataset_config.md). A key that is not here is an error; a key that is here
is either honoured or listed in UNSUPPORTED with the reason, never silently ignored.

Sections ("levels"): GENERAL = `[general]`, DATASET = `[[datasets]]`, SUBSET = `[[datasets.subsets]]`.
A value is looked up subset -> dataset -> general -> command line -> default (None falls through).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

GENERAL = "general"
DATASET = "dataset"
SUBSET = "subset"

SECTION_TITLES = {GENERAL: "[general]", DATASET: "[[datasets]]", SUBSET: "[[datasets.subsets]]"}

# Interpolation names sd-scripts accepts for resize_interpolation. lanczos/box go through PIL,
# the rest through cv2 (FORMATS 5.3).
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")

ANY_LEVEL = frozenset({GENERAL, DATASET, SUBSET})
DATASET_LEVEL = frozenset({GENERAL, DATASET})
SUBSET_ONLY = frozenset({SUBSET})


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be 0 or more"


def _positive(v: Any) -> str | None:
    return None if v >= 1 else "must be 1 or more"


def _rate(v: Any) -> str | None:
    return None if 0.0 <= v <= 1.0 else "must be between 0.0 and 1.0"


def _non_empty(v: Any) -> str | None:
    return None if v != "" else "must not be empty"


def _interpolation(v: Any) -> str | None:
    return None if v in INTERPOLATIONS else "must be one of " + ", ".join(INTERPOLATIONS)


def _resolution(v: Any) -> str | None:
    sides = (v, v) if isinstance(v, int) else tuple(v)
    return None if all(s >= 1 for s in sides) else "sides must be 1 or more"


def _caption_extension(v: Any) -> str | None:
    if v == "":
        return "must not be empty (e.g. \".txt\")"
    if "." not in v:
        return f"has no '.'; a caption file is <image stem><extension>, so write \".{v}\""
    return None


@dataclass(frozen=True)
class KeySpec:
    """One dataset-config key.

    kind: "bool" | "int" | "float" (int accepted) | "str" | "number" (int or float) |
          "resolution" (int or [w, h]) | "float_pair" ([lo, hi]) | "table".
    cli: the argparse dest that supplies the command-line fallback (None: no CLI twin).
    """

    name: str
    kind: str
    levels: frozenset
    default: Any = None
    cli: str | None = None
    check: Callable[[Any], str | None] | None = None
    help: str = ""


def _k(name, kind, levels, default=None, cli=None, check=None, help=""):
    return KeySpec(name, kind, levels, default, cli, check, help)


_SPECS = [
    # --- dataset level (also allowed in [general]) ---
    _k("resolution", "resolution", DATASET_LEVEL, None, "resolution", _resolution,
       "training resolution: one number (square) or [width, height]; the bucket area"),
    _k("batch_size", "int", DATASET_LEVEL, 1, "train_batch_size", _positive, "images per batch"),
    _k("enable_bucket", "bool", DATASET_LEVEL, False, "enable_bucket", None,
       "aspect-ratio bucketing"),
    _k("min_bucket_reso", "int", DATASET_LEVEL, 256, "min_bucket_reso", _positive,
       "smallest bucket side (rounded down to bucket_reso_steps)"),
    _k("max_bucket_reso", "int", DATASET_LEVEL, 1024, "max_bucket_reso", _positive,
       "largest bucket side (rounded up to bucket_reso_steps)"),
    _k("bucket_reso_steps", "int", DATASET_LEVEL, 64, "bucket_reso_steps", _positive,
       "bucket sides are multiples of this"),
    _k("bucket_no_upscale", "bool", DATASET_LEVEL, False, "bucket_no_upscale", None,
       "never enlarge an image; buckets are made per image size"),
    _k("validation_seed", "int", DATASET_LEVEL, None, "validation_seed", None,
       "seed of the train/validation split (default: --seed)"),
    _k("network_multiplier", "float", DATASET_LEVEL, 1.0, None, None,
       "LoRA multiplier applied to this dataset's batches"),
    # --- validation_split: dataset level in sd-scripts; the FLUX guide also sets it per subset ---
    _k("validation_split", "float", ANY_LEVEL, 0.0, "validation_split", _rate,
       "fraction of each (non-reg) subset held out for validation"),
    # --- subset keys, allowed at every level ---
    _k("resize_interpolation", "str", ANY_LEVEL, None, "resize_interpolation", _interpolation,
       "resize filter (default: area when shrinking both sides, else lanczos)"),
    _k("num_repeats", "int", ANY_LEVEL, 1, "dataset_repeats", _positive,
       "how many times each image is used per epoch"),
    _k("shuffle_caption", "bool", ANY_LEVEL, False, "shuffle_caption", None,
       "shuffle the comma-separated tags each time"),
    _k("caption_separator", "str", ANY_LEVEL, ",", "caption_separator", _non_empty,
       "tag separator for shuffle/keep/dropout"),
    _k("keep_tokens", "int", ANY_LEVEL, 0, "keep_tokens", _non_negative,
       "the first N tags are never shuffled or dropped"),
    _k("keep_tokens_separator", "str", ANY_LEVEL, "", "keep_tokens_separator", None,
       "marks the fixed prefix (and an optional fixed suffix) of a caption"),
    _k("secondary_separator", "str", ANY_LEVEL, None, "secondary_separator", _non_empty,
       "joins tags that are shuffled/dropped as one; replaced by caption_separator at the end"),
    _k("enable_wildcard", "bool", ANY_LEVEL, False, "enable_wildcard", None,
       "{a|b|c} choices and multi-line captions (one random line)"),
    _k("color_aug", "bool", ANY_LEVEL, False, "color_aug", None, "weak hue/gamma augmentation"),
    _k("flip_aug", "bool", ANY_LEVEL, False, "flip_aug", None, "horizontal flip with p=0.5"),
    _k("random_crop", "bool", ANY_LEVEL, False, "random_crop", None,
       "crop the overflow at a random offset instead of the centre"),
    _k("face_crop_aug_range", "float_pair", ANY_LEVEL, None, "face_crop_aug_range", None,
       "face-centred crop augmentation"),
    _k("caption_prefix", "str", ANY_LEVEL, None, "caption_prefix", None,
       "text put before every caption (joined with a space)"),
    _k("caption_suffix", "str", ANY_LEVEL, None, "caption_suffix", None,
       "text put after every caption (joined with a space)"),
    _k("token_warmup_min", "int", ANY_LEVEL, 1, "token_warmup_min", _non_negative,
       "tags kept at step 0 of the token warm-up"),
    _k("token_warmup_step", "number", ANY_LEVEL, 0, "token_warmup_step", _non_negative,
       "steps until all tags are used (a value < 1 is a fraction of max_train_steps)"),
    _k("custom_attributes", "table", ANY_LEVEL, None, None, None,
       "free-form table passed through to the batch as custom_attributes"),
    _k("caption_dropout_rate", "float", ANY_LEVEL, 0.0, "caption_dropout_rate", _rate,
       "probability that a caption becomes empty"),
    _k("caption_dropout_every_n_epochs", "int", ANY_LEVEL, 0, "caption_dropout_every_n_epochs",
       _non_negative, "drop every caption on epochs divisible by N"),
    _k("caption_tag_dropout_rate", "float", ANY_LEVEL, 0.0, "caption_tag_dropout_rate", _rate,
       "probability that each (flexible) tag is dropped"),
    _k("caption_extension", "str", ANY_LEVEL, ".caption", "caption_extension", _caption_extension,
       "caption file extension (DreamBooth style)"),
    _k("cache_info", "bool", ANY_LEVEL, False, "cache_info", None,
       "read/write <image_dir>/metadata_cache.json (sizes and captions) to start faster"),
    _k("class_tokens", "str", ANY_LEVEL, None, None, None,
       "caption used when an image has no caption file (DreamBooth style)"),
    # --- subset only ---
    _k("image_dir", "str", SUBSET_ONLY, None, None, _non_empty, "folder of images"),
    _k("is_reg", "bool", SUBSET_ONLY, False, None, None, "regularisation images"),
    _k("alpha_mask", "bool", SUBSET_ONLY, False, "alpha_mask", None,
       "use the alpha channel as the loss mask"),
    _k("metadata_file", "str", SUBSET_ONLY, None, None, _non_empty,
       "fine-tuning style: JSON/JSONL with captions"),
    _k("conditioning_data_dir", "str", SUBSET_ONLY, None, None, _non_empty,
       "mask images named like the images (red channel: 255 = train, 0 = ignore) for --masked_loss"),
]

KEYS: dict[str, KeySpec] = {s.name: s for s in _SPECS}

# Documented spellings that mean another key (FLUX guide 7.2 says interpolation_type).
ALIASES: dict[str, str] = {"interpolation_type": "resize_interpolation"}

# Options that exist only on the command line in sd-scripts; in a TOML they are an error.
CLI_ONLY: dict[str, str] = {
    "prior_loss_weight": "--prior_loss_weight",
    "debug_dataset": "--debug_dataset",
    "max_token_length": "--max_token_length",
}

# Keys we know but refuse, with the reason. Checked after validation so the message is specific.
UNSUPPORTED: dict[str, str] = {
    "face_crop_aug_range": "face-centred crop augmentation is not supported yet; remove it "
                           "(random_crop is the closest alternative)",
}

# Keys found in sd-scripts forks or newer versions that we do not implement yet.
FOREIGN_KEYS: dict[str, str] = {
    "sample_ratio": "not supported yet; use num_repeats instead",
    "validation_split_num": "not supported yet; use validation_split (a fraction) instead",
    "path_pattern": "not supported yet; put the images in their own image_dir",
    "skip_image_resolution": "not supported yet",
    "caption_extention": "is the old misspelling; write caption_extension",
    "recursive": "not supported yet; sub-folders are not scanned, give each one as a subset",
    "mask_dir": "not supported yet; use alpha_mask with RGBA images",
}


def allowed_levels(name: str) -> frozenset:
    return KEYS[name].levels


def keys_for_level(level: str) -> list[str]:
    return [k for k, s in KEYS.items() if level in s.levels]


def where_it_belongs(name: str) -> str:
    """Human text naming the sections a key may appear in."""
    levels = KEYS[name].levels
    return " or ".join(SECTION_TITLES[lv] for lv in (GENERAL, DATASET, SUBSET) if lv in levels)
