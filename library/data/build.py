"""build_datasets: command-line arguments -> validated, scanned and bucketed DatasetGroups."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from library.data import caching
from library.data import config_schema as schema
from library.data.config import load_config_file, resolve_config
from library.data.folders import dreambooth_folder_config
from library.data.group import DatasetGroup, GroupSettings
from library.data.items import ProbeCache
from library.data.dataset import build_dataset
from library.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

# Namespace attributes recorded for metadata (sd-scripts reads these from args).
_METADATA_ARGS = (
    "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "face_crop_aug_range",
    "validation_seed", "validation_split", "resize_interpolation", "color_aug", "flip_aug", "random_crop",
    "shuffle_caption", "keep_tokens",
)


def parse_resolution(value: Any) -> tuple[int, int] | None:
    """'512' -> (512, 512); '512,768' -> (512, 768) (width, height). Accepts ints and pairs too."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) in (1, 2):
        parts = [str(v) for v in value]
    else:
        parts = [p.strip() for p in str(value).replace("x", ",").split(",")]
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--resolution {value!r} is not 'SIZE' or 'WIDTH,HEIGHT' (e.g. 1024 or 1024,768)") from None
    if len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2 or min(sides) < 1:
        raise ConfigError(f"--resolution {value!r} is not 'SIZE' or 'WIDTH,HEIGHT' (e.g. 1024 or 1024,768)")
    return (sides[0], sides[1])


def parse_float_pair(value: Any, option: str) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        lo, hi = (float(p) for p in str(value).split(","))
    except ValueError:
        raise ConfigError(f"{option} {value!r} is not 'LOW,HIGH' (e.g. 2.0,4.0)") from None
    return (lo, hi)


def cli_values_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """{CLI dest: value} for every option that is a config fallback (None = not given)."""
    out: dict[str, Any] = {}
    for spec in schema.KEYS.values():
        if spec.cli is None:
            continue
        value = getattr(args, spec.cli, None)
        if spec.cli == "resolution":
            value = parse_resolution(value)
        elif spec.cli == "face_crop_aug_range" and isinstance(value, str):
            value = parse_float_pair(value, "--face_crop_aug_range")
        out[spec.cli] = value
    return out


def _load_raw_config(args: argparse.Namespace) -> tuple[Any, str, bool, list[str]]:
    """(raw config, source name, whether a config file was used, warnings)."""
    warnings: list[str] = []
    config_path = getattr(args, "dataset_config", None)
    train_dir = getattr(args, "train_data_dir", None)
    reg_dir = getattr(args, "reg_data_dir", None)
    if config_path:
        if train_dir or reg_dir:
            warnings.append("--train_data_dir/--reg_data_dir are not used because --dataset_config is given "
                            "(put those folders in the config as subsets)")
        return load_config_file(config_path), str(config_path), True, warnings
    if train_dir:
        layout = dreambooth_folder_config(train_dir, reg_dir)
        return layout.config, f"--train_data_dir {train_dir}", False, warnings + layout.ignored
    raise ConfigError("no training images given: pass --dataset_config my_dataset.toml, or --train_data_dir with "
                      "sub-folders named '<repeats>_<class tokens>'")


def build_datasets(args: argparse.Namespace, *, reso_step_multiple: int = 64,
                   default_resolution: int = 1024) -> tuple[DatasetGroup, DatasetGroup | None]:
    """Parse and validate the dataset options and config, scan the images, assign buckets, split
    validation images. Returns (train group, validation group or None). Every user mistake is a
    UserError raised before any model work, listing all problems at once."""
    raw, source, used_config, warnings = _load_raw_config(args)
    cli = cli_values_from_args(args)
    resolved = resolve_config(raw, source, cli=cli, reso_step_multiple=reso_step_multiple,
                              default_resolution=default_resolution)
    warnings += resolved.warnings

    seed = getattr(args, "seed", None)
    fallback_seed = seed if seed is not None else 0
    probes = ProbeCache()
    builds = [build_dataset(spec, i, probes, fallback_seed) for i, spec in enumerate(resolved.datasets)]

    errors = [e for b in builds for e in b.errors]
    if errors:
        raise DatasetError(f"{source}: {len(errors)} problem(s) with the dataset files:\n"
                           + "\n".join(f"  - {e}" for e in errors))
    skipped = [s for b in builds for s in b.skipped]
    notes = warnings + [n for b in builds for n in b.notes]
    train_sets = [b.train for b in builds if b.train is not None]
    val_sets = [b.validation for b in builds if b.validation is not None]
    if not train_sets or sum(ds.num_train_images for ds in train_sets) == 0:
        detail = f" ({len(skipped)} images were skipped as unreadable)" if skipped else ""
        raise DatasetError(f"{source}: no training images found{detail}. Check image_dir / --train_data_dir and "
                           "that the folders contain images (png, jpg, webp, ...).")

    meta_cli = {name: getattr(args, name, None) for name in _METADATA_ARGS}
    meta_cli.update({k: v for k, v in cli.items() if k in _METADATA_ARGS})
    prior_loss_weight = getattr(args, "prior_loss_weight", None)
    settings = GroupSettings(
        prior_loss_weight=1.0 if prior_loss_weight is None else float(prior_loss_weight),
        max_token_length=getattr(args, "max_token_length", None),
        source=source,
        used_config_file=used_config,
        cli=meta_cli,
    )
    train = DatasetGroup(train_sets, settings, skipped=skipped, notes=notes)
    validation = None
    if val_sets:
        val_settings = GroupSettings(**{**settings.__dict__, "is_validation": True})
        validation = DatasetGroup(val_sets, val_settings)
    train.validation = validation
    for note in notes:
        logger.warning(note)
    if skipped:
        logger.warning("%d images skipped (unreadable or too small); see the dataset report", len(skipped))

    _refuse_cache_conflicts(args, train, validation)
    return train, validation


def _refuse_cache_conflicts(args: argparse.Namespace, train: DatasetGroup, validation: DatasetGroup | None) -> None:
    """Say now, before any model is loaded, if the requested caching cannot work."""
    groups = [g for g in (train, validation) if g is not None]
    if getattr(args, "cache_latents", None) or getattr(args, "cache_latents_to_disk", None):
        problems = [p for g in groups for p in g.latent_caching_problems()]
        caching.refuse(problems, caching.LATENT_CACHING, caching.LATENT_CACHING_FIX)
    if getattr(args, "cache_text_encoder_outputs", None) or getattr(args, "cache_text_encoder_outputs_to_disk", None):
        problems = [p for g in groups for p in g.text_caching_problems()]
        caching.refuse(problems, caching.TEXT_CACHING, caching.TEXT_CACHING_FIX)
