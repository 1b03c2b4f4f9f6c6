"""library/block_checkpointing.py: --keep_attention_outputs keeps each checkpointed block's
attention output, so the recomputation before its backward runs every op but the attention
kernel; outputs and LoRA gradients are those of plain checkpointing (tiny FLUX, CPU)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from library.block_checkpointing import ATTENTION_OPS
from tests.test_offload import flux_inputs, max_grad_diff, tiny_flux_with_lora, train_step


class CountAttentionKernels(TorchDispatchMode):
    """Counts attention ops that really run: selective checkpointing's own mode sits above this
    one and answers a kept op from its store without passing it down."""

    def __init__(self):
        super().__init__()
        self.runs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.runs += func in ATTENTION_OPS
        return func(*args, **(kwargs or {}))


ON_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                           reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
@pytest.mark.parametrize("fp8", [False, True])
def test_kept_attention_outputs_skip_the_recomputed_attention_and_change_nothing(fp8, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32   # bf16 on CUDA: the cuDNN kernels
    params, model, net = tiny_flux_with_lora(depth=2, single=3, fp8=fp8, device=device, dtype=dtype)
    x = flux_inputs(params, device=device, dtype=dtype)
    blocks = len(model.double_blocks) + len(model.single_blocks)
    results = {}
    for keep in (False, True):
        model.enable_gradient_checkpointing(keep_attention=keep)
        with CountAttentionKernels() as counter:
            results[keep] = train_step(model, net, x)
        assert counter.runs == (1 if keep else 2) * blocks, (keep, counter.runs)
    (out_plain, grads_plain), (out_kept, grads_kept) = results[False], results[True]
    assert torch.equal(out_kept, out_plain)
    assert max_grad_diff(grads_kept, grads_plain) < 1e-6


def test_offloaded_checkpoints_cannot_keep_attention():
    _, model, _ = tiny_flux_with_lora(depth=1, single=1)
    with pytest.raises(ValueError, match="keep_attention needs the GPU-side checkpoint"):
        model.enable_gradient_checkpointing(cpu_offload=True, keep_attention=True)
