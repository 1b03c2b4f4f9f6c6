"""The Triton kernels of library/qk_norm_rope.py, in a module of their own: it is imported on
first use, so that Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) applies when set
before, and the kernels can call each other by name."""

import triton
import triton.language as tl


@triton.jit
def norm_rope(src, scale_ptr, out_ptr, dst, pair, hm, cos, sin, eps, D: tl.constexpr):
    """One of q/k for HB heads of one token: RMSNorm (rounded like the unfused op), then RoPE."""
    xe = tl.load(src + 2 * pair, mask=hm, other=0.0).to(tl.float32)
    xo = tl.load(src + 2 * pair + 1, mask=hm, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(xe * xe, axis=1) + tl.sum(xo * xo, axis=1))[:, None] / D + eps)
    we = tl.load(scale_ptr + 2 * pair).to(tl.float32)
    wo = tl.load(scale_ptr + 2 * pair + 1).to(tl.float32)
    ne = (xe * rstd * we).to(out_ptr.dtype.element_ty).to(tl.float32)
    no = (xo * rstd * wo).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + dst, (ne * cos - no * sin).to(out_ptr.dtype.element_ty), mask=hm)
    tl.store(out_ptr + dst + 1, (ne * sin + no * cos).to(out_ptr.dtype.element_ty), mask=hm)

@triton.jit
def norm_rope_backward(g_ptr, g_at, src, scale_ptr, dst, pair, hm, cos, sin, eps, D: tl.constexpr):
    """Its backward: through the rotation (its transpose), then the norm (the rounding
    passes gradients through)."""
    ge = tl.load(g_ptr + g_at, mask=hm, other=0.0).to(tl.float32)
    go = tl.load(g_ptr + g_at + 1, mask=hm, other=0.0).to(tl.float32)
    dne = ge * cos + go * sin
    dno = go * cos - ge * sin
    xe = tl.load(src + 2 * pair, mask=hm, other=0.0).to(tl.float32)
    xo = tl.load(src + 2 * pair + 1, mask=hm, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(xe * xe, axis=1) + tl.sum(xo * xo, axis=1))[:, None] / D + eps)
    we = tl.load(scale_ptr + 2 * pair).to(tl.float32)
    wo = tl.load(scale_ptr + 2 * pair + 1).to(tl.float32)
    he, ho = xe * rstd, xo * rstd
    ae, ao = dne * we, dno * wo
    mean = (tl.sum(ae * he, axis=1) + tl.sum(ao * ho, axis=1))[:, None] / D
    tl.store(dst + 2 * pair, (rstd * (ae - he * mean)).to(dst.dtype.element_ty), mask=hm)
    tl.store(dst + 2 * pair + 1, (rstd * (ao - ho * mean)).to(dst.dtype.element_ty), mask=hm)

@triton.jit
def program_place(f_ptr, s_fb, s_fl, n_rows, offset, H: tl.constexpr, D2: tl.constexpr, HB: tl.constexpr):
    """This program's token (sample b, row l of the stream), its HB heads (and which exist),
    the channel-pair index and the token's RoPE cos/sin."""
    row = tl.program_id(0)
    b, l = row // n_rows, row % n_rows
    heads = tl.program_id(1) * HB + tl.arange(0, HB)[:, None]
    pair = tl.arange(0, D2)[None, :]
    cos = tl.load(f_ptr + b * s_fb + (offset + l) * s_fl + 2 * pair)
    sin = tl.load(f_ptr + b * s_fb + (offset + l) * s_fl + 2 * pair + 1)
    return b, l, heads, heads < H, pair, cos, sin


@triton.jit
def forward_kernel(qkv_ptr, s_qb, s_ql, qs_ptr, ks_ptr, f_ptr, s_fb, s_fl, q_ptr, k_ptr, v_ptr,
                   s_ob, s_oh, s_ol, n_rows, offset, eps,
                   H: tl.constexpr, D: tl.constexpr, D2: tl.constexpr, HB: tl.constexpr):
    b, l, heads, hm, pair, cos, sin = program_place(f_ptr, s_fb, s_fl, n_rows, offset, H, D2, HB)
    src = qkv_ptr + b * s_qb + l * s_ql + heads * D
    dst = b * s_ob + heads * s_oh + (offset + l) * s_ol + 2 * pair
    norm_rope(src, qs_ptr, q_ptr, dst, pair, hm, cos, sin, eps, D)
    norm_rope(src + H * D, ks_ptr, k_ptr, dst, pair, hm, cos, sin, eps, D)
    d = tl.arange(0, D)[None, :]
    v = tl.load(src + 2 * H * D + d, mask=hm)
    tl.store(v_ptr + b * s_ob + heads * s_oh + (offset + l) * s_ol + d, v, mask=hm)


@triton.jit
def backward_kernel(gq_ptr, gk_ptr, gv_ptr, s_gb, s_gh, s_gl, qkv_ptr, s_qb, s_ql, qs_ptr, ks_ptr,
                    f_ptr, s_fb, s_fl, dx_ptr, s_db, s_dl, n_rows, offset, eps,
                    H: tl.constexpr, D: tl.constexpr, D2: tl.constexpr, HB: tl.constexpr):
    b, l, heads, hm, pair, cos, sin = program_place(f_ptr, s_fb, s_fl, n_rows, offset, H, D2, HB)
    src = qkv_ptr + b * s_qb + l * s_ql + heads * D
    dst = dx_ptr + b * s_db + l * s_dl + heads * D
    g_at = b * s_gb + heads * s_gh + (offset + l) * s_gl + 2 * pair
    norm_rope_backward(gq_ptr, g_at, src, qs_ptr, dst, pair, hm, cos, sin, eps, D)
    norm_rope_backward(gk_ptr, g_at, src + H * D, ks_ptr, dst + H * D, pair, hm, cos, sin, eps, D)
    d = tl.arange(0, D)[None, :]
    gv = tl.load(gv_ptr + b * s_gb + heads * s_gh + (offset + l) * s_gl + d, mask=hm)
    tl.store(dst + 2 * H * D + d, gv.to(dx_ptr.dtype.element_ty), mask=hm)
