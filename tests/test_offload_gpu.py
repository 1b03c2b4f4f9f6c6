"""Block swap and offloaded checkpointing on CUDA: the asynchronous copies give the same
outputs and LoRA gradients as no swap, step after step (skipped without a GPU)."""

from __future__ import annotations

import types
from dataclasses import replace

import pytest
import torch

from library.offload import BlockSwap
from library.offload_checkpointing import OffloadedCheckpoint
from tests.test_offload import flux_inputs, max_grad_diff, poisoned_block_swap, train_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def assert_same_step(out, grads, ref_out, ref_grads):
    """Equal up to the run-to-run noise of GPU kernels (attention backward may use atomics): a
    block read while its weights were being replaced, or a NaN poison, is far outside it."""
    torch.testing.assert_close(out, ref_out)
    scale = max(float(g.float().abs().max()) for g in ref_grads.values())
    rel = 1e-4 if out.dtype == torch.float32 else 1e-2
    assert max_grad_diff(grads, ref_grads) <= rel * scale

# Wider than the CPU tests' model, so each copy takes long enough to race with compute if the
# stream ordering were wrong: 6 double + 8 single blocks of width 1024 (8 heads of 128).
WIDE = dict(hidden_size=1024, num_heads=8)


def _wide_flux(dtype, fp8=False):
    from library.fp8 import quantize_linears_
    from library.tiny.flux import build_flux_model, tiny_flux_params
    from networks import lora_flux

    params = replace(tiny_flux_params("dev"), depth=6, depth_single_blocks=8, **WIDE)
    model = build_flux_model(params, device="cuda", dtype=dtype).requires_grad_(False)
    if fp8:
        quantize_linears_(model, [model.double_blocks, model.single_blocks], compute_dtype=dtype)
    net = lora_flux.create_network(1.0, 8, 8.0, None, None, model)
    net.apply_to(None, model, apply_text_encoder=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in net.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=gen) * 0.02)
    net.to("cuda")
    return params, model, net


@pytest.mark.parametrize("dtype, fp8", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16", "fp8"])
def test_swap_matches_no_swap_on_cuda_with_checkpointing(dtype, fp8):
    params, model, net = _wide_flux(dtype, fp8)
    model.enable_gradient_checkpointing()
    x = flux_inputs(params, h=16, w=16, n_txt=32, device="cuda", dtype=dtype)
    ref_out, ref_grads = train_step(model, net, x)
    with torch.no_grad():
        ref_sample = model(**x)
    model.to("cpu")                       # as loaded; prepare moves what stays to the GPU
    swap = poisoned_block_swap("cuda", [(model.double_blocks, 4), (model.single_blocks, 6)])
    swap.prepare(model)
    assert model.img_in.weight.is_cuda and not model.double_blocks[5].img_attn.qkv.weight.is_cuda
    assert model.double_blocks[5].img_attn.qkv.bias.is_cuda          # vectors stay on the GPU
    for _ in range(3):
        out, grads = train_step(model, net, x)
        assert_same_step(out, grads, ref_out, ref_grads)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(model(**x), ref_sample)
    torch.cuda.synchronize()
    assert swap.stats.fallback_loads == 0 and swap.stats.restores == 0


def test_swap_without_checkpointing_on_cuda():
    params, model, net = _wide_flux(torch.float32)
    x = flux_inputs(params, h=8, w=8, n_txt=16, device="cuda")
    ref_out, ref_grads = train_step(model, net, x)
    swap = poisoned_block_swap("cuda", [(model.double_blocks, 3), (model.single_blocks, 4)])
    swap.prepare(model)
    for _ in range(2):
        out, grads = train_step(model, net, x)
        assert_same_step(out, grads, ref_out, ref_grads)
    assert swap.stats.fallback_loads == 0


def test_gpu_memory_drops_by_the_swapped_blocks_and_buffers_are_reused():
    params, model, _ = _wide_flux(torch.bfloat16)
    model.enable_gradient_checkpointing()
    torch.cuda.synchronize()
    full = torch.cuda.memory_allocated()
    per_double = sum(t.numel() * t.element_size() for n, t in model.double_blocks[0].named_parameters() if t.ndim >= 2)
    per_single = sum(t.numel() * t.element_size() for n, t in model.single_blocks[0].named_parameters() if t.ndim >= 2)
    swap = BlockSwap("cuda", [(model.double_blocks, 4), (model.single_blocks, 6)])
    swap.prepare(model)
    torch.cuda.synchronize()
    saved = full - torch.cuda.memory_allocated()
    expected = 4 * per_double + 6 * per_single
    assert expected <= saved <= expected + 4 * 2**20     # (allocator rounding of small tensors)
    buffers = [s.device_buffers() for s in swap.swappers]
    x = flux_inputs(params, h=8, w=8, n_txt=16, device="cuda", dtype=torch.bfloat16)
    x["img"].requires_grad_(True)
    for _ in range(2):
        model(**x).float().square().mean().backward()
    assert [s.device_buffers() for s in swap.swappers] == buffers
    assert all(h.is_pinned() for s in swap.swappers for b in s.rotating for h in s.blocks[b].home)


def test_offloaded_checkpointing_on_cuda_matches_plain():
    params, model, net = _wide_flux(torch.bfloat16)
    x = flux_inputs(params, h=16, w=16, n_txt=32, device="cuda", dtype=torch.bfloat16)
    model.enable_gradient_checkpointing()
    ref_out, ref_grads = train_step(model, net, x)
    ckpt = OffloadedCheckpoint()
    model.run_block = types.MethodType(lambda self, block, *a, **k: ckpt(block, *a, **k), model)
    for _ in range(2):
        out, grads = train_step(model, net, x)
        assert_same_step(out, grads, ref_out, ref_grads)
