"""Load, validate and resolve a dataset config into DatasetSpec/SubsetSpec objects.

Validation collects every problem (unknown or misplaced keys, wrong types, out-of-range values,
missing folders) and raises one DatasetError listing them all, before any image is opened.
Resolution applies the precedence subset -> dataset -> general -> command line -> default.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.data import config_schema as schema
from library.data.config_schema import DATASET, GENERAL, SUBSET
from library.errors import DatasetError

try:  # Python >= 3.11
    import tomllib as _toml_reader

    def _parse_toml(text: str) -> dict:
        return _toml_reader.loads(text)
except ImportError:  # pragma: no cover - older Pythons
    import toml as _toml_reader

    def _parse_toml(text: str) -> dict:
        return _toml_reader.loads(text)

logger = logging.getLogger(__name__)


@dataclass
class SubsetSpec:
    """One resolved [[datasets.subsets]] entry (every value final, defaults applied)."""

    section: str
    image_dir: str | None
    metadata_file: str | None
    is_reg: bool
    alpha_mask: bool
    class_tokens: str | None
    caption_extension: str
    cache_info: bool
    num_repeats: int
    shuffle_caption: bool
    caption_separator: str
    keep_tokens: int
    keep_tokens_separator: str
    secondary_separator: str | None
    enable_wildcard: bool
    color_aug: bool
    flip_aug: bool
    random_crop: bool
    caption_prefix: str | None
    caption_suffix: str | None
    token_warmup_min: int
    token_warmup_step: float
    custom_attributes: dict | None
    resize_interpolation: str | None
    caption_dropout_rate: float
    caption_dropout_every_n_epochs: int
    caption_tag_dropout_rate: float
    validation_split: float
    validation_seed: int | None
    conditioning_data_dir: str | None = None

    @property
    def is_dreambooth(self) -> bool:
        return self.metadata_file is None

    @property
    def name(self) -> str:
        """Short label for reports: the folder or metadata file name."""
        src = self.metadata_file if self.metadata_file else self.image_dir
        return os.path.basename(os.path.normpath(src)) if src else self.section


@dataclass
class DatasetSpec:
    """One resolved [[datasets]] entry."""

    section: str
    resolution: tuple[int, int]  # (width, height)
    batch_size: int
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool
    network_multiplier: float
    resize_interpolation: str | None
    validation_seed: int | None
    subsets: list[SubsetSpec] = field(default_factory=list)

    @property
    def is_dreambooth(self) -> bool:
        return all(s.is_dreambooth for s in self.subsets)


@dataclass
class ResolvedConfig:
    datasets: list[DatasetSpec]
    warnings: list[str]
    source: str  # file name, or "--train_data_dir" for the folder layout


class _Problems:
    """Collects problems so the user sees all of them at once."""

    def __init__(self, source: str):
        self.source = source
        self.items: list[str] = []

    def add(self, where: str, text: str) -> None:
        self.items.append(f"{where}: {text}" if where else text)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        n = len(self.items)
        head = f"{self.source}: {n} problem{'s' if n > 1 else ''} in the dataset config:"
        raise DatasetError(head + "\n" + "\n".join(f"  - {p}" for p in self.items))


# --------------------------------------------------------------------------------------- loading

def load_config_file(path: str | os.PathLike) -> dict:
    """Parse a dataset config (.toml, or .json as sd-scripts also accepts)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset config {path} not found. Check the --dataset_config path.")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e}). Save the file as UTF-8.") from e
    except OSError as e:
        raise DatasetError(f"{path}: cannot be read ({e.strerror}).") from e
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}.") from e
    try:
        return _parse_toml(text)
    except Exception as e:  # tomllib.TOMLDecodeError / toml.TomlDecodeError
        raise DatasetError(
            f"{path}: invalid TOML: {e}. Strings need quotes; Windows paths need single quotes "
            "('C:\\images') or forward slashes."
        ) from e


# ------------------------------------------------------------------------------------ validation

