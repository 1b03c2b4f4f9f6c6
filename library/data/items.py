"""Scanning subsets into image items: list files, probe sizes, read captions.

A damaged or unreadable image is skipped and recorded with its reason (the report shows them);
problems the user must fix (a caption file that is not UTF-8) are collected and raised together.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from library.data.buckets import Size
from library.data.captions import read_caption_file
from library.data.config import SubsetSpec
from library.data.images import ImageProbe, image_extensions, list_images, probe_image
from library.errors import DatasetError
from library.safetensors_io import write_bytes_atomic

logger = logging.getLogger(__name__)

METADATA_CACHE_NAME = "metadata_cache.json"  # sd-scripts' cache_info file name


@dataclass
class ImageItem:
    """One image of a subset. `caption` is the raw caption template (processed per sample)."""

    path: str
    size: Size
    caption: str
    subset_index: int
    caption_source: str  # "file", "class_tokens", "metadata", "none"
    bucket: Size | None = None
    resized: Size | None = None
    ar_error: float = 0.0
    mask_path: str | None = None   # conditioning_data_dir: the loss-mask image of this image


@dataclass(frozen=True)
class SkippedImage:
    path: str
    reason: str


@dataclass
class SubsetScan:
    items: list[ImageItem] = field(default_factory=list)
    skipped: list[SkippedImage] = field(default_factory=list)
    missing_captions: int = 0
    empty_captions: int = 0
    errors: list[str] = field(default_factory=list)


class ProbeCache:
    """Probes each image once per run, even when several datasets use the same folder."""

    def __init__(self, max_threads: int | None = None):
        self._done: dict[str, ImageProbe | str] = {}
        self.max_threads = max_threads or min(32, 4 * (os.cpu_count() or 2))

    def probe_many(self, paths: list[str]) -> dict[str, ImageProbe | str]:
        """{path: probe, or the reason it is unreadable}. Probes run in threads (I/O bound)."""
        todo = [p for p in dict.fromkeys(paths) if p not in self._done]
        if todo:
            def one(p: str) -> ImageProbe | str:
                try:
                    return probe_image(p)
                except DatasetError as e:
                    return str(e).split(": ", 1)[-1]
            if len(todo) > 8:
                with ThreadPoolExecutor(self.max_threads) as pool:
                    results = list(pool.map(one, todo))
            else:
                results = [one(p) for p in todo]
            self._done.update(zip(todo, results))
        return {p: self._done[p] for p in paths}


def _load_metadata_cache(image_dir: str) -> dict[str, dict]:
    path = os.path.join(image_dir, METADATA_CACHE_NAME)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError) as e:
        logger.warning("%s is unreadable (%s); it will be rebuilt", path, e)
        return {}


def _save_metadata_cache(image_dir: str, items: list[ImageItem]) -> None:
    data = {os.path.abspath(it.path): {"caption": it.caption, "resolution": list(it.size)} for it in items}
    path = os.path.join(image_dir, METADATA_CACHE_NAME)
    try:
        write_bytes_atomic(json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8"), path)
    except Exception as e:  # a read-only dataset folder must not stop training
        logger.warning("could not write %s (%s); continuing without it", path, e)


def scan_dreambooth_subset(spec: SubsetSpec, subset_index: int, probes: ProbeCache) -> SubsetScan:
    scan = SubsetScan()
    paths = list_images(spec.image_dir)
    cached = _load_metadata_cache(spec.image_dir) if spec.cache_info else {}
    need_probe = [p for p in paths if os.path.abspath(p) not in cached]
    probed = probes.probe_many(need_probe)
    for path in paths:
        meta = cached.get(os.path.abspath(path))
        if meta is not None and isinstance(meta.get("resolution"), list) and len(meta["resolution"]) == 2:
            size = (int(meta["resolution"][0]), int(meta["resolution"][1]))
            caption = meta.get("caption")
            caption = "" if caption is None else str(caption)
            scan.items.append(ImageItem(path, size, caption, subset_index, "metadata"))
            if caption == "":
                scan.missing_captions += 1
            continue
        probe = probed.get(path)
        if probe is None:  # listed in a broken cache entry: probe now
            probe = probes.probe_many([path])[path]
        if isinstance(probe, str):
            scan.skipped.append(SkippedImage(path, probe))
            continue
        try:
            found = read_caption_file(path, spec.caption_extension, spec.enable_wildcard)
        except DatasetError as e:
            scan.errors.append(str(e))
            continue
        if found.text is None:
            scan.missing_captions += 1
            caption, source = (spec.class_tokens, "class_tokens") if spec.class_tokens is not None else ("", "none")
        else:
            caption, source = found.text, "file"
            if caption == "":
                scan.empty_captions += 1
        scan.items.append(ImageItem(path, probe.size, caption, subset_index, source))
    if spec.cache_info and (len(cached) != len(scan.items) or need_probe):
        _save_metadata_cache(spec.image_dir, scan.items)
    return scan


def _read_metadata_entries(metadata_file: str) -> list[tuple[str, dict]]:
    """[(image key or path, record)] from sd-scripts' JSON {key: {...}} or JSONL {image_path: ...}."""
    try:
        with open(metadata_file, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"metadata_file {metadata_file} cannot be read as UTF-8 text ({e})") from e
    if metadata_file.lower().endswith(".jsonl"):
        entries = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{metadata_file} line {n}: invalid JSON ({e.msg})") from e
            if not isinstance(rec, dict) or "image_path" not in rec:
                raise DatasetError(f"{metadata_file} line {n}: each line needs an \"image_path\"")
            entries.append((str(rec["image_path"]), rec))
        return entries
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{metadata_file}: invalid JSON at line {e.lineno} ({e.msg})") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{metadata_file}: expected {{\"image key\": {{\"caption\": ...}}}}")
    return [(str(k), v if isinstance(v, dict) else {}) for k, v in data.items()]


