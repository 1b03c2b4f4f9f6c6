"""library/qk_norm_rope.py: the fused q/k norm + RoPE + joint-sequence kernels give the unfused
FLUX ops' numbers and gradients. On the CPU through Triton's interpreter (where Triton is
installed; it is not a requirement), on CUDA for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from einops import rearrange

from library.block_ops import rms_norm
from library.flux.layers import apply_rope, rope_frequencies

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton")


def reference(streams, freqs, heads):
    """The unfused ops of library/flux/layers.py: per stream q/k RMSNorm, the joint sequence,
    RoPE."""
    qs, ks, vs = [], [], []
    for qkv, q_scale, k_scale in streams:
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=heads)
        qs.append(rms_norm(q, q_scale, 1e-6).to(v.dtype))
        ks.append(rms_norm(k, k_scale, 1e-6).to(v.dtype))
        vs.append(v)
    q, k, v = (torch.cat(x, dim=2) for x in (qs, ks, vs))
    return apply_rope(q, freqs), apply_rope(k, freqs), v


def compare(device: str, dtype: torch.dtype, *, batch=2, heads=3, head_dim=16, lengths=(3, 5)) -> None:
    """Two streams (the second a column slice of a wider output, as a single block's qkv is), a
    batch whose samples have their own RoPE positions; values and input gradients."""
    from library.qk_norm_rope import qk_norm_rope

    torch.manual_seed(0)
    width = 3 * heads * head_dim
    streams, leaves = [], []
    for n, extra in zip(lengths, (0, 7)):
        full = torch.randn(batch, n, width + extra, dtype=dtype, device=device, requires_grad=True)
        leaves.append(full)
        scales = [(torch.rand(head_dim, device=device) + 0.5).to(dtype) for _ in range(2)]
        streams.append((full[..., :width], *scales))
    pos = torch.arange(sum(lengths), device=device).float()[None] + torch.arange(batch, device=device)[:, None]
    freqs = rope_frequencies(pos, head_dim, 10000).unsqueeze(1)
    out, ref = qk_norm_rope(streams, freqs, heads), reference(streams, freqs, heads)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=4e-2)   # bf16: a rounding step
    for a, b in zip(out, ref):
        assert a.shape == b.shape and a.is_contiguous()
        torch.testing.assert_close(a, b, **tol)
    grads = [torch.randn_like(t) for t in out]
    for a, b in zip(torch.autograd.grad(out, leaves, grads), torch.autograd.grad(ref, leaves, grads)):
        torch.testing.assert_close(a, b, **tol)


def compare_flux_model(device: str) -> None:
    """A tiny FLUX.1 with a LoRA: the same outputs and LoRA gradients with the fused kernels."""
    from library.flux import layers
    from tests.test_offload import flux_inputs, max_grad_diff, tiny_flux_with_lora, train_step

    params, model, net = tiny_flux_with_lora(depth=2, single=2, device=device)
    x = flux_inputs(params, device=device)
    layers.FUSED_QK_ROPE = False
    ref_out, ref_grads = train_step(model, net, x)
    layers.FUSED_QK_ROPE = True
    try:
        out, grads = train_step(model, net, x)
    finally:
        layers.FUSED_QK_ROPE = False
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    assert max_grad_diff(grads, ref_grads) < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "model"])
def test_fused_kernels_match_the_unfused_ops_in_the_interpreter(dtype):
    # Triton's interpreter must be on before the kernels' module is imported: a fresh process
    code = ("from tests.test_qk_norm_rope import compare_flux_model; compare_flux_model('cpu')" if dtype == "model"
            else f"from tests.test_qk_norm_rope import compare; import torch; compare('cpu', torch.{dtype})")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_match_the_unfused_ops_on_cuda(dtype):
    compare("cuda", dtype)
    compare("cuda", dtype, batch=1, heads=24, head_dim=128, lengths=(512, 256))   # FLUX's head shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flux_model_with_the_fused_kernels_on_cuda():
    compare_flux_model("cuda")
