"""The elementwise pieces of DiT blocks, written to launch few kernels in eager mode.

A profile of the full-size FLUX.1-dev LoRA step on an H200 (docs/benchmarks.md, 2026-12-02)
found more GPU time in elementwise and dtype-copy kernels (0.41 s per step) than in the matrix
multiplies (0.26 s): 22,700 kernels per step, most of them from writing each norm, rotation and
modulation as several PyTorch ops, and from autocast running layer_norm in float32 (a float32
copy of every block's activations, cast back by the next Linear). The functions here do the
same math in fewer, fused kernels:

- `rms_norm`: PyTorch's fused RMSNorm (float32 statistics, one rounding), instead of five ops;
- `rotate_pairs`: RoPE on channel pairs as one complex multiply in float32, instead of ten ops
  on strided halves; under torch.compile the real-arithmetic form (inductor fuses it anyway and
  handles complex tensors poorly);
- `modulated_layer_norm`: (1 + scale) * LayerNorm(x) + shift as the LayerNorm's own affine when
  the batch holds one sample (the fused kernel also reduces the scale/shift gradients), else
  one addcmul; in the activations' dtype, as the reference runs its bf16 model;
- `gated_residual`: x + gate * y as one addcmul;
- `modulated_rms_norm`: RMSNorm(x) * (1 + scale) as one fused RMSNorm whose weight carries the
  modulation when one sample's scale serves every token (Lumina);
- `rotate_halves`: RoPE in the rotate-half convention (channel j with j + D/2; Anima) as one
  complex multiply, the halves paired up by the float32 copy (the plain formula under
  torch.compile, as for `rotate_pairs`).

Norms run with autocast off, in the input's dtype: the kernels accumulate in float32 anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _no_autocast(x: Tensor):
    return torch.autocast(x.device.type, enabled=False)


def rms_norm(x: Tensor, scale: Tensor | None, eps: float = 1e-6) -> Tensor:
    """x * rsqrt(mean(x^2) + eps) * scale over the last dim, statistics in float32."""
    with _no_autocast(x):
        weight = None if scale is None else scale.to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rotate_pairs(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate consecutive channel pairs (x0, x1) of x (..., D) by angles given as
    freqs (..., D/2, 2) = [cos, sin] (broadcast against x): (x0 cos - x1 sin, x0 sin + x1 cos),
    computed in float32, returned in x's dtype."""
    if not torch.compiler.is_compiling():
        # (x0 + i x1) (cos + i sin): one complex kernel; the views cost nothing
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        fc = torch.view_as_complex(freqs if freqs.is_contiguous() else freqs.contiguous())
        return torch.view_as_real(xc * fc).reshape(x.shape).type_as(x)
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = freqs[..., 0], freqs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.reshape(x.shape).type_as(x)


def modulated_layer_norm(x: Tensor, shift: Tensor | None, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """(1 + scale) * LayerNorm(x) + shift (no affine of its own; shift None: no shift); x (B, L, D),
    shift and scale (B, 1, D). Runs in x's dtype."""
    d = x.shape[-1]
    with _no_autocast(x):
        gain = (1 + scale).to(x.dtype)
        shift = None if shift is None else shift.to(x.dtype)
        if gain.shape[0] == 1 and gain.numel() == d:
            return F.layer_norm(x, (d,), gain.reshape(d), None if shift is None else shift.reshape(d), eps)
        normed = F.layer_norm(x, (d,), None, None, eps)
        return normed * gain if shift is None else torch.addcmul(shift, normed, gain)


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """x + gate * y in one kernel (dtypes promote as for the plain expression)."""
    dtype = torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype))
    return torch.addcmul(x.to(dtype), gate.to(dtype), y.to(dtype))


def modulated_rms_norm(x: Tensor, weight: Tensor | None, scale: Tensor, eps: float) -> Tensor:
    """rms_norm(x, weight) * (1 + scale) for x (B, L, D) and scale (B, 1, D).

    When one scale serves every token (a batch of one sample, or scale (1, 1, D)) the
    modulation folds into the norm's weight: ONE fused rms_norm with weight * (1 + scale),
    whose backward also reduces the scale's gradient over the tokens. Otherwise the two-step
    form. The result has the dtype of the plain expression.
    """
    gain = 1 + scale
    d = x.shape[-1]
    if gain.numel() != d:
        return rms_norm(x, weight, eps) * gain
    gain = gain.reshape(d)
    return rms_norm(x.to(torch.promote_types(x.dtype, gain.dtype)), gain if weight is None else weight * gain, eps)


def _contiguous(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t as a contiguous tensor of `dtype`, in one copy (`to` returns a strided t as-is when the
    dtype already matches)."""
    out = t.to(dtype, memory_format=torch.contiguous_format)
    return out if out.is_contiguous() else out.contiguous()


def rotate_halves(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (channel j pairs with j + D/2): x * cos + cat(-x2, x1) * sin for
    x (B, L, H, D) and cos/sin (L, D) whose halves repeat, returned in x's dtype. Eager: one
    complex multiply in float32, (x_j + i x_{j+D/2}) (cos + i sin), the halves gathered into
    pairs by the float32 copy and put back by the copy to x's dtype; under torch.compile the
    plain formula (in x's dtype, as the reference)."""
    if torch.compiler.is_compiling():
        cos, sin = cos.to(x.dtype)[None, :, None, :], sin.to(x.dtype)[None, :, None, :]
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    half = x.shape[-1] // 2
    freqs = torch.complex(cos[:, :half].float(), sin[:, :half].float())[:, None, :]   # (L, 1, D/2)
    pairs = _contiguous(x.unflatten(-1, (2, half)).transpose(-1, -2), torch.float32)
    rotated = torch.view_as_real(torch.view_as_complex(pairs) * freqs)
    return _contiguous(rotated.transpose(-1, -2), x.dtype).flatten(-2)
