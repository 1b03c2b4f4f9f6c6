"""Human-readable dataset report (`group_report`), `--dataset_report` and `--debug_dataset`.

The stand-alone command is library/data/report.py.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from typing import TYPE_CHECKING

from library.data.captions import process_caption
from library.data.dataset import derive_rng

if TYPE_CHECKING:
    from library.data.dataset import ImageDataset
    from library.data.group import DatasetGroup

_MAX_LISTED_SKIPS = 20


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


def _dataset_lines(ds: ImageDataset, title: str) -> list[str]:
    s = ds.spec
    w, h = s.resolution
    lines = [f"{title} ({s.section}): resolution {w}x{h}, batch size {s.batch_size}, "
             f"network_multiplier {s.network_multiplier:g}"]
    if s.enable_bucket:
        lines.append(f"  bucketing on: {s.min_bucket_reso}..{s.max_bucket_reso} step {s.bucket_reso_steps}, "
                     f"no upscale {_onoff(s.bucket_no_upscale)}")
    else:
        lines.append("  bucketing off: every image is resized to cover the resolution and centre-cropped")
    for j, info in enumerate(ds.subsets):
        sp = info.spec
        src = sp.metadata_file if sp.metadata_file else sp.image_dir
        kind = "reg" if sp.is_reg else "train"
        extras = []
        if info.missing_captions:
            extras.append(f"{info.missing_captions} without caption"
                          + (f" (class_tokens '{sp.class_tokens}' used)" if sp.class_tokens else ""))
        if info.empty_captions:
            extras.append(f"{info.empty_captions} empty captions")
        if info.skipped:
            extras.append(f"{len(info.skipped)} skipped")
        tail = ("; " + ", ".join(extras)) if extras else ""
        lines.append(f"  subset {j} [{kind}] {src}: {info.img_count} images x {info.num_repeats} repeats"
                     f" = {info.img_count * info.num_repeats}{tail}")
    reg_used = sum(r for it, r in zip(ds.items, ds.repeats) if ds.subsets[it.subset_index].spec.is_reg)
    if reg_used:
        lines.append(f"  regularisation samples per epoch after balancing: {reg_used}")
    lines.append("  buckets (width x height: samples per epoch, batches):")
    for (bw, bh), slots in ds.bucket_slots.items():
        n = len(slots)
        lines.append(f"    {bw}x{bh}: {n} samples, {-(-n // s.batch_size)} batches")
    if s.enable_bucket and ds.items:
        lines.append(f"  mean aspect-ratio error: {ds.mean_ar_error():.4f}")
    lines.append(f"  batches per epoch: {ds.num_batches}")
    return lines


def group_report(group: DatasetGroup) -> str:
    label = "validation" if group.settings.is_validation else "dataset"
    lines = []
    if not group.settings.is_validation:
        lines.append(f"Dataset source: {group.settings.source}")
    for ds in group.datasets:
        lines.extend(_dataset_lines(ds, f"[{label} {ds.index}]"))
    if group.skipped:
        reasons = Counter(s.reason.split(" (")[0] for s in group.skipped)
        lines.append(f"Images skipped: {len(group.skipped)} ("
                     + "; ".join(f"{n} x {r}" for r, n in reasons.most_common()) + ")")
        for s in group.skipped[:_MAX_LISTED_SKIPS]:
            lines.append(f"  {s.path}: {s.reason}")
        if len(group.skipped) > _MAX_LISTED_SKIPS:
            lines.append(f"  ... and {len(group.skipped) - _MAX_LISTED_SKIPS} more")
    for note in group.notes:
        lines.append(f"Note: {note}")
    if group.settings.is_validation:
        lines.append(f"Validation totals: {group.num_train_images} images, {group.num_batches_per_epoch} batches")
    else:
        lines.append(f"Totals: {group.num_train_images} training images (x repeats), {group.num_reg_images} "
                     f"regularisation images, {group.num_batches_per_epoch} batches per epoch")
    if group.validation is not None:
        lines.append(group_report(group.validation))
    return "\n".join(lines)


def debug_dataset_text(group: DatasetGroup, *, seed: int, epoch: int = 1, max_batches: int = 20) -> str:
    """What --debug_dataset prints: the first batches of an epoch with their processed captions."""
    loader = group.loader(seed=seed, num_workers=0)
    lines = [f"First {max_batches} batches of epoch {epoch} (seed {seed}):"]
    for ref in loader.refs(epoch)[:max_batches]:
        ds = group.datasets[ref.dataset]
        lines.append(f"batch {ref.index}: dataset {ds.index}, bucket {ref.bucket[0]}x{ref.bucket[1]}")
        options = group.caption_options()[ref.dataset]
        for slot in ref.slots:
            item = ds.items[slot.item]
            rng = derive_rng("caption", ref.seed, ref.epoch, ds.index, slot.item, slot.repeat)
            caption = process_caption(item.caption, options[item.subset_index], rng, epoch=epoch, step=ref.step)
            lines.append(f"  {os.path.basename(item.path)} {item.size[0]}x{item.size[1]} -> "
                         f"{item.resized[0]}x{item.resized[1]}: {caption!r}")
    return "\n".join(lines)


def print_requested_reports(args: argparse.Namespace, train: DatasetGroup) -> bool:
    """Handle --dataset_report / --debug_dataset. Returns True when the caller should exit now."""
    done = False
    if getattr(args, "dataset_report", False):
        print(group_report(train))
        done = True
    if getattr(args, "debug_dataset", False):
        seed = getattr(args, "seed", None)
        print(debug_dataset_text(train, seed=seed if seed is not None else 0))
        done = True
    return done