def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


_KIND_TEXT = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "number": "a number",
    "str": "a quoted string",
    "resolution": "an integer or [width, height]",
    "float_pair": "[low, high] numbers",
    "table": "a table ({ key = value, ... })",
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def convert_value(kind: str, value: Any) -> tuple[Any, bool]:
    """(converted value, ok). Converts int -> float for float keys and int -> (n, n) for resolution."""
    if kind == "bool":
        return value, isinstance(value, bool)
    if kind == "int":
        return value, _is_int(value)
    if kind == "float":
        return (float(value), True) if _is_number(value) else (value, False)
    if kind == "number":
        return value, _is_number(value)
    if kind == "str":
        return value, isinstance(value, str)
    if kind == "resolution":
        if _is_int(value):
            return (value, value), True
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value):
            return (int(value[0]), int(value[1])), True
        return value, False
    if kind == "float_pair":
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value):
            return (float(value[0]), float(value[1])), True
        return value, False
    if kind == "table":
        return value, isinstance(value, dict)
    raise AssertionError(kind)


def _type_hint(name: str, kind: str, value: Any) -> str:
    """A fix suggestion for the common mistake of quoting a number or boolean."""
    if isinstance(value, str):
        if kind in ("int", "float", "number") and _looks_numeric(value):
            return f" (write {name} = {value} without quotes)"
        if kind == "bool" and value.lower() in ("true", "false"):
            return f" (write {name} = {value.lower()} without quotes)"
        if kind == "resolution" and value.replace(",", "").replace(" ", "").isdigit():
            parts = [p.strip() for p in value.split(",")]
            return f" (write {name} = [{', '.join(parts)}])" if len(parts) == 2 else f" (write {name} = {parts[0]})"
    return ""


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _suggest(key: str, level: str) -> str:
    here = schema.keys_for_level(level) + [a for a, t in schema.ALIASES.items() if level in schema.KEYS[t].levels]
    everywhere = list(schema.KEYS) + list(schema.ALIASES)
    for pool in (here, everywhere):
        match = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
        if match:
            m = match[0]
            canonical = schema.ALIASES.get(m, m)
            if level in schema.KEYS[canonical].levels:
                return f" (did you mean {m}?)"
            return f" (did you mean {m}? it belongs in {schema.where_it_belongs(canonical)})"
    return ""


def _check_section(section: dict, level: str, where: str, problems: _Problems) -> dict[str, Any]:
    """Validate one section's keys; return {canonical key: converted value} for the good ones."""
    out: dict[str, Any] = {}
    seen_from: dict[str, str] = {}
    for key, value in section.items():
        if level == DATASET and key == "subsets":
            continue
        canonical = schema.ALIASES.get(key, key)
        if canonical in schema.KEYS:
            spec = schema.KEYS[canonical]
            if level not in spec.levels:
                problems.add(where, f"'{key}' is not allowed in {schema.SECTION_TITLES[level]}; "
                                    f"it belongs in {schema.where_it_belongs(canonical)}")
                continue
            if canonical in seen_from:
                problems.add(where, f"'{key}' and '{seen_from[canonical]}' are the same setting; keep one")
                continue
            seen_from[canonical] = key
            converted, ok = convert_value(spec.kind, value)
            if not ok:
                problems.add(where, f"'{key}' must be {_KIND_TEXT[spec.kind]}, got {_describe(value)}"
                                    + _type_hint(key, spec.kind, value))
                continue
            if spec.check is not None:
                err = spec.check(converted)
                if err:
                    problems.add(where, f"'{key}' = {value!r} {err}")
                    continue
            if canonical in schema.UNSUPPORTED:
                problems.add(where, f"'{key}': {schema.UNSUPPORTED[canonical]}")
                continue
            out[canonical] = converted
        elif key in schema.CLI_ONLY:
            problems.add(where, f"'{key}' is a command-line option, not a dataset-config key; "
                                f"pass {schema.CLI_ONLY[key]} instead")
        elif key in schema.FOREIGN_KEYS:
            problems.add(where, f"'{key}' {schema.FOREIGN_KEYS[key]}")
        elif level == GENERAL and key in ("datasets", "subsets"):
            table = "datasets" if key == "datasets" else "datasets.subsets"
            problems.add(where, f"'{key}' cannot be inside [general]; write [[{table}]]")
        else:
            problems.add(where, f"unknown key '{key}'{_suggest(key, level)}")
    return out


