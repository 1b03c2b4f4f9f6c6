"""DatasetGroup: every dataset of a run (train or validation side) behind one object.

This is what the training loop talks to: counts, report, metadata, caching and the loader.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from library.data import caching
from library.data.batches import BatchBuilder
from library.data.captions import CaptionOptions, resolve_token_warmup_step
from library.data.dataset import ImageDataset
from library.data.items import SkippedImage
from library.data.loader import EpochLoader

logger = logging.getLogger(__name__)


@dataclass
class GroupSettings:
    """Run-wide values that are not per dataset (command line only in sd-scripts)."""

    prior_loss_weight: float = 1.0
    max_token_length: int | None = None
    source: str = ""                      # the config file, or "--train_data_dir"
    used_config_file: bool = True
    cli: dict[str, Any] = field(default_factory=dict)  # resolved CLI values, for metadata
    is_validation: bool = False


class DatasetGroup:
    def __init__(self, datasets: list[ImageDataset], settings: GroupSettings, *,
                 skipped: list[SkippedImage] | None = None, notes: list[str] | None = None):
        self.datasets = datasets
        self.settings = settings
        self.skipped = list(skipped or [])
        self.notes = list(notes or [])
        self.validation: DatasetGroup | None = None  # set on the train group by build_datasets
        self._latents: caching.LatentStore | None = None
        self._text: caching.TextStore | None = None
        self._max_train_steps: int | None = None
        self.last_cache_stats: caching.CacheStats | None = None

    # ------------------------------------------------------------------------------ counts

    @property
    def num_train_images(self) -> int:
        """Training images x repeats, summed over datasets (sd-scripts' num_train_images)."""
        return sum(ds.num_train_images for ds in self.datasets)

    @property
    def has_alpha_masks(self) -> bool:
        """Whether batches carry `alpha_masks` (some subset has alpha_mask on)."""
        return any(info.spec.alpha_mask for ds in self.datasets for info in ds.subsets)

    @property
    def has_mask_images(self) -> bool:
        """Whether batches carry `conditioning_masks` (some subset has conditioning_data_dir)."""
        return any(info.spec.conditioning_data_dir for ds in self.datasets for info in ds.subsets)

    @property
    def num_reg_images(self) -> int:
        return sum(ds.num_reg_images for ds in self.datasets)

    @property
    def num_batches_per_epoch(self) -> int:
        return sum(ds.num_batches for ds in self.datasets)

    @property
    def prior_loss_weight(self) -> float:
        return self.settings.prior_loss_weight

    @property
    def max_token_length(self) -> int | None:
        return self.settings.max_token_length

    @property
    def uses_cached_latents(self) -> bool:
        return self._latents is not None

    @property
    def uses_cached_text(self) -> bool:
        return self._text is not None

    # ------------------------------------------------------------------------------ captions

    def set_max_train_steps(self, max_train_steps: int) -> None:
        """Needed only when token_warmup_step is a fraction (< 1) of the training steps."""
        self._max_train_steps = int(max_train_steps)

    def caption_options(self, *, for_checks: bool = False) -> list[list[CaptionOptions]]:
        """CaptionOptions per dataset and subset (token warm-up resolved to steps). With
        `for_checks`, a fractional warm-up whose step count is not known yet only counts as "on"."""
        max_steps = self._max_train_steps
        if for_checks and max_steps is None:
            max_steps = 1 << 30
        out = []
        for ds in self.datasets:
            per = []
            for info in ds.subsets:
                s = info.spec
                per.append(CaptionOptions(
                    prefix=s.caption_prefix, suffix=s.caption_suffix,
                    dropout_rate=s.caption_dropout_rate, dropout_every_n_epochs=s.caption_dropout_every_n_epochs,
                    enable_wildcard=s.enable_wildcard, shuffle=s.shuffle_caption, separator=s.caption_separator,
                    keep_tokens=s.keep_tokens, keep_tokens_separator=s.keep_tokens_separator,
                    secondary_separator=s.secondary_separator, tag_dropout_rate=s.caption_tag_dropout_rate,
                    token_warmup_min=s.token_warmup_min,
                    token_warmup_step=resolve_token_warmup_step(s.token_warmup_step, max_steps),
                ))
            out.append(per)
        return out

    # ------------------------------------------------------------------------------ caching

    def cache_latents(self, encoder: caching.LatentCacheEncoder, *, to_disk: bool, batch_size: int = 1,
                      skip_check: bool = False, device: Any = None, progress: bool = True) -> caching.CacheStats:
        """Encode every image at its bucket size, crop and (with flip_aug) flipped, to memory or to
        files next to the images. Valid existing entries are reused. Call before `loader()`."""
        store, stats = caching.cache_latents(self.datasets, encoder, to_disk=to_disk, batch_size=batch_size,
                                             skip_check=skip_check, device=device, progress=progress)
        self._latents = store
        self.last_cache_stats = stats
        logger.info("latents: %d encoded, %d reused, %d corrupt files rebuilt", stats.encoded, stats.reused,
                    stats.corrupt_files)
        return stats

    def cache_text_outputs(self, encoder: caching.TextCacheEncoder, *, to_disk: bool, batch_size: int = 1,
                           skip_check: bool = False, progress: bool = True) -> caching.CacheStats:
        """Encode each image's processed caption (and the empty caption when caption dropout is on).
        Call before `loader()`."""
        store, stats = caching.cache_text_outputs(self.datasets, self.caption_options(), encoder, to_disk=to_disk,
                                                  batch_size=batch_size, skip_check=skip_check, progress=progress)
        self._text = store
        self.last_cache_stats = stats
        logger.info("text outputs: %d encoded, %d reused, %d corrupt files rebuilt", stats.encoded,
                    stats.reused, stats.corrupt_files)
        return stats

    def latent_caching_problems(self) -> list[str]:
        return caching.latent_caching_problems(self.datasets)

    def text_caching_problems(self) -> list[str]:
        return caching.text_caching_problems(self.datasets, self.caption_options(for_checks=True))

    # ------------------------------------------------------------------------------ loading

    def loader(self, *, seed: int, num_workers: int = 0, persistent_workers: bool = False, pin_memory: bool = False,
               num_processes: int = 1, process_index: int = 0, gradient_accumulation_steps: int = 1) -> EpochLoader:
        """An EpochLoader. With several processes (DDP), give num_processes/process_index: each
        process gets its own share of every epoch (do not pass it through accelerator.prepare)."""
        builder = BatchBuilder(self.datasets, self.caption_options(), prior_loss_weight=self.prior_loss_weight,
                               latents=self._latents, text=self._text)
        return EpochLoader(builder, self.datasets, seed=seed, num_workers=num_workers,
                           persistent_workers=persistent_workers and num_workers > 0, pin_memory=pin_memory,
                           num_processes=num_processes, process_index=process_index,
                           gradient_accumulation_steps=gradient_accumulation_steps)
