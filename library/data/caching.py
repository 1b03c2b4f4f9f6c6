"""Latent and text-encoder-output caches: the framework the model families plug into.

A family hands an encoder object (see the two Protocols) to `DatasetGroup.cache_latents` /
`cache_text_outputs`. Each entry is keyed by everything that changes its content, so a stale
entry is never used:
- latents: the encoder's `identity`, the image content (size + mtime, falling back to a sha256 of
  the bytes), bucket size, resized size, crop box, whether a flipped copy and an alpha mask are
  stored, the resize filter and our preprocessing version;
- text outputs: the encoder's `identity` and the processed caption text.

On disk (safetensors, next to each image):
- `<stem>_<W:04d>x<H:04d><suffix>.safetensors` (W x H = the original image size) holds one entry
  per bucket variant: tensors `latents:<name>`, `latents_flipped:<name>`, `alpha_mask:<name>`
  with <name> = `<bw>x<bh>_<params hash>`; metadata: format, identity, source stamp.
- `<stem><suffix>.safetensors` holds the text outputs of the image's caption (`<hash>:<key>`);
  `__empty_caption__<suffix>.safetensors` in the folder holds the empty caption used by caption
  dropout.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from tqdm import tqdm

from library.data import cache_files as cf
from library.data.buckets import Size, center_crop_offsets
from library.data.captions import CaptionOptions, fixed_caption
from library.data.dataset import ImageDataset
from library.data.images import (
    CropPlan, decode_image, flip_horizontal, resize_and_crop, single_threaded_cv2,
)
from library.errors import ConfigError, DatasetError
from library.safetensors_io import load_file, save_file_atomic

logger = logging.getLogger(__name__)

LATENT_FORMAT = "lora-suite-latents-1"
TEXT_FORMAT = "lora-suite-text-1"
# Bump when decoding/resizing changes what pixels an encoder sees, so old latents are re-made.
PIPELINE_VERSION = 1


@runtime_checkable
class LatentCacheEncoder(Protocol):
    """Implemented by each family. `encode` receives (B,3,H,W) float32 in [-1,1] on the CPU (or on
    the `device` given to cache_latents) and returns (B,C,H/8,W/8); it moves data to its device.
    `identity` must change whenever the encoded content would (weights file, scaling, dtype...).
    An optional `file_suffix` (e.g. "_flux") names the cache files."""

    identity: str

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class TextCacheEncoder(Protocol):
    """Implemented by each family: one dict of tensors per caption (same keys and shapes for all).
    `identity` covers the encoder files and every text setting (max length, masks...)."""

    identity: str

    def encode(self, captions: list[str]) -> list[dict[str, torch.Tensor]]: ...


@dataclass
class CacheStats:
    """What a caching pass did (also used by tests to count re-encodes)."""

    encoded: int = 0
    reused: int = 0
    corrupt_files: int = 0
    files_written: int = 0


# ==================================================================================== refusals

def latent_caching_problems(datasets: list[ImageDataset]) -> list[str]:
    """Subset settings that make cached latents wrong (each sample must look different)."""
    out = []
    for ds in datasets:
        for info in ds.subsets:
            s = info.spec
            if s.random_crop:
                out.append(f"{s.section}: random_crop = true needs a new crop each time; turn off latent "
                           "caching or random_crop")
            if s.color_aug:
                out.append(f"{s.section}: color_aug = true changes the pixels each time; turn off latent "
                           "caching or color_aug")
    return out


def text_caching_problems(datasets: list[ImageDataset], options: list[list[CaptionOptions]]) -> list[str]:
    """Caption settings that make cached text outputs wrong. Caption dropout is fine (the empty
    caption is cached too); so are prefix/suffix, keep_tokens_separator and secondary_separator."""
    out = []
    for ds, ds_opts in zip(datasets, options):
        for info, opts in zip(ds.subsets, ds_opts):
            s = info.spec
            if s.shuffle_caption:
                out.append(f"{s.section}: shuffle_caption = true")
            if s.token_warmup_step > 0:
                out.append(f"{s.section}: token_warmup_step = {s.token_warmup_step:g}")
            if s.caption_tag_dropout_rate > 0:
                out.append(f"{s.section}: caption_tag_dropout_rate = {s.caption_tag_dropout_rate:g}")
        varying = [it.path for it in ds.items
                   if not ds_opts[it.subset_index].splits_tags
                   and fixed_caption(it.caption, ds_opts[it.subset_index]) is None]
        if varying:
            examples = ", ".join(os.path.basename(p) for p in varying[:3])
            out.append(f"{ds.spec.section}: {len(varying)} captions have several wildcard choices or lines "
                       f"(e.g. {examples})")
    return out


LATENT_CACHING = "latent caching (--cache_latents / --cache_latents_to_disk)"
LATENT_CACHING_FIX = "Latents are made once per image, so per-sample pixel augmentation cannot apply."
TEXT_CACHING = "text-encoder output caching (--cache_text_encoder_outputs[_to_disk])"
TEXT_CACHING_FIX = ("Cached outputs need one fixed caption per image (caption dropout is fine). Turn these off, "
                    "or do not cache text-encoder outputs.")


def refuse(problems: list[str], what: str, fix: str) -> None:
    if problems:
        raise ConfigError(f"{what} cannot be used with these dataset settings:\n"
                          + "\n".join(f"  - {p}" for p in problems) + f"\n{fix}")


# ==================================================================================== latents

@dataclass(frozen=True)
class LatentJob:
    """One latent entry to have: an image at one bucket variant."""

    image_path: str
    original_size: Size
    bucket: Size
    resized: Size
    crop: tuple[int, int]
    interpolation: str | None
    flip: bool
    alpha: bool

    @property
    def name(self) -> str:
        h = cf.short_hash(PIPELINE_VERSION, self.bucket, self.resized, self.crop, self.interpolation,
                          self.flip, self.alpha, self.original_size)
        return f"{self.bucket[0]}x{self.bucket[1]}_{h}"

    def tensor_names(self) -> list[str]:
        names = [f"latents:{self.name}"]
        if self.flip:
            names.append(f"latents_flipped:{self.name}")
        if self.alpha:
            names.append(f"alpha_mask:{self.name}")
        return names


@dataclass(frozen=True)
class LatentRef:
    file: str | None      # disk mode: the cache file; memory mode: None
    job: LatentJob


class LatentStore:
    """Cached latents for the items of a group; `get` is called by the data-loader workers."""

    def __init__(self, identity: str, to_disk: bool):
        self.identity = identity
        self.to_disk = to_disk
        self.refs: dict[tuple[int, int], LatentRef] = {}
        self.memory: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    def get(self, dataset: int, item: int, flipped: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(latents (C,h,w) float32, alpha mask (H,W) float32 in [0,1] or None)."""
        ref = self.refs[(dataset, item)]
        job = ref.job
        if ref.file is None:
            entry = self.memory[(job.image_path, job.name)]
        else:
            try:
                raw = load_file(ref.file, keys=job.tensor_names())
            except Exception as e:
                raise DatasetError(f"latent cache {ref.file} became unreadable during training ({e}); "
                                   "delete it and restart to re-create it") from e
            entry = {k.split(":", 1)[0]: v for k, v in raw.items()}
        latents = entry["latents_flipped"] if flipped else entry["latents"]
        alpha = entry.get("alpha_mask")
        if alpha is not None:
            alpha = alpha.float() / 255.0
            if flipped:
                alpha = torch.flip(alpha, dims=[1])
        return latents.float(), alpha