@dataclass
class _CheckedConfig:
    general: dict[str, Any]
    datasets: list[tuple[dict[str, Any], list[dict[str, Any]]]]


def validate_structure(raw: Any, problems: _Problems) -> _CheckedConfig:
    if not isinstance(raw, dict):
        problems.add("", "the file must contain [general] and [[datasets]] sections")
        return _CheckedConfig({}, [])
    general: dict[str, Any] = {}
    datasets: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for key, value in raw.items():
        if key == "general":
            if not isinstance(value, dict):
                problems.add("general", "must be a table: write [general] on its own line")
            else:
                general = _check_section(value, GENERAL, "general", problems)
        elif key == "datasets":
            if not isinstance(value, list):
                problems.add("datasets", "must be an array of tables: write [[datasets]] (two brackets)")
                continue
            for i, ds in enumerate(value):
                where = f"datasets[{i}]"
                if not isinstance(ds, dict):
                    problems.add(where, "must be a table")
                    continue
                checked = _check_section(ds, DATASET, where, problems)
                subsets_raw = ds.get("subsets")
                subsets: list[dict[str, Any]] = []
                if subsets_raw is None:
                    problems.add(where, "has no [[datasets.subsets]]; add at least one with image_dir = \"...\"")
                elif not isinstance(subsets_raw, list):
                    problems.add(where, "'subsets' must be an array of tables: write [[datasets.subsets]]")
                else:
                    if not subsets_raw:
                        problems.add(where, "has no [[datasets.subsets]]; add at least one with image_dir = \"...\"")
                    for j, ss in enumerate(subsets_raw):
                        swhere = f"{where}.subsets[{j}]"
                        if not isinstance(ss, dict):
                            problems.add(swhere, "must be a table")
                            continue
                        subsets.append(_check_section(ss, SUBSET, swhere, problems) | {"__where__": swhere})
                datasets.append((checked | {"__where__": where}, subsets))
        elif key == "subsets":
            problems.add("", "'subsets' must be inside a dataset: write [[datasets.subsets]] after [[datasets]]")
        else:
            canonical = schema.ALIASES.get(key, key)
            if canonical in schema.KEYS:
                problems.add("", f"'{key}' is outside any section; it belongs in {schema.where_it_belongs(canonical)}")
            else:
                match = difflib.get_close_matches(key, ["general", "datasets"], n=1, cutoff=0.6)
                hint = f" (did you mean [{match[0]}]?)" if match else " (only [general] and [[datasets]] are allowed)"
                problems.add("", f"unknown section '{key}'{hint}")
    if isinstance(raw, dict) and "datasets" in raw and isinstance(raw["datasets"], list) and not raw["datasets"]:
        problems.add("", "no [[datasets]] defined")
    elif isinstance(raw, dict) and "datasets" not in raw:
        problems.add("", "no [[datasets]] section; add [[datasets]] with at least one [[datasets.subsets]]")
    return _CheckedConfig(general, datasets)


# ------------------------------------------------------------------------------------ resolution

def validate_cli_values(cli: dict[str, Any], problems: _Problems) -> dict[str, Any]:
    """Range-check command-line values with the same rules as the config; return the good ones."""
    good: dict[str, Any] = {}
    for spec in schema.KEYS.values():
        if spec.cli is None or cli.get(spec.cli) is None:
            continue
        value = cli[spec.cli]
        converted, ok = convert_value(spec.kind, value)
        if not ok:
            problems.add("command line", f"--{spec.cli} must be {_KIND_TEXT[spec.kind]}, got {_describe(value)}")
            continue
        if spec.check is not None:
            err = spec.check(converted)
            if err:
                problems.add("command line", f"--{spec.cli} {value!r} {err}")
                continue
        if spec.name in schema.UNSUPPORTED:
            problems.add("command line", f"--{spec.cli}: {schema.UNSUPPORTED[spec.name]}")
            continue
        good[spec.name] = converted
    return good


