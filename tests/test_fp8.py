"""fp8 base weights (library/fp8.py) on the CPU: quantisation error bounds, which layers are
converted, LoRA on an fp8 Linear, no upcast weight kept by autograd, and fp8 with block swap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from library.errors import ConfigError
from library.fp8 import (
    FP8,
    FP8_MAX,
    dequantize_weight,
    dequantized_weight,
    is_fp8_linear,
    quantize_linears_,
    quantize_weight,
)
from networks.lora_core import LoRAModule
from tests.test_offload import flux_inputs, max_grad_diff, poisoned_block_swap, tiny_flux_with_lora, train_step


def test_quantize_weight_error_is_within_half_an_e4m3_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * 0.02
    w[0, 0] = 0.3                                        # an outlier sets the scale
    q, scale = quantize_weight(w)
    assert q.dtype == FP8 and q.shape == w.shape
    assert scale == 2.0 ** -10                           # the power of two at or above 0.3 / 448
    assert float(q.float().abs().max()) <= FP8_MAX
    err = (dequantize_weight(q, scale) - w).abs()
    # 3 mantissa bits: half a step is 2^-4 of the value; subnormals (below 2^-6) step by 2^-9.
    bound = torch.maximum(w.abs() * 2.0 ** -4, torch.full_like(w, scale * 2.0 ** -10))
    assert bool((err <= bound * (1 + 1e-6)).all())
    rel_rms = float(err.square().mean().sqrt() / w.square().mean().sqrt())
    assert rel_rms < 0.03


def test_quantize_weight_uses_the_range_better_than_a_plain_cast():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(1)) * 1e-3   # tiny weights
    q, scale = quantize_weight(w)
    ours = (dequantize_weight(q, scale) - w).square().mean().sqrt()
    plain = (w.to(FP8).float() - w).square().mean().sqrt()     # sd-scripts' cast: into the subnormals
    assert ours < plain / 4


def test_fp8_weights_are_taken_as_they_are_and_other_fp8_kinds_refused():
    w = torch.randn(8, 8).to(FP8)
    q, scale = quantize_weight(w)
    assert q is w and scale == 1.0
    with pytest.raises(ConfigError, match="float8_e4m3fn, not torch.float8_e5m2"):
        quantize_weight(torch.randn(8, 8).to(torch.float8_e5m2))


def test_quantize_linears_converts_block_linears_only_and_keeps_state_dict_keys():
    params, model, _ = _tiny_flux()
    keys = list(model.state_dict())
    x = flux_inputs(params)
    with torch.no_grad():
        ref = model(**x)
    report = quantize_linears_(model, [model.double_blocks, model.single_blocks], compute_dtype=torch.float32)
    assert list(model.state_dict()) == keys                      # the scale buffer is not persistent
    assert is_fp8_linear(model.double_blocks[0].img_attn.qkv) and is_fp8_linear(model.single_blocks[1].linear2)
    assert is_fp8_linear(model.double_blocks[0].img_mod.lin)     # modulation too (a third of a block)
    assert model.double_blocks[0].img_attn.qkv.weight.dtype == FP8
    assert model.double_blocks[0].img_attn.qkv.bias.dtype == torch.float32
    for name in ("img_in", "txt_in", "time_in.in_layer", "final_layer.linear", "final_layer.adaLN_modulation.1"):
        layer = model.get_submodule(name)
        assert not is_fp8_linear(layer) and layer.weight.dtype == torch.float32, name
    n_block_linears = sum(isinstance(m, nn.Linear) for b in (model.double_blocks, model.single_blocks)
                          for m in b.modules())
    assert report.quantized == n_block_linears
    assert report.bytes_after < 0.35 * report.bytes_before      # fp32 -> fp8 in the blocks (tiny: big embedders)
    assert "Linear layers in float8_e4m3fn" in str(report)
    with torch.no_grad():
        out = model(**x)
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.08                                         # fp8 noise through 4 blocks (measured 0.039)


def test_keep_patterns_and_fp8_files_outside_the_blocks():
    params, model, _ = _tiny_flux()
    model.txt_in.weight.data = model.txt_in.weight.data.to(FP8)   # as loaded from an fp8 file
    block_w = model.double_blocks[0].img_mlp[0].weight
    block_w.data = block_w.data.to(FP8)
    report = quantize_linears_(model, [model.double_blocks, model.single_blocks], keep=[r"\.img_mod\."],
                               compute_dtype=torch.bfloat16)
    assert model.txt_in.weight.dtype == torch.bfloat16            # widened: stays high precision
    assert not is_fp8_linear(model.double_blocks[0].img_mod.lin)
    assert is_fp8_linear(model.double_blocks[0].txt_mod.lin)
    assert model.double_blocks[0].img_mlp[0]._fp8_scale == 1.0   # fp8 file weight taken as is
    assert report.kept > 0


def test_bad_modes_and_order_are_refused():
    _, model, net = tiny_flux_with_lora(depth=1, single=1)        # LoRA already applied
    with pytest.raises(RuntimeError, match="convert to fp8 before applying a LoRA"):
        quantize_linears_(model, [model.double_blocks])
    with pytest.raises(ConfigError, match="one of auto, scaled, upcast"):
        quantize_linears_(nn.Linear(4, 4), [], matmul="fast")
    layer = nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="weight is trainable"):
        quantize_linears_(nn.Sequential(layer), [layer])


def _fp8_and_reference_linears(dtype=torch.float32):
    """An fp8 Linear and a plain Linear holding its dequantised weight, both with a LoRA."""
    torch.manual_seed(0)
    fp8 = nn.Linear(32, 48).requires_grad_(False)
    quantize_linears_(nn.Sequential(fp8), [fp8], compute_dtype=dtype)
    ref = nn.Linear(32, 48).requires_grad_(False)
    ref.weight.data = dequantized_weight(fp8)
    ref.bias.data = fp8.bias.data.clone()
    loras = []
    for layer in (fp8, ref):
        lora = LoRAModule("lora_test", layer, 4, 2.0)
        torch.manual_seed(1)
        nn.init.normal_(lora.lora_up.weight, std=0.1)
        nn.init.normal_(lora.lora_down.weight, std=0.1)
        lora.apply()
        loras.append(lora)
    return fp8, ref, loras


def test_lora_on_an_fp8_linear_gets_the_gradients_of_the_dequantised_weight():
    fp8, ref, (lora8, lora_ref) = _fp8_and_reference_linears()
    x = torch.randn(3, 5, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y8, yr = fp8(x), ref(x2)
    torch.testing.assert_close(y8, yr, rtol=1e-5, atol=1e-5)
    (y8 * torch.linspace(-1, 1, 48)).sum().backward()
    (yr * torch.linspace(-1, 1, 48)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for a, b in ((lora8.lora_up, lora_ref.lora_up), (lora8.lora_down, lora_ref.lora_down)):
        torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-5, atol=1e-5)
    assert fp8.weight.grad is None and fp8.bias.grad is None      # the base stays frozen


def test_autograd_keeps_the_fp8_weight_not_an_upcast_copy():
    fp8, _, _ = _fp8_and_reference_linears()
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fp8(torch.randn(4, 32, requires_grad=True))
    weights = [s for s in saved if s[1] == (48, 32)]
    assert weights == [(FP8, (48, 32))]


def test_autocast_runs_the_fp8_layer_in_the_autocast_dtype():
    fp8, ref, _ = _fp8_and_reference_linears()
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref(x), rtol=0.05, atol=0.05)


def test_fp8_model_with_block_swap_matches_fp8_without():
    params, model, net = tiny_flux_with_lora(fp8=True)
    model.enable_gradient_checkpointing()
    x = flux_inputs(params)
    ref_out, ref_grads = train_step(model, net, x)
    swap = poisoned_block_swap("cpu", [(model.double_blocks, 2), (model.single_blocks, 4)])
    swap.prepare(model)
    assert "img_attn.qkv.weight" in swap.swappers[0].names                  # the fp8 matrices move
    assert model.double_blocks[4].img_attn.qkv.weight.dtype == FP8
    out, grads = train_step(model, net, x)
    assert torch.equal(out, ref_out) and max_grad_diff(grads, ref_grads) == 0.0
    assert swap.stats.fallback_loads == 0


def test_a_recomputed_block_keeps_its_upcast_weights_for_its_backward(monkeypatch):
    # Per fp8 layer and step with checkpointing: upcast in the forward, in the recomputation,
    # and (before) again in the backward. The recomputation now keeps its upcast copy for the
    # backward: the same numbers, one upcast fewer.
    from torch.utils._python_dispatch import TorchDispatchMode

    import library.block_checkpointing as bc

    class CountUpcasts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].dtype == FP8:
                CountUpcasts.count += 1
            return func(*args, **(kwargs or {}))

    params, model, net = tiny_flux_with_lora(depth=2, single=2, fp8=True)
    model.enable_gradient_checkpointing()
    x = flux_inputs(params)
    layers = sum(is_fp8_linear(m) for m in model.modules())

    def run():
        CountUpcasts.count = 0
        with CountUpcasts():
            result = train_step(model, net, x)
        return result, CountUpcasts.count

    (out, grads), upcasts = run()
    assert upcasts == 2 * layers
    from contextlib import nullcontext
    monkeypatch.setattr(bc, "_contexts", lambda: (nullcontext(), nullcontext()))   # as before
    (ref_out, ref_grads), ref_upcasts = run()
    # before: a third upcast in the backward, except for the 6 modulation layers, whose input
    # (the conditioning vector) needs no gradient
    assert ref_upcasts == 3 * layers - 6
    assert torch.equal(out, ref_out) and max_grad_diff(grads, ref_grads) == 0.0


def _tiny_flux():
    from dataclasses import replace

    from library.tiny.flux import build_flux_model, tiny_flux_params

    params = replace(tiny_flux_params("dev"), depth=2, depth_single_blocks=2)
    model = build_flux_model(params).requires_grad_(False)
    return params, model, None


def test_module_forward_is_per_instance_so_lora_finds_plain_linears():
    layer = nn.Linear(16, 16).requires_grad_(False)
    quantize_linears_(nn.Sequential(layer), [layer])
    assert type(layer) is nn.Linear and "forward" in layer.__dict__
    lora = LoRAModule("lora_x", layer, 2, 1.0)
    lora.apply()
    lora.restore()
    assert layer.forward.__func__.__name__ == "_fp8_linear_forward"   # restore puts the fp8 forward back
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    expected = F.linear(x, dequantized_weight(layer, torch.bfloat16), layer.bias.to(torch.bfloat16))
    torch.testing.assert_close(layer(x), expected, rtol=0.02, atol=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("selective", [False, True])
def test_compiled_fp8_blocks_share_their_graphs_whatever_their_scales(selective):
    # --torch_compile: a layer's float scale would be a constant of its block's graph, so blocks
    # whose layers have other scales would each compile again (and the compiled selective
    # checkpoint would run eager past 8 graphs). Compiled, the scale is read from its tensor: one
    # graph per block kind, and the eager outputs and gradients (power-of-two scales: exact).
    import random

    import torch._dynamo
    from torch._dynamo.utils import counters

    from library.training.trainer import compile_blocks

    params, model, net = tiny_flux_with_lora(depth=3, single=4, fp8=True)
    rng = random.Random(0)
    for module in model.modules():   # the tiny weights' scales barely differ: make them
        if is_fp8_linear(module):
            module._fp8_scale = 2.0 ** rng.randint(-12, -6)
            module.weight_scale.fill_(module._fp8_scale)
    x = flux_inputs(params)
    model.enable_gradient_checkpointing(selective=selective)
    out_eager, grads_eager = train_step(model, net, x)
    torch._dynamo.reset()
    compile_blocks([model.double_blocks, model.single_blocks], "aot_eager")
    counters.clear()
    try:
        out, grads = train_step(model, net, x)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs <= 3, graphs   # double, single (and the selective checkpoint's wrapper)
    assert torch.equal(out, out_eager) and max_grad_diff(grads, grads_eager) == 0.0
