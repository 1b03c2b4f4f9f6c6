"""Per-block activation checkpointing for any DiT whose forward runs its blocks through
`run_block` (FLUX, Chroma, SD3, Lumina, Anima).

Two ways to keep a block's input for backward:
- on the GPU (`--gradient_checkpointing`): torch's non-reentrant checkpoint;
- in pinned CPU memory (`--cpu_offload_checkpointing`, Anima's `--unsloth_offload_checkpointing`):
  `library.offload_checkpointing.OffloadedCheckpoint`, copies overlapped with compute.
On the GPU, `--selective_checkpointing` also keeps the outputs that cost the most to recompute
per byte kept (attention, MLP down-projections), through torch's selective checkpointing: in
eager blocks a dispatch mode that sees each op from Python; with --torch_compile the checkpoint is
compiled together with the block, so that the compiler applies the same policy to the graph it
traces (compiled code calls its matmuls past any dispatch mode).
The mechanism lives here once; a model only inherits the mixin and calls `self.run_block`.
"""

from __future__ import annotations

import functools
import logging
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from library.fp8 import keeping_upcast_weights
from library.offload_checkpointing import OffloadedCheckpoint

# What selective checkpointing (--selective_checkpointing) keeps from a block's first forward for
# its recomputation: the attention kernels' outputs (PyTorch SDPA's backends), and the outputs of
# matmuls that reduce the width at least twofold (MLP down-projections such as FLUX's linear2,
# 15360 -> 3072: a large share of a block's FLOPs, one hidden-wide tensor to keep).
ATTENTION_OPS = frozenset(
    getattr(torch.ops.aten, name).default for name in (
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name))
_ADDMM, _MM = torch.ops.aten.addmm.default, torch.ops.aten.mm.default


def _contexts():
    """(first forward, recomputation). The recomputation runs right before the block's backward,
    so fp8 layers may keep their upcast weights for it (library/fp8.py). The first forward keeps
    nothing for backward under the checkpoint (it only notes what would be saved, and checks
    that the recomputation saves the same kinds of tensors), so it runs the same way."""
    return keeping_upcast_weights(), keeping_upcast_weights()


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Which ops' outputs a checkpointed block keeps (see ATTENTION_OPS above)."""
    if op in ATTENTION_OPS:
        return CheckpointPolicy.MUST_SAVE
    if op is _ADDMM or op is _MM:
        x, w = args[1:3] if op is _ADDMM else args[:2]
        if x.shape[-1] >= 2 * w.shape[-1]:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_selective_contexts_fn = functools.partial(create_selective_checkpoint_contexts, selective_policy)


@contextmanager
def _joined(*contexts):
    with ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


def _selective_contexts():
    """As `_contexts`, and the kept outputs come from the first forward (torch's selective
    checkpointing: a dispatch mode that watches every op from Python)."""
    first, recompute = _selective_contexts_fn()
    return _joined(keeping_upcast_weights(), first), _joined(keeping_upcast_weights(), recompute)


def _selective_checkpoint(block: nn.Module, *args, **kwargs):
    """Compiled with a block (--torch_compile --selective_checkpointing): the recomputation becomes
    part of the compiled backward. FLUX on an H200, compiled and recorded: 0.4588 s per step against
    0.488 s with only the attention outputs kept (all a dispatch mode sees of a compiled block)."""
    return checkpoint(block, *args, use_reentrant=False, context_fn=_selective_contexts_fn, **kwargs)


def _drop_in_place_warning(record: logging.LogRecord) -> bool:
    # torch warns once per compile that a checkpoint with a policy must hold no in-place ops: the
    # blocks hold none under compile (the LoRA adds out of place there; tests compare gradients)
    return "context_fn is passed to torch.utils.checkpoint" not in record.getMessage()


@functools.cache
def _compiled_selective_checkpoint(backend: str):
    """One compiled function for every block: blocks of one kind share their graphs."""
    logging.getLogger("torch._higher_order_ops.wrap").addFilter(_drop_in_place_warning)
    return torch.compile(_selective_checkpoint, backend=backend)


class BlockCheckpointing:
    """Mixin for nn.Module DiTs: `self.run_block(block, *args)` in their forward."""

    gradient_checkpointing: bool = False
    _offloaded_checkpoint: OffloadedCheckpoint | None = None
    _selective: bool = False

    def enable_gradient_checkpointing(self, cpu_offload: bool = False, selective: bool = False) -> None:
        """Checkpoint every block; with `cpu_offload` its saved input waits in CPU memory; with
        `selective` its attention and MLP down-projection outputs are kept too
        (--selective_checkpointing: the recomputation before its backward skips those kernels)."""
        if cpu_offload and selective:
            raise ValueError("offloaded checkpoints keep only the block inputs; selective checkpointing needs the "
                             "GPU-side checkpoint")
        self.gradient_checkpointing = True
        self._offloaded_checkpoint = OffloadedCheckpoint() if cpu_offload else None
        self._selective = selective

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False
        self._offloaded_checkpoint = None

    def run_block(self, block: nn.Module, *args, **kwargs):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            if self._offloaded_checkpoint is not None:
                return self._offloaded_checkpoint(block, *args, **kwargs)
            if self._selective and isinstance(block, OptimizedModule):
                backend = getattr(block, "compile_backend", "inductor")   # set by compile_blocks
                return _compiled_selective_checkpoint(backend)(block._orig_mod, *args, **kwargs)
            contexts = _selective_contexts if self._selective else _contexts
            return checkpoint(block, *args, use_reentrant=False, context_fn=contexts, **kwargs)
        return block(*args, **kwargs)
