"""Joint-attention input preparation as one Triton kernel (an experiment, off by default).

FLUX's attention inputs take, per block and pass: the q/k RMSNorm of each stream (on strided
views of the qkv projection), the concatenation of the text and image streams (q, k and v),
and RoPE in float32 (a cast up, a complex multiply, a cast down). In a recorded FLUX step on an
H200 these copies, casts and norms are ~0.1 s of 0.58 s of kernels (docs/benchmarks.md).

`qk_norm_rope` does all of it in one kernel per stream, reading the qkv projection where it
lies (any row stride, so a column slice of a larger output works) and writing q, k and v in
(B, H, L, D) at the stream's place in the joint sequence; its backward is one kernel per stream
too. The numbers follow the unfused path: RMS statistics in float32, the normalised value
rounded to the activations' dtype, rotated in float32, rounded again. The norm scales are
frozen (LoRA never trains them), so they get no gradient; with a scale that requires one the
caller must use the unfused path (`supported` says so).

Status: exact against the unfused path on the CPU through Triton's interpreter
(tests/test_qk_norm_rope.py); not yet run on a GPU, so nothing uses it unless
`library.flux.layers.FUSED_QK_ROPE` is set (the FLUX step benchmark's `--fused_qk_rope`).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Sequence

import torch
from torch import Tensor


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def supported(qkv: Tensor, scales: Sequence[Tensor]) -> bool:
    """Whether the fused kernels can run this (else use the unfused ops)."""
    return (triton_available() and qkv.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and qkv.stride(-1) == 1 and not any(s.requires_grad for s in scales))


@functools.cache
def _kernels():
    from library import qk_norm_rope_kernels as k   # see that module's docstring
    return k.forward_kernel, k.backward_kernel


_HEADS_PER_PROGRAM = 4


def _launch_grid(qkv: Tensor, heads: int) -> tuple[int, int]:
    return qkv.shape[0] * qkv.shape[1], -(-heads // _HEADS_PER_PROGRAM)


def _freqs_2d(freqs: Tensor, batch: int) -> tuple[Tensor, int, int]:
    """freqs (B|1, 1, L, D/2, 2) float32 -> (tensor, batch stride (0 when shared), row stride)."""
    f = freqs.float()
    if f.dim() != 5 or f.shape[1] != 1 or f.shape[-1] != 2:
        raise ValueError(f"RoPE frequencies of shape {tuple(freqs.shape)}; expected (B, 1, L, D/2, 2)")
    f = f[:, 0].contiguous()
    return f, (f.stride(0) if f.shape[0] == batch and batch > 1 else 0), f.stride(1)


class _QKNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, freqs, heads, eps, *parts):
        streams = [parts[i:i + 3] for i in range(0, len(parts), 3)]
        qkv0 = streams[0][0]
        batch, dim = qkv0.shape[0], qkv0.shape[2] // 3
        d = dim // heads
        total = sum(s[0].shape[1] for s in streams)
        out = [torch.empty(batch, heads, total, d, dtype=qkv0.dtype, device=qkv0.device) for _ in range(3)]
        f, s_fb, s_fl = _freqs_2d(freqs, batch)
        fwd, _ = _kernels()
        offset = 0
        for qkv, q_scale, k_scale in streams:
            fwd[_launch_grid(qkv, heads)](
                qkv, qkv.stride(0), qkv.stride(1), q_scale, k_scale, f, s_fb, s_fl, *out,
                out[0].stride(0), out[0].stride(1), out[0].stride(2), qkv.shape[1], offset, eps,
                H=heads, D=d, D2=d // 2, HB=_HEADS_PER_PROGRAM)
            offset += qkv.shape[1]
        ctx.save_for_backward(f, *parts)
        ctx.heads, ctx.eps, ctx.s_fb, ctx.s_fl = heads, eps, s_fb, s_fl
        return tuple(out)

    @staticmethod
    def backward(ctx, gq, gk, gv):
        f, *parts = ctx.saved_tensors
        streams = [parts[i:i + 3] for i in range(0, len(parts), 3)]
        grads = [g.contiguous() if g is not None else None for g in (gq, gk, gv)]
        like = next(g for g in grads if g is not None)
        grads = [g if g is not None else torch.zeros_like(like) for g in grads]
        _, bwd = _kernels()
        heads = ctx.heads
        out, offset = [None, None, None], 0
        for qkv, q_scale, k_scale in streams:
            d = qkv.shape[2] // 3 // heads
            dx = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
            bwd[_launch_grid(qkv, heads)](
                *grads, grads[0].stride(0), grads[0].stride(1), grads[0].stride(2),
                qkv, qkv.stride(0), qkv.stride(1), q_scale, k_scale, f, ctx.s_fb, ctx.s_fl,
                dx, dx.stride(0), dx.stride(1), qkv.shape[1], offset, ctx.eps,
                H=heads, D=d, D2=d // 2, HB=_HEADS_PER_PROGRAM)
            out += [dx, None, None]
            offset += qkv.shape[1]
        return tuple(out)


def qk_norm_rope(streams: Sequence[tuple[Tensor, Tensor, Tensor]], freqs: Tensor, heads: int,
                 eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """streams: in joint-sequence order, (qkv (B, L_i, 3 * H * D) with unit column stride, the
    q norm scale (D,), the k norm scale (D,)); freqs (B|1, 1, sum L_i, D/2, 2) [cos, sin].
    Returns q, k, v (B, H, sum L_i, D) in qkv's dtype: q and k RMS-normalised with their
    stream's scale and rotated pairwise, v as it was."""
    flat = [t for stream in streams for t in stream]
    return _QKNormRope.apply(freqs, heads, eps, *flat)
