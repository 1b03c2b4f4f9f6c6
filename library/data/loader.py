"""torch DataLoader integration.

Design: a map-style Dataset whose "index" is a BatchRef (one whole batch), fed by a sampler that
yields this epoch's refs; batch_size=None so the DataLoader neither batches nor collates. The
sampler is re-read at the start of every epoch, so persistent workers survive epochs, and
skipping to batch k just starts the sampler at k (nothing before it is decoded).
"""

from __future__ import annotations

import multiprocessing
import sys
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from library.data.batches import Batch, BatchBuilder, BatchRef, plan_epoch, shard


class _BatchSource(Dataset):
    def __init__(self, builder: BatchBuilder):
        self.builder = builder

    def __getitem__(self, ref: BatchRef) -> Batch:
        return self.builder.build(ref)

    def __len__(self) -> int:  # not used for sampling; DataLoader only needs it to exist
        return 0


class _EpochSampler(Sampler):
    def __init__(self) -> None:
        self.refs: list[BatchRef] = []

    def __iter__(self) -> Iterator[BatchRef]:
        return iter(list(self.refs))

    def __len__(self) -> int:
        return len(self.refs)


def _as_is(batch: Batch) -> Batch:
    # The builder returns finished batches; the default conversion would turn tuples into lists.
    return batch


def _worker_init(_worker_id: int) -> None:
    # Workers run one batch at a time each; torch's own thread pool would only oversubscribe the
    # CPU. cv2's thread count is deliberately left alone: cv2.setNumThreads can hang in a forked
    # child (see images.single_threaded_cv2).
    torch.set_num_threads(1)


class EpochLoader:
    """Iterates one epoch at a time: `for batch in loader.epoch(e, skip_batches=k)`.

    Epochs are numbered from 1 like sd-scripts (caption_dropout_every_n_epochs counts them).
    `len(loader)` is the number of batches per epoch for this process.
    """

    def __init__(self, builder: BatchBuilder, datasets, *, seed: int, num_workers: int, persistent_workers: bool,
                 pin_memory: bool, num_processes: int = 1, process_index: int = 0,
                 gradient_accumulation_steps: int = 1, prefetch_factor: int | None = None):
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} is outside 0..{num_processes - 1}")
        self.datasets = datasets
        self.seed = int(seed)
        self.num_processes = num_processes
        self.process_index = process_index
        self.gradient_accumulation_steps = max(1, gradient_accumulation_steps)
        self._sampler = _EpochSampler()
        kwargs = {}
        if num_workers > 0:
            kwargs["persistent_workers"] = persistent_workers
            kwargs["worker_init_fn"] = _worker_init
            if prefetch_factor is not None:
                kwargs["prefetch_factor"] = prefetch_factor
            # fork shares the (possibly large) in-memory caches with the workers without copying.
            if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
                kwargs["multiprocessing_context"] = "fork"
        # Its own generator: a DataLoader otherwise draws its worker base seed from the global
        # torch RNG at each epoch, which would shift the training noise after a --resume.
        self._loader = DataLoader(_BatchSource(builder), batch_size=None, sampler=self._sampler,
                                  num_workers=num_workers, pin_memory=pin_memory,
                                  generator=torch.Generator().manual_seed(seed), **kwargs)
        total = sum(ds.num_batches for ds in datasets)
        self._per_process = -(-total // num_processes) if num_processes > 1 else total

    def __len__(self) -> int:
        return self._per_process

    def refs(self, epoch: int, skip_batches: int = 0) -> list[BatchRef]:
        """The BatchRefs this process sees in `epoch`, from batch `skip_batches` on."""
        if epoch < 1:
            raise ValueError(f"epochs are numbered from 1 (got {epoch})")
        planned = shard(plan_epoch(self.datasets, self.seed, epoch), self.num_processes, self.process_index)
        out = []
        for k, (d, bucket, slots) in enumerate(planned):
            if k < skip_batches:
                continue
            step = ((epoch - 1) * len(planned) + k) // self.gradient_accumulation_steps
            out.append(BatchRef(self.seed, epoch, k, step, d, bucket, slots))
        return out

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[Batch]:
        self._sampler.refs = self.refs(epoch, skip_batches)
        return iter(self._loader)
