"""library/block_ops.py: the fused elementwise pieces equal the plain formulas they replace,
in value and in gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from library import block_ops


def grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def assert_same(fused, plain, *tensors, atol=1e-5):
    out_f, g_f = grads(fused, *tensors)
    out_p, g_p = grads(plain, *tensors)
    torch.testing.assert_close(out_f, out_p, atol=atol, rtol=atol)
    for a, b in zip(g_f, g_p):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)


def test_rms_norm_equals_the_formula():
    x, scale = torch.randn(2, 7, 64), 1 + 0.1 * torch.randn(64)

    def plain(x, scale):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * scale

    assert_same(lambda x, s: block_ops.rms_norm(x, s, 1e-6), plain, x, scale)


def plain_rope(x, freqs):
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = freqs[..., 0], freqs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).reshape(x.shape).type_as(x)


def test_rotate_pairs_as_a_complex_product_equals_the_pairwise_formula():
    x = torch.randn(2, 3, 5, 8)
    angles = torch.randn(2, 1, 5, 4)
    freqs = torch.stack((angles.cos(), angles.sin()), dim=-1)
    assert_same(lambda x: block_ops.rotate_pairs(x, freqs), lambda x: plain_rope(x, freqs), x)
    # a non-contiguous angle table is accepted too
    wide = torch.stack((angles.cos(), angles.sin(), angles), dim=-1)[..., :2]
    torch.testing.assert_close(block_ops.rotate_pairs(x, wide), plain_rope(x, freqs))


def test_rotate_pairs_keeps_the_input_dtype():
    x = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16)
    freqs = torch.stack((torch.ones(1, 1, 3, 4), torch.zeros(1, 1, 3, 4)), dim=-1)
    out = block_ops.rotate_pairs(x, freqs)
    assert out.dtype == torch.bfloat16 and torch.equal(out, x)   # zero angles: the identity


@pytest.mark.parametrize("batch, mod_batch", [(1, 1), (3, 3), (3, 1)])
def test_modulated_layer_norm_equals_the_formula(batch, mod_batch):
    x = torch.randn(batch, 6, 32)
    shift, scale = 0.1 * torch.randn(mod_batch, 1, 32), 0.1 * torch.randn(mod_batch, 1, 32)

    def plain(x, shift, scale):
        return (1 + scale) * F.layer_norm(x, (32,), eps=1e-6) + shift

    assert_same(lambda x, sh, sc: block_ops.modulated_layer_norm(x, sh, sc, 1e-6), plain, x, shift, scale)


@pytest.mark.parametrize("batch", [1, 3])
def test_modulated_layer_norm_without_shift(batch):
    x, scale = torch.randn(batch, 6, 32), 0.1 * torch.randn(batch, 1, 32)
    assert_same(lambda x, sc: block_ops.modulated_layer_norm(x, None, sc, 1e-6),
                lambda x, sc: (1 + sc) * F.layer_norm(x, (32,), eps=1e-6), x, scale)


def test_modulated_layer_norm_runs_in_the_activation_dtype_under_autocast():
    # autocast would run layer_norm in float32 and hand a float32 copy to the next Linear
    x = torch.randn(1, 4, 16, dtype=torch.bfloat16)
    shift, scale = torch.zeros(1, 1, 16, dtype=torch.bfloat16), torch.zeros(1, 1, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block_ops.modulated_layer_norm(x, shift, scale)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.layer_norm(x.float(), (16,), eps=1e-6), atol=2e-2, rtol=2e-2)


def test_gated_residual_equals_the_formula_and_promotes_like_it():
    x, gate, y = torch.randn(2, 5, 16), torch.randn(2, 1, 16), torch.randn(2, 5, 16)
    assert_same(block_ops.gated_residual, lambda x, g, y: x + g * y, x, gate, y)
    mixed = block_ops.gated_residual(x.bfloat16(), gate.bfloat16(), y)
    assert mixed.dtype == (x.bfloat16() + gate.bfloat16() * y).dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_ops_on_cuda_in_bf16_under_autocast_match_float32():
    # the fused CUDA kernels (rms_norm, layer_norm with affine, complex multiply) against the
    # plain formulas in float32, at FLUX's head and width sizes
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(1, 24, 300, 128, device=dev)
    angles = torch.randn(1, 1, 300, 64, device=dev)
    freqs = torch.stack((angles.cos(), angles.sin()), dim=-1)
    x = torch.randn(1, 300, 3072, device=dev)
    shift, scale = 0.1 * torch.randn(1, 1, 3072, device=dev), 0.1 * torch.randn(1, 1, 3072, device=dev)
    gain = 1 + 0.1 * torch.randn(128, device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        rope = block_ops.rotate_pairs(q.bfloat16(), freqs)
        norm = block_ops.rms_norm(q.bfloat16(), gain)
        mod = block_ops.modulated_layer_norm(x.bfloat16(), shift.bfloat16(), scale.bfloat16())
    assert rope.dtype == norm.dtype == mod.dtype == torch.bfloat16
    torch.testing.assert_close(rope.float(), plain_rope(q, freqs), atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(norm.float(), q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * gain,
                               atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(mod.float(), (1 + scale) * F.layer_norm(x, (3072,), eps=1e-6) + shift,
                               atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("batch, mod_batch", [(1, 1), (3, 3), (3, 1)])
def test_modulated_rms_norm_equals_the_formula(batch, mod_batch):
    x, weight = torch.randn(batch, 6, 32), 1 + 0.1 * torch.randn(32)
    scale = 0.1 * torch.randn(mod_batch, 1, 32)

    def plain(x, w, s):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w * (1 + s)

    assert_same(lambda x, w, s: block_ops.modulated_rms_norm(x, w, s, 1e-6), plain, x, weight, scale)


def test_rotate_halves_equals_the_rotate_half_formula():
    x = torch.randn(2, 5, 3, 8)                      # (B, L, H, D)
    angles = torch.randn(5, 4).repeat(1, 2)          # (L, D): the halves repeat
    cos, sin = angles.cos(), angles.sin()

    def plain(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos[None, :, None] + torch.cat((-x2, x1), dim=-1) * sin[None, :, None]

    assert_same(lambda x: block_ops.rotate_halves(x, cos, sin), plain, x)