def _lookup(name: str, chain: list[dict[str, Any]], cli: dict[str, Any], defaults: dict[str, Any]) -> Any:
    for level in chain:
        if level.get(name) is not None:
            return level[name]
    if cli.get(name) is not None:
        return cli[name]
    if name in defaults:
        return defaults[name]
    return schema.KEYS[name].default


def _round_bucket_limits(lo: int, hi: int, step: int, where: str, warnings: list[str]) -> tuple[int, int]:
    """sd-scripts rounds min down and max up to a multiple of bucket_reso_steps, with a warning."""
    if lo % step:
        new = lo - lo % step
        warnings.append(f"{where}: min_bucket_reso {lo} rounded down to {new} (a multiple of bucket_reso_steps {step})")
        lo = new
    if hi % step:
        new = hi + step - hi % step
        warnings.append(f"{where}: max_bucket_reso {hi} rounded up to {new} (a multiple of bucket_reso_steps {step})")
        hi = new
    return lo, hi


def resolve_config(raw: Any, source: str, *, cli: dict[str, Any], reso_step_multiple: int,
                   default_resolution: int, check_paths: bool = True) -> ResolvedConfig:
    """Validate `raw` (a parsed dataset config) and apply precedence. Raises DatasetError listing
    every problem found."""
    problems = _Problems(source)
    checked = validate_structure(raw, problems)
    cli_good = validate_cli_values(cli, problems)
    defaults = {"resolution": (default_resolution, default_resolution)}
    warnings: list[str] = []
    datasets: list[DatasetSpec] = []

    for ds_raw, subsets_raw in checked.datasets:
        where = ds_raw["__where__"]
        chain = [ds_raw, checked.general]

        def get(name: str, _chain=chain) -> Any:
            return _lookup(name, _chain, cli_good, defaults)

        resolution = get("resolution")
        step = get("bucket_reso_steps")
        enable_bucket = get("enable_bucket")
        lo, hi = get("min_bucket_reso"), get("max_bucket_reso")
        if step % reso_step_multiple:
            suggestion = max(reso_step_multiple, step - step % reso_step_multiple)
            problems.add(where, f"bucket_reso_steps = {step} must be a multiple of {reso_step_multiple} "
                                f"for this model family (try {suggestion})")
        elif any(side % step for side in resolution):
            w, h = resolution
            fix = tuple(max(step, s - s % step) for s in resolution)
            problems.add(where, f"resolution {w}x{h} is not a multiple of bucket_reso_steps = {step}; "
                                f"use [{fix[0]}, {fix[1]}]")
        elif enable_bucket:
            lo, hi = _round_bucket_limits(lo, hi, step, where, warnings)
            if lo > hi:
                problems.add(where, f"min_bucket_reso {lo} is larger than max_bucket_reso {hi}")
            elif min(resolution) < lo:
                problems.add(where, f"min_bucket_reso {lo} is larger than the resolution's short side "
                                    f"{min(resolution)}; lower min_bucket_reso or raise resolution")
            elif max(resolution) > hi:
                problems.add(where, f"max_bucket_reso {hi} is smaller than the resolution's long side "
                                    f"{max(resolution)}; raise max_bucket_reso to at least {max(resolution)}")
        dataset = DatasetSpec(
            section=where,
            resolution=tuple(resolution),
            batch_size=get("batch_size"),
            enable_bucket=enable_bucket,
            min_bucket_reso=lo,
            max_bucket_reso=hi,
            bucket_reso_steps=step,
            bucket_no_upscale=get("bucket_no_upscale"),
            network_multiplier=get("network_multiplier"),
            resize_interpolation=get("resize_interpolation"),
            validation_seed=get("validation_seed"),
        )

        styles = {("finetuning" if "metadata_file" in s else "dreambooth") for s in subsets_raw}
        if len(styles) > 1:
            problems.add(where, "mixes DreamBooth subsets (image_dir only) and fine-tuning subsets "
                                "(metadata_file); put them in separate [[datasets]]")
        for ss_raw in subsets_raw:
            dataset.subsets.append(_resolve_subset(ss_raw, [ss_raw, ds_raw, checked.general], cli_good,
                                                   defaults, problems, check_paths))
        datasets.append(dataset)

    problems.raise_if_any()
    return ResolvedConfig(datasets=datasets, warnings=warnings, source=source)


