"""Offloaded activation checkpointing (library/offload_checkpointing.py) on the CPU: same
outputs and gradients as no checkpointing, RNG and autocast replayed, what is copied."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from library.offload_checkpointing import OffloadedCheckpoint
from tests.test_offload import flux_inputs, max_grad_diff, tiny_flux_with_lora, train_step


def _use_offloaded_checkpointing(model) -> OffloadedCheckpoint:
    ckpt = OffloadedCheckpoint()
    model.run_block = types.MethodType(lambda self, block, *a, **k: ckpt(block, *a, **k), model)
    return ckpt


def test_flux_with_offloaded_checkpointing_matches_plain_training():
    params, model, net = tiny_flux_with_lora(depth=3, single=3)
    x = flux_inputs(params)
    ref_out, ref_grads = train_step(model, net, x)
    _use_offloaded_checkpointing(model)
    out, grads = train_step(model, net, x)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    # Every LoRA gets its gradient, also in the first block, whose inputs need no grad.
    assert max_grad_diff(grads, ref_grads) < 1e-6
    assert any("double_blocks_0_" in k for k in grads)
    with torch.no_grad():
        torch.testing.assert_close(model(**x), ref_out, rtol=0, atol=0)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.seen = []         # the `table` argument of each call
        self.dtypes = []       # the dtype the Linear ran in, per call

    def forward(self, x, table, *, scale: float = 1.0, drop: float = 0.0):
        self.seen.append(table)
        y = self.lin(x)
        self.dtypes.append(y.dtype)
        h = F.dropout(y * table, p=drop, training=drop > 0) * scale
        return h, {"aux": h.sum(-1), "note": "kept"}


def _grads(block, x):
    return {n: p.grad.clone() for n, p in block.named_parameters()} | {"x": x.grad.clone()}


def _run(block, x, table, use_ckpt, seed=3, autocast=False, **kw):
    torch.manual_seed(seed)
    block.zero_grad(set_to_none=True)
    x.grad = None
    fn = OffloadedCheckpoint() if use_ckpt else (lambda f, *a, **k: f(*a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):   # forward only, as in training
        h, extra = fn(block, x, table, **kw)
    assert extra["note"] == "kept"
    (h.square().sum() + extra["aux"].sum()).backward()
    return h.detach(), _grads(block, x)


def test_kwargs_non_tensor_outputs_and_dropout_rng_replayed():
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(4, 8, requires_grad=True)
    table = torch.randn(8)
    h_ref, g_ref = _run(block, x, table, False, scale=2.0, drop=0.5)
    h, g = _run(block, x, table, True, scale=2.0, drop=0.5)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], rtol=0, atol=0)


def test_tensors_without_grad_are_passed_by_reference_not_copied():
    block = Block()
    x = torch.randn(4, 8, requires_grad=True)
    table = torch.randn(8)
    _run(block, x, table, True)
    # forward and recomputation: the same storage, no copy
    assert len(block.seen) == 2 and all(t.data_ptr() == table.data_ptr() for t in block.seen)


def test_autocast_state_is_replayed_in_the_recomputation():
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(4, 8, requires_grad=True)
    table = torch.randn(8)
    h_ref, g_ref = _run(block, x, table, False, autocast=True)
    h, g = _run(block, x, table, True, autocast=True)
    assert block.dtypes == [torch.bfloat16] * 3    # reference, checkpointed forward, recomputation
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], rtol=0, atol=0)


def test_without_grad_it_is_a_plain_call():
    block = Block()
    with torch.no_grad():
        h, _ = OffloadedCheckpoint()(block, torch.randn(2, 8), torch.ones(8))
    assert h.grad_fn is None and len(block.seen) == 1


@pytest.mark.parametrize("n_blocks", [1, 4])
def test_chain_of_blocks_frees_each_entry_after_its_backward(n_blocks):
    torch.manual_seed(0)
    blocks = [nn.Linear(8, 8) for _ in range(n_blocks)]
    ckpt = OffloadedCheckpoint()
    x = torch.randn(2, 8, requires_grad=True)
    h = x
    for b in blocks:
        h = ckpt(b, h)
    h.sum().backward()
    assert all(b.weight.grad is not None for b in blocks)
    assert ckpt._last is not None and ckpt._last() is None    # the graph and its CPU copies are gone


def test_offloaded_inputs_are_not_held_on_their_device():
    """Once a block has run, only the offloaded copy of its input remains: the checkpoint must
    not keep the original alive (on a GPU that would defeat the offload)."""
    import gc
    import weakref

    checkpoint = OffloadedCheckpoint()
    block = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    hidden = x * 2                      # a block input inside the graph, like the hidden states
    alive = weakref.ref(hidden)
    out = checkpoint(block, hidden)
    del hidden
    gc.collect()
    assert alive() is None
    out.square().sum().backward()
    expected = torch.autograd.grad(block(x * 2).square().sum(), x)[0]
    assert torch.allclose(x.grad, expected)