def _find_image(key: str, image_dir: str | None, extensions: frozenset[str]) -> str | None:
    if os.path.isfile(key):
        return key
    if image_dir is None:
        return None
    direct = os.path.join(image_dir, key)
    if os.path.isfile(direct):
        return direct
    for ext in sorted(extensions):
        for candidate in (direct + ext, direct + ext.upper()):
            if os.path.isfile(candidate):
                return candidate
    return None


def _metadata_caption(rec: dict, spec: SubsetSpec) -> str:
    caption = rec.get("caption")
    tags = rec.get("tags")
    if caption is None:
        return "" if tags is None else str(tags)
    caption = str(caption)
    if tags:
        tags = str(tags)
        lines = caption.split("\n") if spec.enable_wildcard else [caption]
        caption = "\n".join(line + spec.caption_separator + tags for line in lines)
    return caption


def scan_finetuning_subset(spec: SubsetSpec, subset_index: int, probes: ProbeCache) -> SubsetScan:
    scan = SubsetScan()
    try:
        entries = _read_metadata_entries(spec.metadata_file)
    except DatasetError as e:
        scan.errors.append(str(e))
        return scan
    extensions = image_extensions()
    located: list[tuple[str, dict]] = []
    for key, rec in entries:
        path = _find_image(key, spec.image_dir, extensions)
        if path is None:
            scan.skipped.append(SkippedImage(key, f"listed in {os.path.basename(spec.metadata_file)} but no "
                                                  "image file found"))
        else:
            located.append((path, rec))
    probed = probes.probe_many([p for p, _ in located])
    for path, rec in located:
        probe = probed[path]
        if isinstance(probe, str):
            scan.skipped.append(SkippedImage(path, probe))
            continue
        caption = _metadata_caption(rec, spec)
        if caption == "":
            scan.missing_captions += 1
        scan.items.append(ImageItem(path, probe.size, caption, subset_index, "metadata"))
    return scan


def scan_subset(spec: SubsetSpec, subset_index: int, probes: ProbeCache) -> SubsetScan:
    if spec.is_dreambooth:
        scan = scan_dreambooth_subset(spec, subset_index, probes)
    else:
        scan = scan_finetuning_subset(spec, subset_index, probes)
    if spec.conditioning_data_dir is not None:
        _attach_mask_images(scan, spec)
    return scan


def _attach_mask_images(scan: SubsetScan, spec: SubsetSpec) -> None:
    """Each image's mask is the file with the same name (any image extension) in
    conditioning_data_dir; an image without one is an error (as in sd-scripts), listed by name."""
    by_stem = {os.path.splitext(os.path.basename(p))[0]: p for p in list_images(spec.conditioning_data_dir)}
    missing = []
    for item in scan.items:
        item.mask_path = by_stem.get(os.path.splitext(os.path.basename(item.path))[0])
        if item.mask_path is None:
            missing.append(os.path.basename(item.path))
    if missing:
        scan.errors.append(f"{spec.section}: {len(missing)} images have no mask image of the same name in "
                           f"conditioning_data_dir '{spec.conditioning_data_dir}', e.g. {', '.join(missing[:3])}")
