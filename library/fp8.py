"""fp8 base weights (`--fp8_base`, `--fp8_base_unet`): frozen Linear weights stored as
float8_e4m3fn, computed in bf16/fp32.

What is stored in fp8, and why:
- Every nn.Linear inside the model's transformer block lists (attention, MLP and the per-block
  modulation): 98-99% of a DiT's weights. Modulation stays in fp8 although it runs once per
  sample, because it is a third of a FLUX double block; sd-scripts stores it in fp8 too.
- Everything outside the blocks stays in the compute dtype: the input embedders (img_in, txt_in,
  time/vector/guidance embedders) and the final layer, which touch every token at the first
  and last step and weigh ~0.5% of the model; and everything that is not a Linear matrix:
  biases, norm scales, embeddings (not Linears at all). An fp8 file's weights outside the blocks
  are widened to the compute dtype.

Quantisation: a bf16/fp16/fp32 weight gets a per-tensor scale, the power of two at or above
amax / 448, so the e4m3 range is used (sd-scripts casts without a scale, which sends small
weights into the subnormals) and scaling is exact. The round-off is then at most 2^-4 of each
value (3 mantissa bits; about 2.7% RMS), or half a subnormal step (2^-10 x scale) for the
tiniest. A weight that is already float8_e4m3fn (an fp8 file) is taken as is, scale 1. The
scale is a non-persistent buffer (`weight_scale`), so state_dict keys stay the checkpoint's.

Compute: the layer's forward is replaced on the instance (class and module names unchanged,
so LoRA still finds and patches it; apply fp8 BEFORE the LoRA). The default path upcasts the
weight to the compute dtype per call (works on any device, CPU included) and applies the scale
as the GEMM's alpha (in compiled code it multiplies the upcast weight instead, from its tensor:
a float would be a constant of each block's graph); a custom autograd function saves the fp8
weight, not the upcast copy, so autograd never holds bf16 weights - except in a checkpointed
block's recomputation, which runs right before its backward: there the upcast copy is kept for
that backward (one block's weights in bf16 for a moment), saving one upcast in three. On CUDA
GPUs with fp8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell) and bf16 compute,
large matmuls (>= `SCALED_MM_MIN_TOKENS` rows, all dims multiples of 16) run as
`torch._scaled_mm` on fp8 inputs, the activation quantised per row (per token) on the fly by a
compiled kernel. Gradients (backward) always use the upcast weight in the compute dtype.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from library.errors import ConfigError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0                     # largest finite e4m3fn value
SCALED_MM_MIN_TOKENS = 256          # below this the activation quantisation costs more than it saves
SCALED_MM_FAST_ACCUM = False        # Hopper's faster, less exact fp8 accumulation (benchmarks may flip it)
MATMUL_MODES = ("auto", "scaled", "upcast")
_OTHER_FP8 = (torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Quantisation.

def quantize_weight(weight: Tensor) -> tuple[Tensor, float]:
    """(fp8 weight, scale) with weight ~= fp8.float() * scale. An e4m3fn weight comes back as
    is with scale 1."""
    if weight.dtype == FP8:
        return weight, 1.0
    if weight.dtype in _OTHER_FP8:
        raise ConfigError(f"fp8 weights must be float8_e4m3fn, not {weight.dtype}; use a bf16/fp16 or an "
                          "e4m3fn file.")
    amax = float(weight.detach().abs().amax()) if weight.numel() else 0.0
    scale = 2.0 ** math.ceil(math.log2(amax / FP8_MAX)) if amax > 0 else 1.0
    q = (weight.detach().float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_weight(weight: Tensor, scale: float, dtype: torch.dtype = torch.float32) -> Tensor:
    out = weight.to(dtype)
    return out if scale == 1.0 else out * scale


def is_fp8_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and getattr(module, "_fp8_scale", None) is not None


def dequantized_weight(module: nn.Linear, dtype: torch.dtype = torch.float32) -> Tensor:
    """The effective weight of a Linear, fp8 or not (for merging a LoRA, weight norms...)."""
    if is_fp8_linear(module):
        return dequantize_weight(module.weight, module._fp8_scale, dtype)
    return module.weight.to(dtype)


# ---------------------------------------------------------------------------------------------
# Converting a model.

@dataclass(frozen=True)
class Fp8Report:
    quantized: int          # Linears now in fp8
    kept: int               # Linears kept in the compute dtype
    bytes_before: int
    bytes_after: int

    def __str__(self) -> str:
        return (f"fp8 base: {self.quantized} Linear layers in float8_e4m3fn, {self.kept} kept in high precision; "
                f"weights {self.bytes_before / 2**30:.2f} -> {self.bytes_after / 2**30:.2f} GiB")


def quantize_linears_(model: nn.Module, blocks: Sequence[nn.Module], *, keep: Iterable[str] = (),
                      compute_dtype: torch.dtype = torch.bfloat16, matmul: str = "auto") -> Fp8Report:
    """Store the Linear weights inside `blocks` (the model's transformer block lists) in fp8,
    in place; every other Linear of `model` keeps (or, from an fp8 file, gets) `compute_dtype`.

    keep: regular expressions (re.search) over Linear names relative to `model`; matching
    layers inside the blocks stay in high precision too. matmul: "auto" (scaled fp8 matmul
    where supported and worth it), "scaled" (wherever supported, any size; for tests and
    benchmarks) or "upcast" (always upcast the weight). Call before applying a LoRA and before
    block swap."""
    if matmul not in MATMUL_MODES:
        raise ConfigError(f"fp8 matmul mode must be one of {', '.join(MATMUL_MODES)}, got {matmul!r}")
    if compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ConfigError(f"fp8 layers compute in bf16, fp16 or fp32, not {compute_dtype}")
    patterns = [re.compile(p) for p in keep]
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    quantized = kept = before = after = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or is_fp8_linear(module):
            continue
        if "forward" in module.__dict__:
            raise RuntimeError(f"{name}: its forward is already patched (a LoRA?); convert to fp8 before applying "
                               "a LoRA so that the LoRA wraps the fp8 forward.")
        w = module.weight
        if w.requires_grad:
            raise ConfigError(f"--fp8_base stores frozen weights only, but {name}.weight is trainable.")
        before += w.numel() * w.element_size()
        if id(module) in in_blocks and not any(p.search(name) for p in patterns):
            q, scale = quantize_weight(w)
            w.data = q
            module.register_buffer("weight_scale", torch.tensor(scale, dtype=torch.float32, device=q.device),
                                   persistent=False)
            module._fp8_scale = scale
            module._fp8_matmul = matmul
            module.forward = types.MethodType(_fp8_linear_forward, module)
            quantized += 1
        else:
            if w.dtype in (FP8,) + _OTHER_FP8:
                w.data = w.to(compute_dtype)
            kept += 1
        after += w.numel() * w.element_size()
    return Fp8Report(quantized, kept, before, after)


# ---------------------------------------------------------------------------------------------
# Forward.

def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _fp8_linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    bias = None if self.bias is None else self.bias.to(dtype)
    use_scaled = _wants_scaled_mm(self._fp8_matmul, x, self.weight)
    # A Python float is a constant to the compiler (--torch_compile): each block's own scales would
    # give it a graph of its own (and past 8, the compiled selective checkpoint runs eager). Compiled,
    # the scale comes from its tensor instead (None below).
    scale = None if torch.compiler.is_compiling() else self._fp8_scale
    return _Fp8Linear.apply(x, self.weight, bias, self.weight_scale, scale, use_scaled)


_recompute = threading.local()


@contextmanager
def keeping_upcast_weights():
    """Inside: fp8 layers keep, for their backward, the upcast weight they just computed with
    instead of the fp8 one, so the backward does not upcast it again. For the recomputation of a
    checkpointed block (library/block_checkpointing.py), which runs right before that block's
    backward: one block's weights are held in bf16 for a moment (FLUX: at most 0.6 GB), and a
    third of the step's upcasts are saved. Anywhere else the upcast copies would pile up."""
    before = getattr(_recompute, "keep_upcast", False)
    _recompute.keep_upcast = True
    try:
        yield
    finally:
        _recompute.keep_upcast = before


class _Fp8Linear(torch.autograd.Function):
    """y = x @ (W8 * s)^T + b. Saves W8 (fp8), never an upcast copy (except inside
    `keeping_upcast_weights`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale_t, scale, use_scaled):
        if use_scaled:
            y = _scaled_mm_linear(x, weight, scale_t, bias)
        else:
            upcast, alpha = _scaled_upcast(weight, x.dtype, scale, scale_t)
            y = _matmul(x, upcast.t(), alpha, bias)
            if getattr(_recompute, "keep_upcast", False) and not torch.compiler.is_compiling():
                weight = upcast   # the backward's .to() below is then a no-op
        ctx.save_for_backward(weight, scale_t)
        ctx.scale = scale
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        weight, scale_t = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            upcast, alpha = _scaled_upcast(weight, grad_y.dtype, ctx.scale, scale_t)
            grad_x = _matmul(grad_y, upcast, alpha, None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, grad_bias, None, None, None


def _scaled_upcast(weight: Tensor, dtype: torch.dtype, scale: float | None, scale_t: Tensor) -> tuple[Tensor, float]:
    """(weight in `dtype`, the GEMM's alpha). With a float scale the GEMM applies it; with None
    (compiled code) it multiplies the upcast weight, in the same kernel once compiled, and the
    result is the same: scales are powers of two, so the product is exact."""
    if scale is not None:
        return _upcast(weight, dtype), scale
    return weight.to(dtype) * scale_t.to(dtype), 1.0


UPCAST_BLOCK = 8192   # elements per program of the recorded upcast


def _upcast(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """weight in `dtype` (exact from fp8). While a CUDA graph is being recorded (--cuda_graph)
    with a contiguous fp8 weight, by a vectorised Triton kernel: PyTorch's own fp8 copy runs at
    about 1 TB/s on an H200, a third of its bandwidth; in eager steps a Triton launch costs the
    host more than it saves, in a replay it costs nothing. Either gives the same bits."""
    if (weight.dtype == dtype or not weight.is_cuda or not weight.is_contiguous()
            or torch.compiler.is_compiling() or not torch.cuda.is_current_stream_capturing()
            or _upcast_kernel() is None):
        return weight.to(dtype)
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    n = weight.numel()
    _upcast_kernel()[(-(-n // UPCAST_BLOCK),)](weight, out, n, BLOCK=UPCAST_BLOCK, num_warps=8)
    return out


@functools.cache
def _upcast_kernel():
    """The Triton kernel, or None without Triton (then PyTorch's copy)."""
    try:
        from library.fp8_upcast_kernel import upcast_kernel
    except ImportError:
        return None
    return upcast_kernel


def _matmul(a: Tensor, b: Tensor, scale: float, bias: Tensor | None) -> Tensor:
    """a (..., K) @ b (K, N) * scale + bias, the scale applied by the GEMM itself (its alpha),
    so it costs no pass over the weight or the output."""
    a2d = a.reshape(-1, a.shape[-1])
    if bias is None:
        if scale == 1.0:
            out = torch.mm(a2d, b)
        else:  # beta 0: the (broadcast) zero input is never read
            out = torch.addmm(a2d.new_zeros(()), a2d, b, beta=0, alpha=scale)
    else:
        out = torch.addmm(bias, a2d, b, alpha=scale)
    # 2-D in, the GEMM's own output out (not a view of it: a LoRA may add into it in place)
    return out if a.dim() == 2 else out.reshape(*a.shape[:-1], b.shape[1])


def _wants_scaled_mm(mode: str, x: Tensor, weight: Tensor) -> bool:
    if mode == "upcast" or not x.is_cuda or x.dtype != torch.bfloat16:
        return False
    rows = x.numel() // x.shape[-1]
    if mode == "auto" and rows < SCALED_MM_MIN_TOKENS:
        return False
    n, k = weight.shape
    if rows % 16 or n % 16 or k % 16:
        return False
    return scaled_mm_kind(x.device) is not None


@functools.lru_cache(maxsize=None)
def _scaled_mm_kind_cached(index: int) -> str | None:
    if torch.cuda.get_device_capability(index) < (8, 9):
        return None
    dev = torch.device("cuda", index)
    a = torch.zeros(16, 16, device=dev, dtype=FP8)
    b = torch.zeros(16, 16, device=dev, dtype=FP8).t()
    try:
        torch._scaled_mm(a, b, scale_a=torch.ones(16, 1, device=dev), scale_b=torch.ones(1, 16, device=dev),
                         out_dtype=torch.bfloat16)
        return "rowwise"
    except (RuntimeError, NotImplementedError):
        pass   # per-row scales need a newer cuBLAS/torch; try one scale per tensor next
    try:
        one = torch.ones((), device=dev)
        torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        return "tensorwise"
    except (RuntimeError, NotImplementedError):
        return None


def scaled_mm_kind(device: torch.device | str) -> str | None:
    """"rowwise" or "tensorwise" when this CUDA device runs fp8 `torch._scaled_mm`, else None
    (probed once per device)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _scaled_mm_kind_cached(device.index if device.index is not None else torch.cuda.current_device())


def quantize_rows(x2d: Tensor, rowwise: bool) -> tuple[Tensor, Tensor]:
    """fp8 activations with a per-row (or per-tensor) float32 scale."""
    if rowwise:
        amax = x2d.abs().amax(dim=1, keepdim=True).float()
    else:
        amax = x2d.abs().amax().float()
    # A power of two: dividing by it is exact in bf16, so the fp32 scale used by the matmul
    # matches the one the values were divided by.
    scale = torch.exp2(torch.ceil(torch.log2((amax / FP8_MAX).clamp_(min=2.0 ** -100))))
    q = (x2d / scale.to(x2d.dtype)).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


_compiled_quantize_rows = None      # torch.compile(quantize_rows), made on first use
_compile_failed = False


def _quantize_rows_fused(x2d: Tensor, rowwise: bool) -> tuple[Tensor, Tensor]:
    """quantize_rows compiled into one or two kernels: eager it is six passes over the
    activation, which costs more than the fp8 matmul saves. Eager when compiling fails."""
    global _compiled_quantize_rows, _compile_failed
    if not _compile_failed:
        try:
            if _compiled_quantize_rows is None:
                _compiled_quantize_rows = torch.compile(quantize_rows, dynamic=True)
            return _compiled_quantize_rows(x2d, rowwise)
        except Exception as e:  # noqa: BLE001 - no working compiler here: the eager path is exact too
            _compile_failed = True
            logger.warning("fp8: compiling the activation quantiser failed (%s); using the slower eager one", e)
    return quantize_rows(x2d, rowwise)


def _scaled_mm_linear(x: Tensor, weight: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    shape = x.shape
    x2d = x.reshape(-1, shape[-1])
    rowwise = scaled_mm_kind(x.device) == "rowwise"
    xq, x_scale = _quantize_rows_fused(x2d, rowwise)
    n = weight.shape[0]
    w_scale = w_scale.reshape(1, 1).expand(1, n).contiguous() if rowwise else w_scale
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype,
                         use_fast_accum=SCALED_MM_FAST_ACCUM)
    if bias is not None:
        y = y + bias
    return y if x.dim() == 2 else y.reshape(*shape[:-1], n)
