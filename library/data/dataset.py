"""One `[[datasets]]` entry after scanning: its items, repeats, buckets and validation split."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from library.data.buckets import BucketPlanner, Size
from library.data.config import DatasetSpec, SubsetSpec
from library.data.items import ImageItem, ProbeCache, SkippedImage, scan_subset


@dataclass
class SubsetInfo:
    """A subset as used by one dataset (train or validation side)."""

    spec: SubsetSpec
    img_count: int = 0          # images used here (after skipping and the validation split)
    num_repeats: int = 1        # repeats used here (1 on the validation side)
    missing_captions: int = 0
    empty_captions: int = 0
    skipped: list[SkippedImage] = field(default_factory=list)


@dataclass(frozen=True)
class Slot:
    """One appearance of an item in an epoch: the item and which repeat it is."""

    item: int
    repeat: int


class ImageDataset:
    """Items of one dataset with their repeats and bucket assignment.

    `bucket_slots` maps each bucket (w, h) to the slots (item, repeat) that train in it; an epoch
    shuffles each bucket and cuts it into batches of `spec.batch_size`.
    """

    def __init__(self, spec: DatasetSpec, index: int, subsets: list[SubsetInfo], items: list[ImageItem],
                 repeats: list[int], *, is_validation: bool):
        self.spec = spec
        self.index = index
        self.subsets = subsets
        self.items = items
        self.repeats = repeats
        self.is_validation = is_validation
        self.skipped: list[SkippedImage] = []
        self.planner = BucketPlanner(spec.resolution, enable_bucket=spec.enable_bucket,
                                     min_size=spec.min_bucket_reso, max_size=spec.max_bucket_reso,
                                     step=spec.bucket_reso_steps, no_upscale=spec.bucket_no_upscale)
        self.bucket_slots: dict[Size, list[Slot]] = {}
        self._assign_buckets()

    def _assign_buckets(self) -> None:
        kept_items: list[ImageItem] = []
        kept_repeats: list[int] = []
        for item, rep in zip(self.items, self.repeats):
            a = self.planner.assign(*item.size)
            if a.bucket[0] <= 0 or a.bucket[1] <= 0:
                # Only possible with bucket_no_upscale and an image smaller than bucket_reso_steps.
                self.skipped.append(SkippedImage(item.path, f"{item.size[0]}x{item.size[1]} is smaller than "
                                                            f"bucket_reso_steps {self.spec.bucket_reso_steps} "
                                                            "with bucket_no_upscale"))
                self.subsets[item.subset_index].img_count -= 1
                continue
            item.bucket, item.resized, item.ar_error = a.bucket, a.resized, a.ar_error
            kept_items.append(item)
            kept_repeats.append(rep)
        self.items, self.repeats = kept_items, kept_repeats
        for i, (item, rep) in enumerate(zip(self.items, self.repeats)):
            for r in range(rep):
                self.bucket_slots.setdefault(item.bucket, []).append(Slot(i, r))
        self.bucket_slots = dict(sorted(self.bucket_slots.items()))

    # ---------------------------------------------------------------------------- counts

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size

    @property
    def num_train_images(self) -> int:
        """Images x repeats of the non-regularisation subsets (sd-scripts' num_train_images)."""
        return sum(s.img_count * s.num_repeats for s in self.subsets if not s.spec.is_reg)

    @property
    def num_reg_images(self) -> int:
        """Regularisation images x their configured repeats (before balancing), as sd-scripts counts."""
        return sum(s.img_count * s.num_repeats for s in self.subsets if s.spec.is_reg)

    @property
    def num_batches(self) -> int:
        return sum(math.ceil(len(slots) / self.batch_size) for slots in self.bucket_slots.values())

    def bucket_list(self) -> list[Size]:
        """All buckets in sd-scripts' order (the predefined grid, or those made in no-upscale mode)."""
        if self.planner.predefined:
            return list(self.planner.predefined)
        return sorted(self.bucket_slots)

    def mean_ar_error(self) -> float:
        errors = [abs(it.ar_error) for it in self.items]
        return sum(errors) / len(errors) if errors else 0.0

    def subset_of(self, item_index: int) -> SubsetSpec:
        return self.subsets[self.items[item_index].subset_index].spec

    # ---------------------------------------------------------------------------- epochs

    def epoch_batches(self, seed: int, epoch: int) -> list[tuple[Size, list[Slot]]]:
        """This dataset's batches for an epoch: each bucket shuffled by (seed, epoch, dataset,
        bucket) and cut into batch_size pieces (the last one may be short)."""
        out = []
        for bucket, slots in self.bucket_slots.items():
            order = list(slots)
            derive_rng("bucket", seed, epoch, self.index, bucket[0], bucket[1]).shuffle(order)
            for start in range(0, len(order), self.batch_size):
                out.append((bucket, order[start:start + self.batch_size]))
        return out


def derive_rng(*parts: object) -> random.Random:
    """A private RNG for one purpose, seeded from its parts; never touches the global RNG."""
    return random.Random("|".join(str(p) for p in parts))


# -------------------------------------------------------------------------------- construction

def split_for_validation(items: list[ImageItem], split: float, seed: int) -> tuple[list[ImageItem], list[ImageItem]]:
    """Shuffle with `seed`, then train = first ceil(n*(1-split)), validation = the rest."""
    if split <= 0.0 or not items:
        return list(items), []
    order = list(items)
    random.Random(seed).shuffle(order)
    # round() first: 10 * (1 - 0.1) is 9.000000000000002 in floating point.
    n_train = math.ceil(round(len(order) * (1.0 - split), 9))
    train = sorted(order[:n_train], key=lambda it: it.path)
    val = sorted(order[n_train:], key=lambda it: it.path)
    return train, val


def balance_reg_repeats(num_train: int, reg: list[tuple[int, int]]) -> dict[int, int]:
    """sd-scripts: register reg images (with their repeats) in order until their count reaches the
    number of train images, then add one repeat at a time round-robin. {item index: repeats};
    reg images not reached get no entry (they are unused)."""
    result: dict[int, int] = {}
    if not reg or num_train <= 0:
        return result
    n = 0
    first = True
    while n < num_train:
        for idx, rep in reg:
            if first:
                result[idx] = rep
                n += rep
            else:
                result[idx] += 1
                n += 1
            if n >= num_train:
                break
        first = False
    return result


def count_missing_captions(items: list[ImageItem]) -> int:
    """Images without a caption of their own (class tokens or nothing used instead)."""
    return sum(1 for it in items if it.caption_source in ("class_tokens", "none")
               or (it.caption_source == "metadata" and it.caption == ""))


def count_empty_captions(items: list[ImageItem]) -> int:
    """Images whose caption file exists but is empty."""
    return sum(1 for it in items if it.caption_source == "file" and it.caption == "")


@dataclass
class DatasetBuild:
    train: ImageDataset | None
    validation: ImageDataset | None
    errors: list[str]
    skipped: list[SkippedImage]
    notes: list[str]


def build_dataset(spec: DatasetSpec, index: int, probes: ProbeCache, fallback_seed: int) -> DatasetBuild:
    """Scan every subset of `spec`, split off validation images, balance reg images, bucket."""
    errors: list[str] = []
    skipped: list[SkippedImage] = []
    notes: list[str] = []
    train_infos: list[SubsetInfo] = []
    val_infos: list[SubsetInfo] = []
    train_items: list[ImageItem] = []
    train_repeats: list[int] = []
    val_items: list[ImageItem] = []
    reg_candidates: list[tuple[int, int]] = []

    for j, sub in enumerate(spec.subsets):
        scan = scan_subset(sub, j, probes)
        errors.extend(scan.errors)
        skipped.extend(scan.skipped)
        if not scan.items:
            notes.append(f"{sub.section} ({sub.name}): no usable images")
        seed = sub.validation_seed if sub.validation_seed is not None else fallback_seed
        if sub.is_reg:
            train_part, val_part = scan.items, []  # reg images are never split
        else:
            train_part, val_part = split_for_validation(scan.items, sub.validation_split, seed)
        t_info = SubsetInfo(sub, len(train_part), sub.num_repeats, count_missing_captions(train_part),
                            count_empty_captions(train_part), scan.skipped)
        v_info = SubsetInfo(sub, len(val_part), 1, 0, 0, [])
        train_infos.append(t_info)
        val_infos.append(v_info)
        for it in train_part:
            if sub.is_reg:
                reg_candidates.append((len(train_items), sub.num_repeats))
                train_items.append(it)
                train_repeats.append(0)  # filled by balancing below
            else:
                train_items.append(it)
                train_repeats.append(sub.num_repeats)
        val_items.extend(val_part)

    num_train = sum(r for it, r in zip(train_items, train_repeats) if not spec.subsets[it.subset_index].is_reg)
    balanced = balance_reg_repeats(num_train, reg_candidates)
    for idx, _ in reg_candidates:
        train_repeats[idx] = balanced.get(idx, 0)
    if reg_candidates:
        unused = sum(1 for idx, _ in reg_candidates if balanced.get(idx, 0) == 0)
        if num_train == 0:
            notes.append(f"{spec.section}: regularisation images are unused because this dataset has no "
                         "training images")
        elif unused:
            notes.append(f"{spec.section}: {unused} regularisation images are unused (there are more reg "
                         "images than train images x repeats; sd-scripts does the same)")

    # Items with 0 repeats (unused reg images) do not train.
    keep = [i for i, r in enumerate(train_repeats) if r > 0]
    train = ImageDataset(spec, index, train_infos, [train_items[i] for i in keep],
                         [train_repeats[i] for i in keep], is_validation=False) if keep else None
    if train is not None:
        skipped.extend(train.skipped)
    validation = None
    if val_items:
        validation = ImageDataset(spec, index, val_infos, val_items, [1] * len(val_items), is_validation=True)
        skipped.extend(validation.skipped)
    return DatasetBuild(train, validation, errors, skipped, notes)
