"""One attention function for every model, with a selectable kernel.

All DiTs call `attention(q, k, v, mask)` with q, k, v shaped (B, H, L, D) and get (B, H, L, D)
back. The default backend is PyTorch's `scaled_dot_product_attention`, asked to use the cuDNN
kernel first. Measured on an H200 (torch 2.11, FLUX.1-dev full size, 1024x1024, bf16, LoRA-style
backward with per-block checkpointing): 0.69 s/step with cuDNN first vs 0.77 s with flash first;
with a ragged T5 key mask (batch 2) 1.32 s with cuDNN first vs 1.86 s with the memory-efficient
kernel first. PyTorch falls back down the priority list when a kernel cannot take the inputs,
so the preference never makes a call fail.

Optional backends ("flash" via the flash_attn package, "xformers", "sage") are picked with
`set_attention_backend(name)`; asking for one that is not installed is an error at selection
time, not in the middle of a run. They only handle the unmasked case; a masked call
(FLUX with --apply_t5_attn_mask, Chroma) always goes through SDPA, which supports masks.
The one exception is `attention_right_padded` (Lumina's right-padded captions and joint
sequences): with "flash" selected it runs flash-attn's varlen kernel on the real tokens only.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from library.errors import ConfigError

BACKENDS = ("sdpa", "flash", "xformers", "sage")

# cuDNN first (fastest on Hopper, with or without a boolean key mask); then PyTorch's usual order.
_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]

_PACKAGE_FOR_BACKEND = {"flash": "flash_attn", "xformers": "xformers", "sage": "sageattention"}

_selected = "sdpa"


def set_attention_backend(name: str) -> None:
    """Select the kernel used by `attention` for unmasked calls ("sdpa", "flash", "xformers", "sage")."""
    global _selected
    if name not in BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    package = _PACKAGE_FOR_BACKEND.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"attention backend {name!r} needs the `{package}` package, which is not installed. "
            f"Install it (pip install {package.replace('_', '-')}) or use the default 'sdpa' backend."
        )
    _selected = name


def get_attention_backend() -> str:
    return _selected


_SDPA_KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def set_sdpa_kernel_order(names: Sequence[str]) -> None:
    """The order in which the "sdpa" backend tries PyTorch's kernels ("cudnn", "flash",
    "efficient", "math"); kernels left out are not used. For benchmarks: the default order
    (cuDNN first) is the measured fastest on Hopper."""
    unknown = [n for n in names if n not in _SDPA_KERNELS]
    if unknown or not names:
        raise ConfigError(f"unknown SDPA kernels {unknown or names}; choose from {', '.join(_SDPA_KERNELS)}.")
    _PRIORITY[:] = [_SDPA_KERNELS[n] for n in names]


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Softmax attention with scale 1/sqrt(D). q, k, v: (B, H, L, D); mask: bool (True = attend)
    or additive, broadcastable to (B, H, Lq, Lk). Returns (B, H, Lq, D)."""
    if mask is None and _selected != "sdpa" and q.is_cuda:
        return _OPTIONAL_KERNELS[_selected](q, k, v)
    return _sdpa(q, k, v, mask)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with sdpa_kernel(_PRIORITY, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _flash(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from flash_attn import flash_attn_func  # optional dependency, checked at selection time

    # flash_attn wants (B, L, H, D) and fp16/bf16.
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _xformers(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from xformers.ops import memory_efficient_attention

    out = memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _sage(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="HND", is_causal=False)


_OPTIONAL_KERNELS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "flash": _flash,
    "xformers": _xformers,
    "sage": _sage,
}


# ---------------------------------------------------------------------------------------------
# sd-scripts' `--attn_mode` / `--split_attn` (Anima, and any family whose guide uses them).

# --attn_mode value -> backend name of this module.
ATTN_MODE_BACKENDS = {"torch": "sdpa", "flash": "flash", "xformers": "xformers", "sageattn": "sage"}
# Kernels without a backward pass: usable for sampling and inference only.
INFERENCE_ONLY_BACKENDS = frozenset({"sage"})


def backend_for_attn_mode(attn_mode: str) -> str:
    """The backend name for an sd-scripts `--attn_mode` value (torch, flash, xformers, sageattn)."""
    try:
        return ATTN_MODE_BACKENDS[attn_mode]
    except KeyError:
        raise ConfigError(f"--attn_mode {attn_mode!r} is not known; choose one of "
                          f"{', '.join(ATTN_MODE_BACKENDS)}.") from None


def attention_per_sample(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """`attention` run one batch element at a time (`--split_attn`): the same result with the
    attention working memory of a single sample."""
    outs = []
    for i in range(q.shape[0]):
        m = None if mask is None else mask[i: i + 1] if mask.shape[0] > 1 else mask
        outs.append(attention(q[i: i + 1], k[i: i + 1], v[i: i + 1], m))
    return torch.cat(outs)


# ---------------------------------------------------------------------------------------------
# Right-padded batches (Lumina's captions and joint sequences): per-sample valid lengths.

@dataclass(frozen=True)
class RightPadding:
    """Which positions of a right-padded batch (B, L) are real: sample b holds `lengths[b]` real
    tokens followed by padding. Built once per forward from lengths known on the host, so
    neither the SDPA key mask nor flash-attn's varlen bookkeeping needs a device sync."""

    lengths: tuple[int, ...] | None   # None: built on the device (right_padding_on_device)
    padded_length: int
    key_mask: Tensor          # (B, 1, 1, L) bool, True = real key (SDPA)
    token_indices: Tensor | None   # (sum(lengths),) flat indices of the real tokens in (B * L)
    cu_seqlens: Tensor | None      # (B + 1,) int32 cumulative lengths (flash-attn varlen)


def right_padding(lengths: Sequence[int], padded_length: int, device: torch.device | str) -> RightPadding | None:
    """The padding description, or None when every sample fills all `padded_length` positions
    (then attention runs unmasked, on the fastest kernels)."""
    lengths = tuple(int(n) for n in lengths)
    if any(n < 1 or n > padded_length for n in lengths):
        raise ValueError(f"sequence lengths {lengths} must lie in 1..{padded_length}")
    if all(n == padded_length for n in lengths):
        return None
    lengths_t = torch.tensor(lengths)
    key_mask = torch.arange(padded_length)[None, :] < lengths_t[:, None]
    token_indices = torch.cat([b * padded_length + torch.arange(n) for b, n in enumerate(lengths)])
    cu_seqlens = F.pad(lengths_t.cumsum(0), (1, 0)).to(torch.int32)
    return RightPadding(
        lengths=lengths, padded_length=padded_length,
        key_mask=key_mask[:, None, None, :].to(device, non_blocking=True),
        token_indices=token_indices.to(device, non_blocking=True),
        cu_seqlens=cu_seqlens.to(device, non_blocking=True),
    )


def right_padding_on_device(lengths: Tensor, padded_length: int) -> RightPadding:
    """The padding description from lengths (B,) already on the device, read nowhere on the
    host, so a CUDA graph can record it (--cuda_graph). It holds the SDPA key mask only:
    flash-attn's varlen packing needs the lengths on the host."""
    positions = torch.arange(padded_length, device=lengths.device)
    key_mask = positions[None, :] < lengths[:, None]
    return RightPadding(lengths=None, padded_length=padded_length, key_mask=key_mask[:, None, None, :],
                        token_indices=None, cu_seqlens=None)


def attention_right_padded(q: Tensor, k: Tensor, v: Tensor, padding: RightPadding | None) -> Tensor:
    """Self-attention over a right-padded batch: q, k, v (B, H, L, D) share the padding; padded
    keys are ignored. The outputs at padded query positions are meaningless (finite) and must be
    dropped by the caller. With the "flash" backend on CUDA in fp16/bf16, flash-attn's varlen
    kernel runs on the real tokens only (no compute spent on padding); otherwise SDPA with a
    key mask."""
    if padding is None:
        return attention(q, k, v)
    if _selected == "flash" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if padding.token_indices is None:
            raise ValueError("flash-attn's varlen kernel needs the lengths on the host; this padding was built "
                             "on the device (right_padding_on_device)")
        return _flash_varlen(q, k, v, padding)
    return _sdpa(q, k, v, padding.key_mask)


def _flash_varlen_kernel():
    from flash_attn import flash_attn_varlen_func  # optional dependency, checked at selection time

    return flash_attn_varlen_func


def _flash_varlen(q: Tensor, k: Tensor, v: Tensor, padding: RightPadding) -> Tensor:
    batch, heads, length, dim = q.shape

    def packed(t: Tensor) -> Tensor:  # (B, H, L, D) -> (real tokens, H, D)
        return t.transpose(1, 2).reshape(batch * length, heads, dim).index_select(0, padding.token_indices)

    max_len = max(padding.lengths)
    out = _flash_varlen_kernel()(packed(q), packed(k), packed(v), cu_seqlens_q=padding.cu_seqlens,
                                 cu_seqlens_k=padding.cu_seqlens, max_seqlen_q=max_len, max_seqlen_k=max_len)
    full = out.new_zeros(batch * length, heads, dim).index_copy(0, padding.token_indices, out)
    return full.reshape(batch, length, heads, dim).transpose(1, 2)