def latent_jobs(datasets: list[ImageDataset]) -> dict[tuple[int, int], LatentJob]:
    jobs = {}
    for d, ds in enumerate(datasets):
        for i, item in enumerate(ds.items):
            s = ds.subset_of(i)
            jobs[(d, i)] = LatentJob(item.path, item.size, item.bucket, item.resized,
                                     center_crop_offsets(item.resized, item.bucket), s.resize_interpolation,
                                     s.flip_aug, s.alpha_mask)
    return jobs


@dataclass
class _Prepared:
    job: LatentJob
    image: np.ndarray                 # (3,H,W) uint8, converted to [-1,1] floats per batch by torch
    flipped: np.ndarray | None
    alpha: np.ndarray | None          # (H,W) uint8
    stamp: cf.SourceStamp


def _prepare_latent_input(job: LatentJob) -> _Prepared:
    try:
        with open(job.image_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DatasetError(f"image {job.image_path} cannot be read ({e.strerror})") from e
    stamp = cf.stamp_from_bytes(job.image_path, data)
    img = decode_image(job.image_path, want_alpha=job.alpha, data=data, draft_size=job.resized)
    img = resize_and_crop(img, CropPlan(job.resized, job.bucket, *job.crop), job.interpolation)
    flipped = _chw(flip_horizontal(img).rgb) if job.flip else None
    return _Prepared(job, _chw(img.rgb), flipped, img.alpha, stamp)


def _chw(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def _file_usable(state: cf.CacheFileState, fmt: str, identity: str) -> bool:
    meta = state.metadata or {}
    return state.status == cf.OK and meta.get("format") == fmt and meta.get("identity") == identity


def _run_encoder(encoder: LatentCacheEncoder, arrays: list[np.ndarray], device: Any) -> torch.Tensor:
    """uint8 (3,H,W) images -> encoder((B,3,H,W) float32 in [-1,1]) -> CPU float32. The uint8 ->
    float conversion happens after the move to `device` (4x less to transfer, fast on a GPU)."""
    images = torch.from_numpy(np.stack(arrays))
    if device is not None:
        images = images.to(device, non_blocking=True)
    images = images.float().div_(127.5).sub_(1.0)
    with torch.no_grad():
        out = encoder.encode(images)
    if not isinstance(out, torch.Tensor) or out.ndim < 2 or out.shape[0] != len(arrays):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"latent encoder returned {shape} for {len(arrays)} images; expected (B, C, h, w)")
    # copy=True: the rows are kept (memory mode) and must not alias a buffer the encoder reuses.
    return out.detach().to("cpu", torch.float32, copy=True)


def cache_latents(datasets: list[ImageDataset], encoder: LatentCacheEncoder, *, to_disk: bool, batch_size: int = 1,
                  skip_check: bool = False, device: Any = None, progress: bool = True,
                  decode_threads: int | None = None) -> tuple[LatentStore, CacheStats]:
    refuse(latent_caching_problems(datasets), LATENT_CACHING, LATENT_CACHING_FIX)
    identity = str(encoder.identity)
    suffix = cf.encoder_suffix(encoder, "latents")
    store = LatentStore(identity, to_disk)
    stats = CacheStats()
    jobs = latent_jobs(datasets)

    # Which entries already exist and are valid?
    file_states: dict[str, cf.CacheFileState] = {}
    file_ok: dict[str, bool] = {}
    missing: dict[tuple[str, str], LatentJob] = {}
    for key, job in jobs.items():
        path = cf.latent_cache_path(job.image_path, job.original_size, suffix)
        if path not in file_states:
            state = cf.inspect_cache_file(path, check_length=not skip_check)
            file_states[path] = state
            if state.status == cf.CORRUPT:
                stats.corrupt_files += 1
                logger.warning("latent cache %s is corrupt; it will be re-encoded", path)
            file_ok[path] = _file_usable(state, LATENT_FORMAT, identity) and (
                skip_check or cf.source_unchanged(job.image_path, state.metadata))
        valid = file_ok[path] and all(n in file_states[path].tensor_names for n in job.tensor_names())
        store.refs[key] = LatentRef(path if to_disk else None, job)
        if valid:
            if not to_disk and (job.image_path, job.name) not in store.memory:
                raw = load_file(path, keys=job.tensor_names())
                store.memory[(job.image_path, job.name)] = {k.split(":", 1)[0]: v.clone() for k, v in raw.items()}
            stats.reused += 1
        else:
            missing[(job.image_path, job.name)] = job

    todo = sorted(missing.values(), key=lambda j: (j.bucket, j.image_path))
    chunks: list[list[LatentJob]] = []
    for job in todo:
        if chunks and chunks[-1][0].bucket == job.bucket and len(chunks[-1]) < batch_size:
            chunks[-1].append(job)
        else:
            chunks.append([job])

    threads = decode_threads or min(8, os.cpu_count() or 2)
    bar = tqdm(total=len(todo), desc="caching latents", disable=not progress or not todo, unit="img")
    flat = [job for chunk in chunks for job in chunk]
    ahead = max(2 * threads, 2 * batch_size)  # decode this many images ahead of the encoder
    with single_threaded_cv2(), ThreadPoolExecutor(threads) as pool:
        futures = deque(pool.submit(_prepare_latent_input, j) for j in flat[:ahead])
        submitted = len(futures)
        for chunk in chunks:
            prepared = [futures.popleft().result() for _ in chunk]
            while submitted < len(flat) and len(futures) < ahead:
                futures.append(pool.submit(_prepare_latent_input, flat[submitted]))
                submitted += 1
            _encode_chunk(prepared, encoder, device, store, suffix, identity, to_disk, stats)
            bar.update(len(prepared))
    bar.close()
    return store, stats


def _encode_chunk(prepared: list[_Prepared], encoder: LatentCacheEncoder, device: Any, store: LatentStore,
                  suffix: str, identity: str, to_disk: bool, stats: CacheStats) -> None:
    latents = _run_encoder(encoder, [p.image for p in prepared], device)
    flip_rows = [n for n, p in enumerate(prepared) if p.flipped is not None]
    flipped = _run_encoder(encoder, [prepared[n].flipped for n in flip_rows], device) if flip_rows else None
    flipped_by_row = {n: flipped[m] for m, n in enumerate(flip_rows)} if flipped is not None else {}
    new_by_file: dict[str, tuple[cf.SourceStamp, dict[str, torch.Tensor]]] = {}
    for n, p in enumerate(prepared):
        entry = {"latents": latents[n]}  # rows of a fresh batch tensor: no copy needed
        if n in flipped_by_row:
            entry["latents_flipped"] = flipped_by_row[n]
        if p.alpha is not None:
            entry["alpha_mask"] = torch.from_numpy(p.alpha)
        if to_disk:
            path = cf.latent_cache_path(p.job.image_path, p.job.original_size, suffix)
            tensors = new_by_file.setdefault(path, (p.stamp, {}))[1]
            tensors.update({f"{k}:{p.job.name}": v for k, v in entry.items()})
        else:
            store.memory[(p.job.image_path, p.job.name)] = entry
    for path, (stamp, tensors) in new_by_file.items():
        _merge_write_latents(path, tensors, stamp, identity)
        stats.files_written += 1
    stats.encoded += len(prepared)


def _merge_write_latents(path: str, new: dict[str, torch.Tensor], stamp: cf.SourceStamp, identity: str) -> None:
    """Add entries to a latent cache file. Entries made from the same image content by the same
    encoder are kept (other buckets/variants); anything else in the file is stale and dropped."""
    state = cf.inspect_cache_file(path)
    tensors: dict[str, torch.Tensor] = {}
    if _file_usable(state, LATENT_FORMAT, identity) and (state.metadata or {}).get("source_sha256") == stamp.sha256:
        tensors = {k: v.clone() for k, v in load_file(path).items()}
    tensors.update(new)
    meta = {"format": LATENT_FORMAT, "identity": identity, **stamp.as_metadata()}
    save_file_atomic(tensors, path, metadata=meta)


# ==================================================================================== text outputs

@dataclass(frozen=True)
class TextRef:
    file: str | None   # disk mode: the cache file holding this caption; memory mode: None
    key: str           # hash of the caption text


class TextStore:
    """Cached text-encoder outputs; `get` is called by the data-loader workers."""

    def __init__(self, identity: str, to_disk: bool):
        self.identity = identity
        self.to_disk = to_disk
        self.refs: dict[tuple[int, int], dict[str, TextRef]] = {}
        self.memory: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, dataset: int, item: int, caption: str) -> dict[str, torch.Tensor]:
        key = caption_key(caption)
        ref = self.refs.get((dataset, item), {}).get(key)
        if ref is None:
            raise DatasetError(f"no cached text-encoder output for caption {caption!r}. The caption "
                               "settings changed after caching; run the caching step again.")
        if ref.file is None:
            return self.memory[key]
        prefix = key + ":"
        try:
            raw = load_file(ref.file)
        except Exception as e:
            raise DatasetError(f"text-encoder cache {ref.file} became unreadable during training ({e}); "
                               "delete it and restart to re-create it") from e
        return {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}


