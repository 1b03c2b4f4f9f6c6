"""The dataset part of the LoRA file's `ss_*` metadata (FORMATS 4.7). Every value is a string."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from library.data.captions import count_tags

if TYPE_CHECKING:
    from library.data.dataset import ImageDataset
    from library.data.group import DatasetGroup


def _basename(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def tag_frequency(ds: ImageDataset) -> dict[str, dict[str, int]]:
    """{folder or metadata-file name: {tag: count}} over the raw captions (one count per image)."""
    out: dict[str, dict[str, int]] = {}
    for j, info in enumerate(ds.subsets):
        s = info.spec
        name = _basename(s.metadata_file if s.metadata_file else s.image_dir)
        captions = [it.caption for it in ds.items if it.subset_index == j]
        freq = out.setdefault(name, {})
        for tag, n in count_tags(captions).items():
            freq[tag] = freq.get(tag, 0) + n
    return out


def bucket_info(ds: ImageDataset) -> dict | None:
    """sd-scripts' bucket_info: bucket index in the sorted bucket list -> resolution and count
    (images x repeats), plus the mean aspect-ratio error. None when bucketing is off."""
    if not ds.spec.enable_bucket:
        return None
    buckets = {}
    for i, reso in enumerate(ds.bucket_list()):
        count = len(ds.bucket_slots.get(reso, []))
        if count > 0:
            buckets[i] = {"resolution": list(reso), "count": count}
    return {"buckets": buckets, "mean_img_ar_error": ds.mean_ar_error()}


def _dataset_entry(ds: ImageDataset) -> dict[str, Any]:
    spec = ds.spec
    entry: dict[str, Any] = {
        "is_dreambooth": spec.is_dreambooth,
        "batch_size_per_device": spec.batch_size,
        "num_train_images": ds.num_train_images,
        "num_reg_images": ds.num_reg_images,
        "resolution": list(spec.resolution),
        "enable_bucket": bool(spec.enable_bucket),
        "min_bucket_reso": spec.min_bucket_reso if spec.enable_bucket else None,
        "max_bucket_reso": spec.max_bucket_reso if spec.enable_bucket else None,
        "tag_frequency": tag_frequency(ds),
        "bucket_info": bucket_info(ds),
        "resize_interpolation": spec.resize_interpolation,
    }
    subsets = []
    for info in ds.subsets:
        s = info.spec
        sub: dict[str, Any] = {
            "img_count": info.img_count,
            "num_repeats": info.num_repeats,
            "color_aug": bool(s.color_aug),
            "flip_aug": bool(s.flip_aug),
            "random_crop": bool(s.random_crop),
            "shuffle_caption": bool(s.shuffle_caption),
            "keep_tokens": s.keep_tokens,
            "keep_tokens_separator": s.keep_tokens_separator,
            "secondary_separator": s.secondary_separator,
            "enable_wildcard": bool(s.enable_wildcard),
            "caption_prefix": s.caption_prefix,
            "caption_suffix": s.caption_suffix,
            "resize_interpolation": s.resize_interpolation,
        }
        if s.image_dir:
            sub["image_dir"] = _basename(s.image_dir)
        if s.is_dreambooth:
            sub["class_tokens"] = s.class_tokens
            sub["is_reg"] = s.is_reg
        else:
            sub["metadata_file"] = _basename(s.metadata_file)
        subsets.append(sub)
    entry["subsets"] = subsets
    return entry


def _dataset_dirs(group: DatasetGroup, *, reg: bool) -> dict[str, dict[str, int]]:
    """{dir name: {n_repeats, img_count}}; a name used twice gets " (2)", " (3)"..."""
    out: dict[str, dict[str, int]] = {}
    for ds in group.datasets:
        for info in ds.subsets:
            s = info.spec
            if s.is_reg != reg:
                continue
            name = _basename(s.metadata_file if s.metadata_file else s.image_dir)
            unique, n = name, 2
            while unique in out:
                unique, n = f"{name} ({n})", n + 1
            out[unique] = {"n_repeats": info.num_repeats, "img_count": info.img_count}
    return out


def _arg(cli: dict[str, Any], name: str, default: Any) -> Any:
    value = cli.get(name)
    return default if value is None else value


def group_metadata(group: DatasetGroup) -> dict[str, str]:
    cli = group.settings.cli
    meta: dict[str, Any] = {
        "ss_num_train_images": group.num_train_images,
        "ss_num_reg_images": group.num_reg_images,
        "ss_num_batches_per_epoch": group.num_batches_per_epoch,
        "ss_num_validation_images": group.validation.num_train_images if group.validation is not None else 0,
        "ss_cache_latents": bool(group.uses_cached_latents),
        "ss_caption_dropout_rate": _arg(cli, "caption_dropout_rate", 0.0),
        "ss_caption_dropout_every_n_epochs": _arg(cli, "caption_dropout_every_n_epochs", 0),
        "ss_caption_tag_dropout_rate": _arg(cli, "caption_tag_dropout_rate", 0.0),
        "ss_face_crop_aug_range": cli.get("face_crop_aug_range"),
        "ss_prior_loss_weight": group.prior_loss_weight,
        "ss_max_token_length": group.max_token_length,
        "ss_validation_seed": cli.get("validation_seed"),
        "ss_validation_split": _arg(cli, "validation_split", 0.0),
        "ss_resize_interpolation": cli.get("resize_interpolation"),
    }
    if group.settings.used_config_file:
        datasets, tags, dirs = [], {}, {}
        for ds in group.datasets:
            datasets.append(_dataset_entry(ds))
            for name, freq in tag_frequency(ds).items():
                tags.setdefault(name, freq)  # a folder used by several datasets counts once
        dirs = _dataset_dirs(group, reg=False)
        meta["ss_datasets"] = json.dumps(datasets)
        meta["ss_tag_frequency"] = json.dumps(tags)
        meta["ss_dataset_dirs"] = json.dumps(dirs)
    else:
        ds = group.datasets[0]
        spec = ds.spec
        meta.update({
            "ss_batch_size_per_device": spec.batch_size,
            "ss_resolution": tuple(spec.resolution),
            "ss_color_aug": bool(cli.get("color_aug")),
            "ss_flip_aug": bool(cli.get("flip_aug")),
            "ss_random_crop": bool(cli.get("random_crop")),
            "ss_shuffle_caption": bool(cli.get("shuffle_caption")),
            "ss_enable_bucket": bool(spec.enable_bucket),
            "ss_bucket_no_upscale": bool(spec.bucket_no_upscale),
            "ss_min_bucket_reso": spec.min_bucket_reso if spec.enable_bucket else None,
            "ss_max_bucket_reso": spec.max_bucket_reso if spec.enable_bucket else None,
            "ss_keep_tokens": _arg(cli, "keep_tokens", 0),
            "ss_dataset_dirs": json.dumps(_dataset_dirs(group, reg=False)),
            "ss_reg_dataset_dirs": json.dumps(_dataset_dirs(group, reg=True)),
            "ss_tag_frequency": json.dumps(tag_frequency(ds)),
            "ss_bucket_info": json.dumps(bucket_info(ds)),
        })
    return {k: str(v) for k, v in meta.items()}
