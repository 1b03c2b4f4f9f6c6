"""library/block_checkpointing.py: --selective_checkpointing keeps each checkpointed block's
attention outputs and MLP down-projection outputs, so the recomputation before its backward
runs every op but those; outputs and LoRA gradients are those of plain checkpointing (tiny FLUX
on the CPU, and on CUDA where there is one); compiled blocks keep both kinds (the checkpoint is
compiled with the block)."""

from __future__ import annotations

import collections
import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import create_selective_checkpoint_contexts

from library import block_checkpointing as bc
from tests.test_offload import flux_inputs, max_grad_diff, tiny_flux_with_lora, train_step

ON_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                           reason="needs a CUDA device")])


class CountKernels(TorchDispatchMode):
    """Counts the attention ops and width-reducing matmuls that really run (with `blocks_of`,
    inside that model's blocks only: for a plain forward): selective checkpointing's own mode
    sits above this one and answers a kept op from its store without passing it down."""

    def __init__(self, blocks_of=None):
        super().__init__()
        self.attention = self.down = 0
        self.down_shapes = collections.Counter()   # for a failure's report
        self.inside = blocks_of is None
        self.hooks = []
        for block in [*blocks_of.double_blocks, *blocks_of.single_blocks] if blocks_of is not None else []:
            self.hooks.append(block.register_forward_pre_hook(lambda *_: setattr(self, "inside", True)))
            self.hooks.append(block.register_forward_hook(lambda *_: setattr(self, "inside", False)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.inside:
            self.attention += func in bc.ATTENTION_OPS
            if func in (bc._ADDMM, bc._MM) and bc.selective_policy(None, func, *args).name == "MUST_SAVE":
                self.down += 1
                self.down_shapes[str(func), *(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))] += 1
        return func(*args, **(kwargs or {}))

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        return super().__exit__(*exc)


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
@pytest.mark.parametrize("fp8", [False, True])
def test_selective_checkpointing_skips_kept_kernels_and_changes_nothing(fp8, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32   # bf16 on CUDA: the cuDNN kernels
    params, model, net = tiny_flux_with_lora(depth=2, single=3, fp8=fp8, device=device, dtype=dtype)
    x = flux_inputs(params, device=device, dtype=dtype)
    blocks = len(model.double_blocks) + len(model.single_blocks)
    results, counts, shapes = {}, {}, {}
    for selective in (False, True):
        model.enable_gradient_checkpointing(selective=selective)
        with CountKernels() as counter:
            results[selective] = train_step(model, net, x)
        counts[selective], shapes[selective] = (counter.attention, counter.down), counter.down_shapes
    model.disable_gradient_checkpointing()
    with CountKernels(blocks_of=model) as forward:   # with autograd on: a CUDA matmul may take
        model(**x)                                   # another route without it
    # plain: what selective checkpointing keeps runs in the forward and again in the recomputation
    # (the backward's own matmuls are the same either way)
    assert forward.attention == blocks and forward.down > 0
    assert counts[False][0] - counts[True][0] == forward.attention
    assert counts[False][1] - counts[True][1] == forward.down, (shapes[False] - shapes[True], forward.down_shapes)
    (out_plain, grads_plain), (out_kept, grads_kept) = results[False], results[True]
    assert torch.equal(out_kept, out_plain)
    assert max_grad_diff(grads_kept, grads_plain) < 1e-6


def test_the_policy_keeps_attention_and_width_reducing_matmuls_only():
    must = lambda op, *shapes: bc.selective_policy(None, op, *(torch.empty(s) for s in shapes)).name  # noqa: E731
    assert must(bc._ADDMM, (8,), (5, 16), (16, 8)) == "MUST_SAVE"                  # 16 -> 8: a down-projection
    assert must(bc._MM, (5, 16), (16, 9)) == "PREFER_RECOMPUTE"                   # not twofold
    assert must(bc._ADDMM, (32,), (5, 8), (8, 32)) == "PREFER_RECOMPUTE"          # up-projection
    assert must(torch.ops.aten.gelu.default, (5, 8)) == "PREFER_RECOMPUTE"


def _plain_run_then_compiled_selective_blocks():
    """A tiny FLUX with LoRA: one step with plain checkpointing (the reference), then its blocks
    compiled (--torch_compile) and selective checkpointing on."""
    import torch._dynamo

    from library.training.trainer import compile_blocks

    params, model, net = tiny_flux_with_lora(depth=2, single=2)
    x = flux_inputs(params)
    model.enable_gradient_checkpointing()
    out_plain, grads_plain = train_step(model, net, x)
    torch._dynamo.reset()
    compile_blocks([model.double_blocks, model.single_blocks], "inductor")
    model.enable_gradient_checkpointing(selective=True)
    return model, net, x, out_plain, grads_plain


@pytest.mark.slow
def test_compiled_blocks_keep_attention_and_down_projection_outputs(monkeypatch):
    # --torch_compile: the checkpoint is compiled with each block, so the policy sees the matmuls
    # when the graph is traced (compiled code calls them past any dispatch mode); the attention
    # kernel, called through PyTorch, runs once per block. Outputs and gradients as the plain
    # checkpoint's.
    model, net, x, out_plain, grads_plain = _plain_run_then_compiled_selective_blocks()
    kept = []

    def spy(ctx, op, *args, **kwargs):
        policy = bc.selective_policy(ctx, op, *args, **kwargs)
        kept.append(op) if policy.name == "MUST_SAVE" else None
        return policy

    monkeypatch.setattr(bc, "_selective_contexts_fn", functools.partial(create_selective_checkpoint_contexts, spy))
    bc._compiled_selective_checkpoint.cache_clear()
    try:
        train_step(model, net, x)   # compiles
        with CountKernels() as counter:
            out, grads = train_step(model, net, x)
    finally:
        bc._compiled_selective_checkpoint.cache_clear()
    assert bc._ADDMM in kept or bc._MM in kept
    assert counter.attention == len(model.double_blocks) + len(model.single_blocks)   # forward only
    torch.testing.assert_close(out, out_plain, rtol=0, atol=1e-5)
    assert max_grad_diff(grads, grads_plain) < 1e-5
