"""Per-block activation checkpointing for any DiT whose forward runs its blocks through
`run_block` (FLUX, Chroma, SD3, Lumina, Anima).

Two ways to keep a block's input for backward:
- on the GPU (`--gradient_checkpointing`): torch's non-reentrant checkpoint;
- in pinned CPU memory (`--cpu_offload_checkpointing`, Anima's `--unsloth_offload_checkpointing`):
  `library.offload_checkpointing.OffloadedCheckpoint`, copies overlapped with compute.
The mechanism lives here once; a model only inherits the mixin and calls `self.run_block`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from library.fp8 import keeping_upcast_weights
from library.offload_checkpointing import OffloadedCheckpoint


def _contexts():
    """(first forward, recomputation). The recomputation runs right before the block's backward,
    so fp8 layers may keep their upcast weights for it (library/fp8.py). The first forward keeps
    nothing for backward under the checkpoint (it only notes what would be saved, and checks
    that the recomputation saves the same kinds of tensors), so it runs the same way."""
    return keeping_upcast_weights(), keeping_upcast_weights()


class BlockCheckpointing:
    """Mixin for nn.Module DiTs: `self.run_block(block, *args)` in their forward."""

    gradient_checkpointing: bool = False
    _offloaded_checkpoint: OffloadedCheckpoint | None = None

    def enable_gradient_checkpointing(self, cpu_offload: bool = False) -> None:
        """Checkpoint every block; with `cpu_offload` its saved input waits in CPU memory."""
        self.gradient_checkpointing = True
        self._offloaded_checkpoint = OffloadedCheckpoint() if cpu_offload else None

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False
        self._offloaded_checkpoint = None

    def run_block(self, block: nn.Module, *args, **kwargs):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            if self._offloaded_checkpoint is not None:
                return self._offloaded_checkpoint(block, *args, **kwargs)
            return checkpoint(block, *args, use_reentrant=False, context_fn=_contexts, **kwargs)
        return block(*args, **kwargs)