def _resolve_subset(ss_raw: dict, chain: list[dict], cli: dict, defaults: dict, problems: _Problems,
                    check_paths: bool) -> SubsetSpec:
    where = ss_raw["__where__"]

    def get(name: str) -> Any:
        return _lookup(name, chain, cli, defaults)

    metadata_file = ss_raw.get("metadata_file")
    image_dir = ss_raw.get("image_dir")
    if metadata_file is None:
        if image_dir is None:
            problems.add(where, "needs image_dir = \"path/to/images\" (or metadata_file for a fine-tuning dataset)")
    else:
        for key in ("is_reg", "class_tokens", "caption_extension", "cache_info"):
            if key in ss_raw:
                problems.add(where, f"'{key}' only applies to DreamBooth-style subsets (image_dir without "
                                    "metadata_file); remove it")
    if check_paths:
        if image_dir is not None and not os.path.isdir(image_dir):
            problems.add(where, f"image_dir '{image_dir}' is not a folder (relative paths start from the "
                                f"current directory {os.getcwd()})")
        cond_dir = ss_raw.get("conditioning_data_dir")
        if cond_dir is not None and not os.path.isdir(cond_dir):
            problems.add(where, f"conditioning_data_dir '{cond_dir}' is not a folder (relative paths start from "
                                f"the current directory {os.getcwd()})")
        if metadata_file is not None and not os.path.isfile(metadata_file):
            problems.add(where, f"metadata_file '{metadata_file}' not found (relative paths start from the "
                                f"current directory {os.getcwd()})")

    token_warmup_step = get("token_warmup_step")
    return SubsetSpec(
        section=where,
        image_dir=image_dir,
        metadata_file=metadata_file,
        is_reg=ss_raw.get("is_reg", False) if metadata_file is None else False,
        alpha_mask=get("alpha_mask"),
        conditioning_data_dir=ss_raw.get("conditioning_data_dir"),
        class_tokens=get("class_tokens"),
        caption_extension=get("caption_extension"),
        cache_info=get("cache_info"),
        num_repeats=get("num_repeats"),
        shuffle_caption=get("shuffle_caption"),
        caption_separator=get("caption_separator"),
        keep_tokens=get("keep_tokens"),
        keep_tokens_separator=get("keep_tokens_separator"),
        secondary_separator=get("secondary_separator"),
        enable_wildcard=get("enable_wildcard"),
        color_aug=get("color_aug"),
        flip_aug=get("flip_aug"),
        random_crop=get("random_crop"),
        caption_prefix=get("caption_prefix"),
        caption_suffix=get("caption_suffix"),
        token_warmup_min=get("token_warmup_min"),
        token_warmup_step=float(token_warmup_step),
        custom_attributes=get("custom_attributes"),
        resize_interpolation=get("resize_interpolation"),
        caption_dropout_rate=get("caption_dropout_rate"),
        caption_dropout_every_n_epochs=get("caption_dropout_every_n_epochs"),
        caption_tag_dropout_rate=get("caption_tag_dropout_rate"),
        validation_split=get("validation_split"),
        validation_seed=get("validation_seed"),
    )
