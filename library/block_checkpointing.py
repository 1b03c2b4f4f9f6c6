"""Per-block activation checkpointing for any DiT whose forward runs its blocks through
`run_block` (FLUX, Chroma, SD3, Lumina, Anima).

Two ways to keep a block's input for backward:
- on the GPU (`--gradient_checkpointing`): torch's non-reentrant checkpoint;
- in pinned CPU memory (`--cpu_offload_checkpointing`, Anima's `--unsloth_offload_checkpointing`):
  `library.offload_checkpointing.OffloadedCheckpoint`, copies overlapped with compute.
The mechanism lives here once; a model only inherits the mixin and calls `self.run_block`.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from library.fp8 import keeping_upcast_weights
from library.offload_checkpointing import OffloadedCheckpoint

# The attention kernels' ops (PyTorch SDPA's backends) whose outputs a checkpointed block keeps
# with --keep_attention_outputs, so its recomputation skips them.
ATTENTION_OPS = frozenset(
    getattr(torch.ops.aten, name).default for name in (
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name))


def _contexts():
    """(first forward, recomputation). The recomputation runs right before the block's backward,
    so fp8 layers may keep their upcast weights for it (library/fp8.py). The first forward keeps
    nothing for backward under the checkpoint (it only notes what would be saved, and checks
    that the recomputation saves the same kinds of tensors), so it runs the same way."""
    return keeping_upcast_weights(), keeping_upcast_weights()


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


@contextmanager
def _joined(*contexts):
    with ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


def _contexts_keeping_attention():
    """As `_contexts`, and the attention's outputs are kept from the first forward for the
    recomputation (torch's selective checkpointing): attention is about a quarter of a DiT
    step at 1024x1024, and its output one hidden-wide tensor per block."""
    first, recompute = create_selective_checkpoint_contexts(_keep_attention)
    return _joined(keeping_upcast_weights(), first), _joined(keeping_upcast_weights(), recompute)


class BlockCheckpointing:
    """Mixin for nn.Module DiTs: `self.run_block(block, *args)` in their forward."""

    gradient_checkpointing: bool = False
    _offloaded_checkpoint: OffloadedCheckpoint | None = None
    _checkpoint_contexts = staticmethod(_contexts)

    def enable_gradient_checkpointing(self, cpu_offload: bool = False, keep_attention: bool = False) -> None:
        """Checkpoint every block; with `cpu_offload` its saved input waits in CPU memory; with
        `keep_attention` its attention outputs are kept too (--keep_attention_outputs: the
        recomputation before its backward skips the attention kernels)."""
        if cpu_offload and keep_attention:
            raise ValueError("offloaded checkpoints keep only the block inputs; keep_attention needs the "
                             "GPU-side checkpoint")
        self.gradient_checkpointing = True
        self._offloaded_checkpoint = OffloadedCheckpoint() if cpu_offload else None
        self._checkpoint_contexts = _contexts_keeping_attention if keep_attention else _contexts

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False
        self._offloaded_checkpoint = None

    def run_block(self, block: nn.Module, *args, **kwargs):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            if self._offloaded_checkpoint is not None:
                return self._offloaded_checkpoint(block, *args, **kwargs)
            return checkpoint(block, *args, use_reentrant=False, context_fn=self._checkpoint_contexts, **kwargs)
        return block(*args, **kwargs)