def caption_key(caption: str) -> str:
    return cf.short_hash("caption", caption)


@dataclass
class _TextFile:
    path: str
    wanted: dict[str, str] = field(default_factory=dict)   # key -> caption text


_ItemTextRefs = dict[tuple[int, int], dict[str, TextRef]]


def _text_files(datasets: list[ImageDataset], options: list[list[CaptionOptions]], suffix: str,
                to_disk: bool) -> tuple[_ItemTextRefs, dict[str, _TextFile], dict[str, str]]:
    """(refs per item, cache files with the captions each must hold, caption text per key)."""
    refs: dict[tuple[int, int], dict[str, TextRef]] = {}
    files: dict[str, _TextFile] = {}
    captions: dict[str, str] = {}
    for d, (ds, ds_opts) in enumerate(zip(datasets, options)):
        for i, item in enumerate(ds.items):
            opts = ds_opts[item.subset_index]
            fixed = fixed_caption(item.caption, opts)
            texts = {fixed: cf.text_cache_path(item.path, suffix)}
            if opts.may_drop and fixed != "":
                texts[""] = cf.empty_caption_cache_path(os.path.dirname(item.path) or ".", suffix)
            item_refs = refs.setdefault((d, i), {})
            for text, path in texts.items():
                key = caption_key(text)
                captions[key] = text
                item_refs[key] = TextRef(path if to_disk else None, key)
                files.setdefault(path, _TextFile(path)).wanted[key] = text
    return refs, files, captions


