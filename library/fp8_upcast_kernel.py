"""The Triton kernel of library/fp8.py's recorded upcast, in a module of its own: imported on
first use (Triton is optional, and its interpreter applies only when set before the import)."""

import triton
import triton.language as tl


@triton.jit
def upcast_kernel(src, dst, n, BLOCK: tl.constexpr):
    """dst[i] = src[i] in dst's dtype: each program converts BLOCK contiguous elements, with
    vector loads and stores (PyTorch's fp8 -> bf16 copy runs element by element)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    values = tl.load(src + offsets, mask=inside)
    tl.store(dst + offsets, values.to(dst.dtype.element_ty), mask=inside)
