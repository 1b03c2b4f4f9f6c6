"""Epoch plans (which batches, in which order) and turning one planned batch into a Batch dict.

The plan is a pure function of (seed, epoch) and the dataset contents, so a resumed run sees the
same batches, and skipping batches needs no image decoding. Per-sample randomness (caption
processing, flip, crop, colour) comes from RNGs derived from (seed, epoch, dataset, item, repeat).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import get_worker_info

from library.data.buckets import Size, crop_ltrb
from library.data.caching import LatentStore, TextStore
from library.data.captions import CaptionOptions, process_caption
from library.data.dataset import ImageDataset, Slot, derive_rng
from library.data.images import (
    color_augment, decode_image, flip_horizontal, plan_crop, resize_and_crop,
)

Batch = dict[str, Any]


class Reso(NamedTuple):
    """(width, height). A NamedTuple so DataLoader collation and pin_memory keep it a tuple."""

    width: int
    height: int


class CropBox(NamedTuple):
    left: int
    top: int
    right: int
    bottom: int


@dataclass(frozen=True)
class BatchRef:
    """Everything a worker needs to build one batch (small; sent to the worker process)."""

    seed: int
    epoch: int
    index: int          # position in this process's epoch
    step: int           # training step this batch belongs to (token warm-up)
    dataset: int        # position of the dataset in its group
    bucket: Size
    slots: tuple[Slot, ...]


def plan_epoch(datasets: list[ImageDataset], seed: int, epoch: int) -> list[tuple[int, Size, tuple[Slot, ...]]]:
    """All batches of one epoch in training order: [(dataset position, bucket, slots)]."""
    batches = []
    for d, ds in enumerate(datasets):
        batches.extend((d, bucket, tuple(slots)) for bucket, slots in ds.epoch_batches(seed, epoch))
    derive_rng("order", seed, epoch).shuffle(batches)
    return batches


def shard(batches: list, num_processes: int, process_index: int) -> list:
    """This process's share: every num_processes-th batch, padded by wrapping around so all
    processes see the same number of batches (a DDP step needs every process)."""
    if num_processes <= 1:
        return list(batches)
    per_process = math.ceil(len(batches) / num_processes)
    padded = list(batches) + [batches[i % len(batches)] for i in range(per_process * num_processes - len(batches))]
    return padded[process_index::num_processes]


class BatchBuilder:
    """Builds Batch dicts from BatchRefs. Lives in the data-loader workers."""

    def __init__(self, datasets: list[ImageDataset], caption_options: list[list[CaptionOptions]], *,
                 prior_loss_weight: float, latents: LatentStore | None, text: TextStore | None):
        self.datasets = datasets
        self.caption_options = caption_options
        self.prior_loss_weight = prior_loss_weight
        self.latents = latents
        self.text = text
        self.any_alpha = any(info.spec.alpha_mask for ds in datasets for info in ds.subsets)
        self.any_mask_images = any(info.spec.conditioning_data_dir for ds in datasets for info in ds.subsets)

    def build(self, ref: BatchRef) -> Batch:
        ds = self.datasets[ref.dataset]
        captions, loss_weights, paths, sizes, crops, attrs, flips = [], [], [], [], [], [], []
        pixels, latents, alphas, texts, masks = [], [], [], [], []
        for slot in ref.slots:
            item = ds.items[slot.item]
            sub = ds.subsets[item.subset_index].spec
            caption_rng = derive_rng("caption", ref.seed, ref.epoch, ds.index, slot.item, slot.repeat)
            image_rng = derive_rng("image", ref.seed, ref.epoch, ds.index, slot.item, slot.repeat)
            caption = process_caption(item.caption, self.caption_options[ref.dataset][item.subset_index],
                                      caption_rng, epoch=ref.epoch, step=ref.step)
            flip = sub.flip_aug and image_rng.random() < 0.5
            plan = None
            if self.latents is not None:
                lat, alpha = self.latents.get(ref.dataset, slot.item, flip)
                latents.append(lat)
                if self.any_alpha:
                    alphas.append(alpha if alpha is not None else torch.ones(ref.bucket[1], ref.bucket[0]))
            else:
                img = decode_image(item.path, want_alpha=sub.alpha_mask, draft_size=item.resized)
                plan = plan_crop(item.resized, item.bucket, image_rng if sub.random_crop else None)
                img = resize_and_crop(img, plan, sub.resize_interpolation)
                if sub.color_aug:
                    img.rgb = color_augment(img.rgb, image_rng)
                if flip:
                    img = flip_horizontal(img)
                pixels.append(np.ascontiguousarray(img.rgb.transpose(2, 0, 1)))
                if self.any_alpha:
                    alphas.append(torch.from_numpy(img.alpha.astype(np.float32) / 255.0) if img.alpha is not None
                                  else torch.ones(ref.bucket[1], ref.bucket[0]))
            if self.any_mask_images:
                # the mask follows the image's resize, crop and flip (cached latents: centre crop)
                plan = plan or plan_crop(item.resized, item.bucket, None)
                masks.append(mask_from_image(item.mask_path, plan, flip, ref.bucket))
            if self.text is not None:
                texts.append(self.text.get(ref.dataset, slot.item, caption))
            captions.append(caption)
            loss_weights.append(self.prior_loss_weight if sub.is_reg else 1.0)
            paths.append(item.path)
            sizes.append(Reso(*item.size))
            crops.append(CropBox(*crop_ltrb(ref.bucket, item.size)))
            attrs.append(dict(sub.custom_attributes or {}))
            flips.append(flip)

        batch: Batch = {
            "captions": captions,
            "loss_weights": torch.tensor(loss_weights, dtype=torch.float32),
            "network_multipliers": torch.full((len(captions),), float(ds.spec.network_multiplier), dtype=torch.float32),
            "bucket_reso": Reso(*ref.bucket),
            "original_sizes": sizes,
            "crop_ltrb": crops,
            "image_paths": paths,
            "custom_attributes": attrs,
            "flipped": flips,
        }
        if self.latents is not None:
            batch["latents"] = stack(latents)
        else:
            batch["images"] = images_to_unit_range(pixels)
        if self.any_alpha:
            batch["alpha_masks"] = stack([a.float() for a in alphas])
        if self.any_mask_images:
            batch["conditioning_masks"] = stack(masks)
        if self.text is not None:
            batch["text"] = _stack_text(texts, paths)
        return batch


def mask_from_image(path: str | None, plan, flip: bool, bucket: tuple[int, int]) -> torch.Tensor:
    """(H, W) float32 in [0, 1] from a mask image's red channel, resized and cropped like its
    image; all ones for an image of a subset without mask images."""
    if path is None:
        return torch.ones(bucket[1], bucket[0])
    img = resize_and_crop(decode_image(path, want_alpha=False), plan, None)
    if flip:
        img = flip_horizontal(img)
    return torch.from_numpy(img.rgb[..., 0].astype(np.float32) / 255.0)


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor; inside a data-loader worker it lives in shared memory, so handing the batch
    to the main process costs no extra copy (as torch's default_collate does)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    storage = torch.UntypedStorage._new_shared(numel * torch.empty((), dtype=dtype).element_size())
    return torch.empty(0, dtype=dtype).set_(storage).view(-1)[:numel].view(shape)


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tensors, out=_batch_tensor((len(tensors), *tensors[0].shape), tensors[0].dtype))


def images_to_unit_range(chw: list[np.ndarray]) -> torch.Tensor:
    """(3,H,W) uint8 images -> (B,3,H,W) float32 in [-1, 1] (x / 127.5 - 1)."""
    u8 = torch.from_numpy(np.stack(chw))
    out = _batch_tensor(tuple(u8.shape), torch.float32)
    torch.div(u8, 127.5, out=out)
    return out.sub_(1.0)


def _stack_text(entries: list[dict[str, torch.Tensor]], paths: list[str]) -> dict[str, torch.Tensor]:
    keys = list(entries[0])
    out = {}
    for k in keys:
        try:
            out[k] = stack([e[k] for e in entries])
        except (KeyError, RuntimeError) as e:
            raise ValueError(f"cached text outputs for {paths} do not share key {k!r} with equal shapes ({e}); "
                             "the text encoder must pad every caption to the same length") from e
    return out