def _entry_from_file(raw: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    prefix = key + ":"
    return {k[len(prefix):]: v.clone() for k, v in raw.items() if k.startswith(prefix)}


def _check_text_outputs(outs: Any, n: int) -> list[dict[str, torch.Tensor]]:
    if not isinstance(outs, (list, tuple)) or len(outs) != n:
        raise TypeError(f"text encoder returned {type(outs).__name__} of length "
                        f"{len(outs) if hasattr(outs, '__len__') else '?'} for {n} captions; expected a list of dicts")
    result = []
    for d in outs:
        if not isinstance(d, dict) or not d or not all(isinstance(v, torch.Tensor) for v in d.values()):
            raise TypeError("text encoder must return one non-empty dict of tensors per caption")
        result.append({k: v.detach().to("cpu").contiguous().clone() for k, v in d.items()})
    return result


def cache_text_outputs(datasets: list[ImageDataset], options: list[list[CaptionOptions]], encoder: TextCacheEncoder,
                       *, to_disk: bool, batch_size: int = 1, skip_check: bool = False,
                       progress: bool = True) -> tuple[TextStore, CacheStats]:
    refuse(text_caching_problems(datasets, options), TEXT_CACHING, TEXT_CACHING_FIX)
    identity = str(encoder.identity)
    suffix = cf.encoder_suffix(encoder, "te")
    store = TextStore(identity, to_disk)
    stats = CacheStats()
    store.refs, files, captions = _text_files(datasets, options, suffix, to_disk)

    # Existing valid entries per file.
    valid: dict[str, set[str]] = {}
    for path, tf in files.items():
        state = cf.inspect_cache_file(path, check_length=not skip_check)
        if state.status == cf.CORRUPT:
            stats.corrupt_files += 1
            logger.warning("text-encoder cache %s is corrupt; it will be re-encoded", path)
        have = set()
        if _file_usable(state, TEXT_FORMAT, identity):
            for key in tf.wanted:
                if (state.metadata or {}).get(f"caption:{key}") == tf.wanted[key] and any(
                        n.startswith(key + ":") for n in state.tensor_names):
                    have.add(key)
        valid[path] = have

    if not to_disk:
        # Memory mode: reuse what is on disk, encode the rest once per distinct caption.
        for path, have in valid.items():
            if have - store.memory.keys():
                raw = load_file(path)
                for key in have - store.memory.keys():
                    store.memory[key] = _entry_from_file(raw, key)
        todo = [k for k in captions if k not in store.memory]
        stats.reused = len(captions) - len(todo)
        bar = tqdm(total=len(todo), desc="caching text outputs", disable=not progress or not todo)
        for start in range(0, len(todo), batch_size):
            keys = todo[start:start + batch_size]
            with torch.no_grad():
                outs = _check_text_outputs(encoder.encode([captions[k] for k in keys]), len(keys))
            store.memory.update(zip(keys, outs))
            stats.encoded += len(keys)
            bar.update(len(keys))
        bar.close()
        return store, stats

    # Disk mode: stream file by file; keep an encoded caption only while files still need it.
    remaining: dict[str, int] = {}
    for path, tf in files.items():
        for key in tf.wanted:
            if key not in valid[path]:
                remaining[key] = remaining.get(key, 0) + 1
    stats.reused = sum(len(v) for v in valid.values())
    encoded: dict[str, dict[str, torch.Tensor]] = {}
    order = [files[p] for p in files if set(files[p].wanted) - valid[p]]
    bar = tqdm(total=len(remaining), desc="caching text outputs", disable=not progress or not remaining)
    start = 0
    while start < len(order):
        # Take files until batch_size new captions are gathered.
        batch_keys: list[str] = []
        end = start
        while end < len(order):
            new = [k for k in order[end].wanted if k not in valid[order[end].path] and k not in encoded
                   and k not in batch_keys]
            if batch_keys and len(batch_keys) + len(new) > batch_size:
                break
            batch_keys.extend(new)
            end += 1
        if batch_keys:
            with torch.no_grad():
                outs = _check_text_outputs(encoder.encode([captions[k] for k in batch_keys]), len(batch_keys))
            encoded.update(zip(batch_keys, outs))
            stats.encoded += len(batch_keys)
            bar.update(len(batch_keys))
        for tf in order[start:end]:
            _write_text_file(tf, valid[tf.path], encoded, identity)
            stats.files_written += 1
            for key in tf.wanted:
                if key in remaining and key not in valid[tf.path]:
                    remaining[key] -= 1
                    if remaining[key] == 0:
                        encoded.pop(key, None)
        start = end
    bar.close()
    return store, stats


def _write_text_file(tf: _TextFile, valid_keys: set[str], encoded: dict[str, dict[str, torch.Tensor]],
                     identity: str) -> None:
    """Rewrite a text cache file with exactly the captions wanted now (stale captions dropped)."""
    tensors: dict[str, torch.Tensor] = {}
    if valid_keys:
        raw = load_file(tf.path)
        for key in valid_keys:
            tensors.update({f"{key}:{k}": v for k, v in _entry_from_file(raw, key).items()})
    for key in tf.wanted:
        if key not in valid_keys:
            tensors.update({f"{key}:{k}": v for k, v in encoded[key].items()})
    meta = {"format": TEXT_FORMAT, "identity": identity}
    meta.update({f"caption:{k}": text for k, text in tf.wanted.items()})
    save_file_atomic(tensors, tf.path, metadata=meta)
