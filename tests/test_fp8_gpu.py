"""fp8 base weights on CUDA: error against bf16, and the scaled fp8 matmul (torch._scaled_mm)
against the upcast path (skipped without a GPU; the scaled path needs fp8 tensor cores)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from library.fp8 import _wants_scaled_mm, dequantized_weight, quantize_linears_, scaled_mm_kind

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
needs_fp8_cores = pytest.mark.skipif(
    not torch.cuda.is_available() or scaled_mm_kind("cuda") is None,
    reason="needs a GPU with fp8 tensor cores (compute capability >= 8.9)")


def _layer_pair(k=3072, n=3072, matmul="upcast", seed=0):
    torch.manual_seed(seed)
    ref = nn.Linear(k, n, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    nn.init.normal_(ref.weight, std=k ** -0.5)
    fp8 = nn.Linear(k, n, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    fp8.load_state_dict(ref.state_dict())
    quantize_linears_(nn.Sequential(fp8), [fp8], matmul=matmul)
    return ref, fp8


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def test_fp8_upcast_error_against_bf16_is_within_bounds():
    ref, fp8 = _layer_pair()
    x = torch.randn(4096, 3072, device="cuda", dtype=torch.bfloat16)
    # e4m3 rounds each weight by up to 2^-4 relative, about 2.7% RMS, and the output error of a
    # long dot product is about the same (2.66% measured on the CPU in fp32).
    assert _rel(fp8(x), ref(x)) < 0.04
    assert _rel(dequantized_weight(fp8), ref.weight) < 0.04


@needs_fp8_cores
def test_scaled_mm_path_equals_upcast_within_activation_rounding():
    _, up = _layer_pair(matmul="upcast")
    _, sc = _layer_pair(matmul="scaled")
    x = torch.randn(4096, 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    assert _wants_scaled_mm("scaled", x, sc.weight) and not _wants_scaled_mm("upcast", x, up.weight)
    y_up, y_sc = up(x), sc(x2)
    assert _rel(y_sc, y_up) < 0.04          # the activation is rounded to e4m3 per row as well
    g = torch.randn_like(y_up)
    y_up.backward(g)
    y_sc.backward(g)
    assert _rel(x2.grad, x.grad) < 1e-2     # backward uses the same upcast weight in both


@needs_fp8_cores
def test_auto_uses_scaled_mm_for_token_matmuls_only():
    _, auto = _layer_pair(matmul="auto")
    tokens = torch.randn(1, 4096, 3072, device="cuda", dtype=torch.bfloat16)
    vec = torch.randn(1, 3072, device="cuda", dtype=torch.bfloat16)
    assert _wants_scaled_mm("auto", tokens, auto.weight)
    assert not _wants_scaled_mm("auto", vec, auto.weight)          # modulation: one row per sample
    assert not _wants_scaled_mm("auto", tokens[:, :100], auto.weight)   # rows not a multiple of 16
    assert auto(tokens).shape == (1, 4096, 3072) and auto(vec).shape == (1, 3072)


def test_fp8_model_memory_and_output_on_cuda():
    from dataclasses import replace

    from library.tiny.flux import build_flux_model, tiny_flux_params
    from tests.test_offload import flux_inputs

    params = replace(tiny_flux_params("dev"), depth=4, depth_single_blocks=4, hidden_size=1024, num_heads=8)
    model = build_flux_model(params, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    x = flux_inputs(params, h=16, w=16, n_txt=32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(**x)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    report = quantize_linears_(model, [model.double_blocks, model.single_blocks])
    torch.cuda.synchronize()
    block_bytes = report.bytes_before - report.bytes_after
    assert before - torch.cuda.memory_allocated() >= 0.9 * block_bytes    # the bf16 weights are freed
    with torch.no_grad():
        out = model(**x)
    assert _rel(out, ref) < 0.1


@needs_fp8_cores
def test_fused_activation_quantiser_matches_the_eager_one():
    from library.fp8 import _quantize_rows_fused, quantize_rows

    rows = torch.rand(4608, 1, device="cuda", dtype=torch.bfloat16)      # tokens of different sizes
    x = torch.randn(4608, 3072, device="cuda", dtype=torch.bfloat16) * rows
    for rowwise in (True, False):
        q, s = _quantize_rows_fused(x, rowwise)
        q_ref, s_ref = quantize_rows(x, rowwise)
        assert torch.equal(s, s_ref) and torch.equal(q.float(), q_ref.float())
        assert _rel(q.float() * s, x) < 0.04


def test_recorded_upcast_runs_the_vectorised_kernel_and_gives_the_same_bits(monkeypatch):
    # --cuda_graph: while recording, fp8 weights are upcast by library/fp8_upcast_kernel.py
    import library.fp8 as fp8

    pytest.importorskip("triton")
    calls = []
    kernel = fp8._upcast_kernel()
    monkeypatch.setattr(fp8, "_upcast_kernel", lambda: type("Spy", (), {
        "__getitem__": lambda self, grid: (lambda *a, **k: calls.append(grid) or kernel[grid](*a, **k))})())
    torch.manual_seed(0)
    w = (torch.randn(3072, 12288 + 5, device="cuda") * 40).to(torch.float8_e4m3fn)   # odd size: masked tail
    eager = fp8._upcast(w, torch.bfloat16)
    assert not calls, "eager steps keep PyTorch's copy (a Triton launch costs the host more)"
    warm = torch.cuda.Stream()
    with torch.cuda.stream(warm):
        fp8._upcast(w, torch.bfloat16)
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recorded = fp8._upcast(w, torch.bfloat16)
    graph.replay()
    torch.cuda.synchronize()
    assert len(calls) == 1
    assert torch.equal(recorded, eager) and torch.equal(recorded, w.to(torch.bfloat16))
