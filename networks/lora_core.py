"""The LoRA core, shared by every model family.

A family module (`networks/lora_<family>.py`) decides which layers get a LoRA and with what
rank, as a list of `LoRATarget`. Everything else lives here once: the LoRA math and its
dropouts, patching and restoring the base layers' forwards, LoRA+ and per-module learning
rates, max-norm regularisation, saving (with the sshs hashes), loading with clear errors,
and merging into the base weights.

File format (sd-scripts, FORMATS 4.1): for each module `<lora_name>.lora_down.weight`
(rank, in[, kh, kw]), `<lora_name>.lora_up.weight` (out, rank[, 1, 1]) and `<lora_name>.alpha`
(a scalar). The LoRA name is "<prefix>.<module path>" with every "." replaced by "_".
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Collection, Iterator, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from library.errors import ConfigError, ModelFileError
from library.safetensors_io import load_file, serialize, write_bytes_atomic
from networks.network_args import RegexRule, last_match

logger = logging.getLogger(__name__)

LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


# ----------------------------------------------------------------------------------------
# Targets: which layers get a LoRA (computed by the family module)


@dataclass(frozen=True)
class LayerRef:
    """A base layer that may receive a LoRA, with its LoRA name.
    `text_encoder_index` is None for the denoiser (DiT / U-Net), else the position of the
    text encoder in the family's list (it selects the --text_encoder_lr value)."""

    lora_name: str
    module: nn.Module
    text_encoder_index: int | None = None

    def target(self, rank: int, alpha: float | None, lr: float | None = None,
               split_dims: tuple[int, ...] | None = None) -> LoRATarget:
        return LoRATarget(self.lora_name, self.module, rank, alpha, lr, self.text_encoder_index, split_dims)


@dataclass(frozen=True)
class LoRATarget:
    """One LoRA module to create: `lr` overrides the group learning rate (network_reg_lrs)."""

    lora_name: str
    module: nn.Module
    rank: int
    alpha: float | None
    lr: float | None = None
    text_encoder_index: int | None = None
    # split_qkv: the output rows are these parts (e.g. q, k, v), each with its own rank-`rank`
    # LoRA; the module then holds one LoRA of rank len(parts) * rank with a block-diagonal up.
    split_dims: tuple[int, ...] | None = None


def to_lora_name(prefix: str, module_path: str) -> str:
    return f"{prefix}.{module_path}".replace(".", "_")


def _is_lora_capable(module: nn.Module, include_conv: bool) -> bool:
    return isinstance(module, nn.Linear) or (include_conv and isinstance(module, nn.Conv2d))


def find_layers(root: nn.Module, lora_prefix: str, *, containers: Collection[str] | None = None,
                path_prefix: str = "", text_encoder_index: int | None = None,
                include_conv: bool = False) -> list[LayerRef]:
    """Every Linear (and Conv2d with include_conv) under `root`, in module order.

    containers: only layers inside modules of these class names (sd-scripts' rule for text
    encoders, e.g. CLIPAttention / CLIPMLP); None means every layer under root.
    path_prefix: prepended to the module path, so that the LoRA names stay those of the
    checkpoint's key layout when the live module tree differs from it (for example when
    `root` is a block list, or a transformers version dropped a wrapper module)."""
    found: list[LayerRef] = []
    seen: set[int] = set()
    if containers is None:
        scopes: Iterator[tuple[str, nn.Module]] = iter([("", root)])
    else:
        scopes = ((name, m) for name, m in root.named_modules() if type(m).__name__ in containers)
    for scope_path, scope in scopes:
        for child_path, child in scope.named_modules():
            if id(child) in seen or not _is_lora_capable(child, include_conv):
                continue
            seen.add(id(child))
            path = ".".join(p for p in (scope_path, child_path) if p)
            found.append(LayerRef(to_lora_name(lora_prefix, path_prefix + path), child, text_encoder_index))
    return found


def layer_at(root: nn.Module, path: str, lora_prefix: str, text_encoder_index: int | None = None) -> LayerRef | None:
    """The Linear at `path` under root, or None when the model has no such layer (a schnell
    model's guidance_in is an Identity; Chroma has no time_in)."""
    try:
        module = root.get_submodule(path)
    except AttributeError:
        return None
    if not isinstance(module, nn.Linear):
        return None
    return LayerRef(to_lora_name(lora_prefix, path), module, text_encoder_index)


def hf_clip_path_prefix(clip_text_model: nn.Module) -> str:
    """CLIP-L LoRA names follow the checkpoint keys (`text_model.encoder.layers...`). Recent
    transformers (5.x) build CLIPTextModel without the `text_model` wrapper, so the prefix
    must be added back to keep the names sd-scripts and ComfyUI expect."""
    return "" if hasattr(clip_text_model, "text_model") else "text_model."


def apply_reg_lrs(targets: Sequence[LoRATarget], rules: Sequence[RegexRule[float]] | None) -> list[LoRATarget]:
    """Set each target's lr from network_reg_lrs (the last matching pattern wins)."""
    out = []
    for t in targets:
        rule = last_match(rules, t.lora_name)
        out.append(replace(t, lr=rule.value) if rule is not None else t)
    return out


# ----------------------------------------------------------------------------------------
# One LoRA module


def _sync_scale_after_load(module: LoRAModule, _incompatible_keys) -> None:
    module.set_alpha(module.alpha)


def _uninitialized(cls: type[nn.Module], *args, **kwargs) -> nn.Module:
    """cls(*args, **kwargs) with float32 CPU parameters left uninitialised (built on "meta", each
    parameter then given CPU memory; unlike Module.to_empty this imports nothing more)."""
    module = cls(*args, device="meta", **kwargs)
    for name, p in list(module.named_parameters(recurse=False)):
        setattr(module, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad))
    return module


class LoRAModule(nn.Module):
    """A LoRA on one existing Linear or Conv2d. The base layer is not copied or wrapped:
    `apply()` replaces its forward so that

        y = base(x) + up(down(dropout(x))) * multiplier * alpha / rank

    and `restore()` puts the original forward back.

    split_dims (split_qkv): n separate LoRAs of rank r for n row blocks of the output (q, k, v,
    ...). Stored as ONE LoRA of rank n*r whose up matrix is block-diagonal (part j's up in rows
    of part j, columns j*r..(j+1)*r) and alpha n*alpha: exactly the fused layout any loader
    reads, at the trained strength (alpha/rank = n*alpha / (n*r)). The forward only multiplies
    the diagonal blocks, so the off-diagonal entries get no gradient and stay zero.

    ggpo_sigma / ggpo_beta (LoRA-GGPO): while training, add x @ P^T with P ~ N(0, 1) of the base
    weight's shape, each row scaled by (sigma * ||W + dW||_row + beta * ||grad dW||_row^2) /
    sqrt(out). The norms are refreshed by `update_ggpo_norms()` after each backward."""

    def __init__(self, lora_name: str, base: nn.Module, rank: int, alpha: float | torch.Tensor | None, *,
                 multiplier: float = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, lr: float | None = None,
                 text_encoder_index: int | None = None, split_dims: tuple[int, ...] | None = None,
                 ggpo_sigma: float | None = None, ggpo_beta: float | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"{lora_name}: rank must be >= 1, got {rank}")
        self.split_dims = tuple(split_dims) if split_dims else None
        if self.split_dims is not None:
            if not isinstance(base, nn.Linear) or sum(self.split_dims) != base.out_features:
                raise ValueError(f"{lora_name}: split dims {self.split_dims} do not add up to the layer's "
                                 f"{getattr(base, 'out_features', '?')} outputs")
            parts = len(self.split_dims)
            rank = rank * parts
            alpha = None if alpha is None or float(alpha) == 0.0 else float(alpha) * parts
        self.lora_name = lora_name
        self.rank = rank
        # LoRA weights are always created as float32 on the CPU, whatever the base layer's
        # device (it may be on "meta" or swapped out); the trainer moves the network.
        # Built without the layers' default init, which would only be overwritten below (three
        # random fills per module instead of one: seconds for a FLUX network's 304 modules).
        factory = dict(dtype=torch.float32)
        if isinstance(base, nn.Linear):
            self.lora_down = _uninitialized(nn.Linear, base.in_features, rank, bias=False, **factory)
            self.lora_up = _uninitialized(nn.Linear, rank, base.out_features, bias=False, **factory)
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError(f"{lora_name}: grouped convolutions are not supported")
            self.lora_down = _uninitialized(nn.Conv2d, base.in_channels, rank, base.kernel_size, base.stride,
                                       base.padding, base.dilation, bias=False, **factory)
            self.lora_up = _uninitialized(nn.Conv2d, rank, base.out_channels, 1, bias=False, **factory)
        else:
            raise TypeError(f"{lora_name}: LoRA needs a Linear or Conv2d layer, got {type(base).__name__}")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)  # the network starts as the identity

        self.register_buffer("alpha", torch.tensor(0.0, **factory))
        self.set_alpha(alpha)
        # A loaded state dict may carry another alpha (--network_weights, resume): keep the
        # cached python scale in step with the buffer, whoever calls load_state_dict.
        self.register_load_state_dict_post_hook(_sync_scale_after_load)

        self.multiplier = float(multiplier)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.lr = lr
        self.text_encoder_index = text_encoder_index
        self.ggpo_sigma, self.ggpo_beta = ggpo_sigma, ggpo_beta
        self._ggpo_scale: torch.Tensor | None = None     # (out, 1) per-row perturbation scale, once known
        self._base_row_norm: torch.Tensor | None = None  # mean row norm of the frozen weight
        # Stored outside nn.Module's registry: the base layer's weights must not become
        # parameters, buffers or state_dict entries of the LoRA.
        object.__setattr__(self, "base", base)
        self._org_forward = None  # the base layer's forward while patched
        self._base_had_own_forward = False

    def set_alpha(self, alpha: float | torch.Tensor | None) -> None:
        """alpha None or 0 means alpha = rank (scale 1), as in sd-scripts."""
        value = float(alpha) if alpha is not None else 0.0
        if value == 0.0:
            value = float(self.rank)
        self.alpha.fill_(value)
        self.scale = value / self.rank

    # -- patching ---------------------------------------------------------------------

    @property
    def is_applied(self) -> bool:
        return self._org_forward is not None

    def apply(self) -> None:
        if self.is_applied:
            raise RuntimeError(f"{self.lora_name} is already applied")
        base = self.base
        self._base_had_own_forward = "forward" in base.__dict__
        self._org_forward = base.forward
        base.forward = self.forward

    def restore(self) -> None:
        if not self.is_applied:
            return
        base = self.base
        if base.__dict__.get("forward") != self.forward:
            # Someone patched the layer after us (another LoRA stacked on it): undoing ours
            # now would silently drop theirs. Networks must be restored in reverse order.
            raise RuntimeError(f"{self.lora_name}: the layer was patched again after this LoRA; "
                               "restore stacked networks in the reverse order of applying them")
        if self._base_had_own_forward:
            base.forward = self._org_forward
        else:
            del base.forward
        self._org_forward = None

    # -- math -------------------------------------------------------------------------

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        # Run in the input's dtype (a bf16 base gets a bf16 LoRA pass from fp32 weights);
        # under autocast the op is cast again by autocast itself, as for the base layer.
        w = self.lora_down.weight.to(x.dtype)
        if isinstance(self.lora_down, nn.Conv2d):
            d = self.lora_down
            return F.conv2d(x, w, None, d.stride, d.padding, d.dilation)
        return F.linear(x, w)

    def _up(self, lx: torch.Tensor) -> torch.Tensor:
        w = self.lora_up.weight.to(lx.dtype)
        if self.split_dims is not None:
            return torch.cat([F.linear(lx[..., cols], w[rows, cols]) for rows, cols in self._split_blocks()], dim=-1)
        return F.conv2d(lx, w) if isinstance(self.lora_up, nn.Conv2d) else F.linear(lx, w)

    def _split_blocks(self) -> list[tuple[slice, slice]]:
        """(output rows, rank columns) of each split part's block of the up matrix."""
        r = self.rank // len(self.split_dims)
        blocks, start = [], 0
        for j, size in enumerate(self.split_dims):
            blocks.append((slice(start, start + size), slice(j * r, (j + 1) * r)))
            start += size
        return blocks

    def _up_weight(self, **to) -> torch.Tensor:
        """The up matrix as the forward uses it (off-diagonal blocks zero for split_qkv)."""
        w = self.lora_up.weight.to(**to)
        return w if self.split_dims is None else self._mask_blocks(w)

    def check_split_layout(self, source: str) -> None:
        """A loaded up matrix must be block-diagonal for a split_qkv module."""
        if self.split_dims is not None and not torch.equal(self.lora_up.weight, self._up_weight()):
            raise ModelFileError(f"{source}: {self.lora_name} has a full (not block-diagonal) up matrix, so it "
                                 "was not trained with split_qkv=True; remove split_qkv from --network_args")

    # -- LoRA-GGPO ------------------------------------------------------------------------

    @torch.no_grad()
    def update_ggpo_norms(self) -> None:
        """Per-row perturbation scale from the combined weight's norm and the LoRA gradient."""
        if self.ggpo_sigma is None or self.ggpo_beta is None:
            return
        up, down = self.lora_up.weight, self.lora_down.weight
        if up.grad is None or down.grad is None:
            return
        if self._base_row_norm is None:
            # exact mean row norm of the frozen weight (sd-scripts estimates it from 1000 sampled rows)
            self._base_row_norm = self.base.weight.detach().float().flatten(1).norm(dim=1).mean().to(up.device)
        up32, down32 = self._up_weight(dtype=torch.float32).flatten(1), down.float().flatten(1)
        delta = (up32 @ down32) * self.scale
        combined = torch.sqrt(self._base_row_norm ** 2 + delta.pow(2).sum(dim=1, keepdim=True))
        grad_up = up.grad.float().flatten(1)
        if self.split_dims is not None:
            grad_up = self._mask_blocks(grad_up)
        approx_grad = self.scale * (up32 @ down.grad.float().flatten(1) + grad_up @ down32)
        grad_norm = approx_grad.norm(dim=1, keepdim=True)
        out_features = up.shape[0]
        self._ggpo_scale = (self.ggpo_sigma * combined + self.ggpo_beta * grad_norm ** 2) / math.sqrt(out_features)

    def _mask_blocks(self, w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(w)
        for rows, cols in self._split_blocks():
            out[rows, cols] = w[rows, cols]
        return out

    def _ggpo_perturbation(self, x: torch.Tensor) -> torch.Tensor | None:
        if self._ggpo_scale is None or not self.training or not isinstance(self.base, nn.Linear):
            return None
        with torch.no_grad():
            noise = torch.randn(self.base.weight.shape, device=x.device, dtype=x.dtype)
            noise.mul_(self._ggpo_scale.to(x.device, x.dtype))
            return F.linear(x, noise)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        fused_add = self.split_dims is None and isinstance(self.lora_up, nn.Linear) and not args and not kwargs
        if fused_add:
            # The base layer on the tokens as rows: its output is then a fresh 2-D tensor (not a
            # view) that the up-projection's GEMM can add into in place, below.
            base_out = self._org_forward(x.reshape(-1, x.shape[-1]))
            out = base_out.view(*x.shape[:-1], base_out.shape[-1])
        else:
            base_out = out = self._org_forward(x, *args, **kwargs)
        if self.multiplier == 0.0 and not torch.is_grad_enabled():
            return out  # e.g. sampling "without LoRA" or a multiplier-0 prior prediction
        if self.module_dropout is not None and self.training and float(torch.rand(())) < self.module_dropout:
            return out

        lx = self._down(x)
        if self.dropout is not None and self.training:
            lx = F.dropout(lx, p=self.dropout, training=True)
        scale = self.scale
        if self.rank_dropout is not None and self.training:
            # One Bernoulli mask per sample and rank, shared across tokens / pixels.
            if isinstance(self.lora_down, nn.Conv2d):
                mask_shape = (lx.shape[0], self.rank, 1, 1)
            else:
                mask_shape = (lx.shape[0],) + (1,) * (lx.dim() - 2) + (self.rank,)
            keep = torch.rand(mask_shape, device=lx.device) > self.rank_dropout
            lx = lx * keep.to(lx.dtype)
            scale = scale / (1.0 - self.rank_dropout)  # keep the expected output unchanged
        factor = self.multiplier * scale
        # In compiled code (--torch_compile) the up-projection is a GEMM of its own whose sum with
        # the base output Inductor fuses into the next elementwise kernel: Inductor turns the addmm
        # below into an out-of-place one that copies the base output first (FLUX on an H200:
        # 0.4453 s against 0.4588 s per compiled, recorded, selectively checkpointed step).
        if fused_add and lx.dtype == out.dtype and not torch.compiler.is_compiling():
            # out += factor * (lx @ up^T) as one GEMM adding into the layer's output in its
            # epilogue: no elementwise pass over the output, and in place, so no copy of it either
            # (an out-of-place addmm copies its input first: 648 device copies per FLUX step).
            # In place only where autograd allows it: the base output must not be a view (a
            # custom Function's output may be) and nothing may have saved it for its backward.
            w, lx2d = self.lora_up.weight.to(lx.dtype), lx.reshape(-1, lx.shape[-1])
            # (under a dispatch mode - selective checkpointing - the base output may be kept by it)
            if is_in_torch_dispatch_mode() or base_out._is_view() or not base_out.is_contiguous():
                out = torch.addmm(base_out, lx2d, w.t(), alpha=factor).view(out.shape)
            else:
                out = base_out.addmm_(lx2d, w.t(), alpha=factor).view(out.shape)
        else:
            delta = self._up(lx)
            out = out + (delta * factor).to(out.dtype)
        perturbation = self._ggpo_perturbation(x)
        return out if perturbation is None else out + perturbation.to(out.dtype)

    @torch.no_grad()
    def delta_weight(self, device: torch.device | str | None = None) -> torch.Tensor:
        """alpha/rank * up @ down in float32, shaped like the base weight (multiplier excluded)."""
        up = self._up_weight(device=device, dtype=torch.float32).flatten(1)  # (out, r)
        down = self.lora_down.weight.to(device=device, dtype=torch.float32).flatten(1)  # (r, in*kh*kw)
        return (up @ down).reshape(self.base.weight.shape) * self.scale

    @torch.no_grad()
    def merge_into_base(self, multiplier: float, device: torch.device | str | None = None) -> None:
        weight = self.base.weight
        device = weight.device if device is None else device
        merged = weight.to(device=device, dtype=torch.float32) + multiplier * self.delta_weight(device)
        weight.copy_(merged)  # keeps the base weight's dtype and device


# ----------------------------------------------------------------------------------------
# The network


@dataclass(frozen=True)
class LoRAPlusRatios:
    """LoRA+ (lora_up lr x ratio). The specific ratio wins over the common one."""

    common: float | None = None
    unet: float | None = None
    text_encoder: float | None = None

    @property
    def for_unet(self) -> float | None:
        return self.unet if self.unet is not None else self.common

    @property
    def for_text_encoder(self) -> float | None:
        return self.text_encoder if self.text_encoder is not None else self.common


class NormStats(NamedTuple):
    """Result of max-norm regularisation (unpacks like sd-scripts' 3-tuple)."""

    keys_scaled: int
    mean_norm: float
    max_norm: float


@dataclass(frozen=True)
class LoadReport:
    loaded: int
    ignored: tuple[str, ...]  # modules in the file that were left out by apply_to

    def __str__(self) -> str:
        extra = f", {len(self.ignored)} text-encoder modules ignored (not trained)" if self.ignored else ""
        return f"{self.loaded} LoRA modules loaded{extra}"


def _check_probability(value: float | None, option: str) -> float | None:
    if value is None:
        return None
    if not 0 <= float(value) < 1:
        raise ConfigError(f"{option} must be a probability p with 0 <= p < 1, got {value}")
    return float(value) or None


class LoRANetwork(nn.Module):
    """All LoRA modules of one model (DiT/U-Net and text encoders). Submodules are named by
    LoRA name, so `state_dict()` has the sd-scripts keys."""

    def __init__(self, targets: Sequence[LoRATarget], *, family: str, multiplier: float = 1.0,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, loraplus: LoRAPlusRatios | None = None,
                 verbose: bool = False, ggpo_sigma: float | None = None, ggpo_beta: float | None = None):
        super().__init__()
        if (ggpo_sigma is None) != (ggpo_beta is None):
            raise ConfigError("LoRA-GGPO needs both ggpo_sigma and ggpo_beta in --network_args "
                              "(e.g. ggpo_sigma=0.03 ggpo_beta=0.01)")
        if not targets:
            raise ConfigError(
                f"no {family} layer was selected for LoRA: every candidate got rank 0 or was left out. "
                "Check --network_dim and the rank/block options in --network_args."
            )
        self.family = family
        self.multiplier = float(multiplier)
        self.loraplus = loraplus or LoRAPlusRatios()
        dropout = _check_probability(dropout, "--network_dropout")
        rank_dropout = _check_probability(rank_dropout, "rank_dropout")
        module_dropout = _check_probability(module_dropout, "module_dropout")
        for t in targets:
            if t.lora_name in self._modules:
                raise ValueError(f"duplicate LoRA name {t.lora_name}")
            self.add_module(t.lora_name, LoRAModule(
                t.lora_name, t.module, t.rank, t.alpha, multiplier=self.multiplier, dropout=dropout,
                rank_dropout=rank_dropout, module_dropout=module_dropout, lr=t.lr,
                text_encoder_index=t.text_encoder_index, split_dims=t.split_dims,
                ggpo_sigma=ggpo_sigma, ggpo_beta=ggpo_beta))
        self._dropped: set[str] = set()  # left out by apply_to (their weights are not trained or saved)
        self._applied = False
        self._merged = False
        self._trainable: set[str] | None = None  # parameter names with a non-zero lr, once known
        n_te = len(self.text_encoder_loras)
        logger.info("%s LoRA: %d modules (%d DiT/U-Net, %d text encoder)", family, len(self.loras),
                    len(self.loras) - n_te, n_te)
        if verbose:
            for line in self.describe():
                logger.info("  %s", line)

    # -- module lists -----------------------------------------------------------------

    @property
    def loras(self) -> list[LoRAModule]:
        return [m for m in self.children() if isinstance(m, LoRAModule)]

    @property
    def unet_loras(self) -> list[LoRAModule]:
        return [m for m in self.loras if m.text_encoder_index is None]

    @property
    def text_encoder_loras(self) -> list[LoRAModule]:
        return [m for m in self.loras if m.text_encoder_index is not None]

    def describe(self) -> list[str]:
        """One line per module: name, rank, alpha (the `verbose=True` listing)."""
        return [f"{m.lora_name:60s} rank {m.rank:4d}  alpha {float(m.alpha):g}"
                + (f"  lr {m.lr:g}" if m.lr is not None else "") for m in self.loras]

    # -- applying ---------------------------------------------------------------------

    def has_text_encoder_loras(self) -> bool:
        return bool(self.text_encoder_loras)

    def apply_to(self, text_encoders: nn.Module | Sequence[nn.Module | None] | None = None,
                 unet: nn.Module | None = None, *, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Patch the base layers. Modules of a part that is not applied are removed from the
        network: they are neither trained nor saved (sd-scripts' rule).

        The layers were bound when the targets were computed; the models, when given (as in
        sd-scripts' call), are only checked to contain them. The flags are keyword-only so
        that a positional sd-scripts-style call fails loudly instead of being misread."""
        if self._applied or self._merged:
            raise RuntimeError("apply_to was already called (or the weights were merged); use reapply()")
        self._check_bound_to(text_encoders, unet)
        for m in self.loras:
            keep = apply_unet if m.text_encoder_index is None else apply_text_encoder
            if not keep:
                self._dropped.add(m.lora_name)
                delattr(self, m.lora_name)
        if not self.loras:
            raise ConfigError(
                f"nothing to train: the {self.family} LoRA has no module for the selected parts "
                f"(text encoder: {apply_text_encoder}, DiT/U-Net: {apply_unet})."
            )
        for m in self.loras:
            m.apply()
        self._applied = True
        logger.info("LoRA applied: %d DiT/U-Net modules, %d text encoder modules",
                    len(self.unet_loras), len(self.text_encoder_loras))

    def _check_bound_to(self, text_encoders, unet) -> None:
        if isinstance(text_encoders, nn.Module):
            text_encoders = [text_encoders]
        models = {None: unet, **{i: te for i, te in enumerate(text_encoders or [])}}
        contents: dict[int | None, set[int]] = {}
        for m in self.loras:
            model = models.get(m.text_encoder_index)
            if model is None:
                continue
            if m.text_encoder_index not in contents:
                contents[m.text_encoder_index] = {id(x) for x in model.modules()}
            if id(m.base) not in contents[m.text_encoder_index]:
                raise ValueError(f"{m.lora_name}: this network was built for another model than the one given "
                                 "to apply_to")

    def restore(self) -> None:
        """Put the base layers' forwards back (sample without the LoRA); `reapply()` undoes it."""
        for m in reversed(self.loras):
            m.restore()

    def reapply(self) -> None:
        if not self._applied:
            raise RuntimeError("call apply_to first")
        for m in self.loras:
            if not m.is_applied:
                m.apply()

    def set_multiplier(self, multiplier: float) -> None:
        value = float(multiplier)
        if not math.isfinite(value):
            raise ValueError(f"multiplier must be finite, got {multiplier}")
        self.multiplier = value
        for m in self.loras:
            m.multiplier = value

    def is_mergeable(self) -> bool:
        return True

    @torch.no_grad()
    def merge_to(self, weights_sd: Mapping[str, torch.Tensor] | None = None, *, multiplier: float | None = None,
                 device: torch.device | str | None = None) -> None:
        """Add multiplier * alpha/rank * up @ down into every base weight (computed in float32 on
        `device`, default the weight's own). Loads `weights_sd` first when given. Afterwards
        the LoRA must not be applied again (it would count twice)."""
        if weights_sd is not None:
            self.load_weights(weights_sd)
        self.restore()
        m_value = self.multiplier if multiplier is None else float(multiplier)
        for m in self.loras:
            m.merge_into_base(m_value, device)
        self._merged = True
        self._applied = False

    # -- optimizer --------------------------------------------------------------------

    def prepare_optimizer_params(self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None,
                                 default_lr: float, loraplus_lr_ratio: float | None = None,
                                 loraplus_unet_lr_ratio: float | None = None,
                                 loraplus_text_encoder_lr_ratio: float | None = None,
                                 ) -> tuple[list[dict], list[str]]:
        """Optimizer param groups and a description of each (for lr logging).

        Learning rates: DiT/U-Net modules use unet_lr (else default_lr); text encoder i uses
        text_encoder_lr[i] (one value means all; none means default_lr); a module's own lr
        (network_reg_lrs) replaces its part's lr. With LoRA+, lora_up params go to separate
        groups at lr x ratio. Groups whose lr is 0 are left out and their params frozen.
        Ratio arguments override those given in network_args."""
        if any(r is not None for r in (loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio)):
            ratios = LoRAPlusRatios(loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio)
        else:
            ratios = self.loraplus
        te_lrs = _text_encoder_lrs(text_encoder_lr, default_lr)
        base_unet_lr = default_lr if unet_lr is None else float(unet_lr)

        # key: (part order, module lr override, is lora_up with LoRA+) -> [names], params, lr, description
        groups: dict[tuple, dict] = {}
        for m in self.loras:
            if m.text_encoder_index is None:
                part_order, part, part_lr, ratio = 1 << 30, "unet", base_unet_lr, ratios.for_unet
            else:
                i = m.text_encoder_index
                part_order, part, ratio = i, f"textencoder {i + 1}", ratios.for_text_encoder
                part_lr = te_lrs[0] if len(te_lrs) == 1 else _nth_text_encoder_lr(te_lrs, i)
            lr = part_lr if m.lr is None else m.lr
            for pname, p in m.named_parameters():
                plus = ratio is not None and pname.startswith("lora_up.")
                key = (part_order, m.lr is not None, m.lr if m.lr is not None else 0.0, plus)
                if key not in groups:
                    desc = part + (f" lr={m.lr:g}" if m.lr is not None else "") + (" plus" if plus else "")
                    groups[key] = {"names": [], "params": [], "lr": lr * ratio if plus else lr, "desc": desc}
                groups[key]["names"].append(f"{m.lora_name}.{pname}")
                groups[key]["params"].append(p)

        param_groups, descriptions, trainable = [], [], set()
        for key in sorted(groups):
            g = groups[key]
            if g["lr"] == 0:
                logger.info("lr is 0 for '%s': its %d tensors are frozen", g["desc"], len(g["params"]))
                continue
            param_groups.append({"params": g["params"], "lr": g["lr"]})
            descriptions.append(g["desc"])
            trainable.update(g["names"])
        self._trainable = trainable
        self.prepare_grad_etc()
        return param_groups, descriptions

    def prepare_grad_etc(self) -> None:
        for name, p in self.named_parameters():
            p.requires_grad_(self._trainable is None or name in self._trainable)

    def get_trainable_params(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if self._trainable is None or name in self._trainable]

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the LoRA runs inside the base layers' (checkpointed) forwards."""

    def on_epoch_start(self) -> None:
        self.train()

    def on_step_start(self) -> None:
        """Hook for networks that need per-step work; plain LoRA needs none."""

    def before_optimizer_step(self) -> None:
        """Called after the backward pass(es), before the optimizer step: LoRA-GGPO reads the
        gradients here to scale the next steps' perturbations."""
        for m in self.loras:
            if m.ggpo_sigma is not None:
                m.update_ggpo_norms()

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device: torch.device | str) -> NormStats:
        """--scale_weight_norms: scale up and down by sqrt(ratio) so that each module's
        ||up @ down * alpha/rank||_F <= max_norm (norms under max_norm/2 are never scaled).
        Works on r x r Gram matrices instead of the full product, and syncs with the host
        once, at the end."""
        norms, scaled = [], []
        for m in self.loras:
            up = m.lora_up.weight.to(device=device, dtype=torch.float32).flatten(1)  # (out, r)
            down = m.lora_down.weight.to(device=device, dtype=torch.float32).flatten(1)  # (r, n)
            # ||U D||_F^2 = sum((U^T U) * (D D^T)) elementwise (both Gram matrices are symmetric)
            norm = ((up.T @ up) * (down @ down.T)).sum().clamp(min=0).sqrt() * m.scale
            floored = norm.clamp(min=max_norm_value / 2)  # never scale up, nor divide by ~0
            ratio = floored.clamp(max=max_norm_value) / floored
            factor = ratio.sqrt()
            m.lora_up.weight.mul_(factor.to(m.lora_up.weight.device, m.lora_up.weight.dtype))
            m.lora_down.weight.mul_(factor.to(m.lora_down.weight.device, m.lora_down.weight.dtype))
            norms.append(norm * ratio)
            scaled.append(ratio != 1)
        if not norms:
            return NormStats(0, 0.0, 0.0)
        all_norms = torch.stack(norms)
        stats = torch.stack([torch.stack(scaled).sum().float(), all_norms.mean(), all_norms.max()]).tolist()
        return NormStats(int(stats[0]), stats[1], stats[2])

    # -- saving and loading -----------------------------------------------------------

    def export_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """CPU copies of every tensor (alpha included), cast to `dtype` when given, as
        sd-scripts does for --save_precision."""
        state = self.state_dict()
        for m in self.loras:
            if m.split_dims is not None:
                # exactly what the forward computes: a block-diagonal up, so every reader of the fused
                # layout (diffusers, ComfyUI) gets the split LoRA and nothing else
                state[f"{m.lora_name}.lora_up.weight"] = m._up_weight()
        out = {}
        for key, value in state.items():
            value = value.detach().to("cpu", copy=True)
            out[key] = (value if dtype is None else value.to(dtype)).contiguous()
        return out

    def save_weights(self, path: str | os.PathLike, dtype: torch.dtype | None,
                     metadata: Mapping[str, str] | None) -> None:
        """Write the LoRA atomically (a failed write leaves any previous file intact).
        For .safetensors, `sshs_model_hash` and `sshs_legacy_hash` are added to the metadata."""
        tensors = self.export_state_dict(dtype)
        path = Path(path)
        if path.suffix != ".safetensors":
            buffer = io.BytesIO()
            torch.save(tensors, buffer)  # .pt/.ckpt carry no metadata, as in sd-scripts
            write_bytes_atomic(buffer.getvalue(), path)
            return
        meta = dict(metadata or {})
        bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata values must be str; not for {bad[:5]}")
        hashes = compute_sshs_hashes(tensors, meta)
        meta["sshs_model_hash"] = hashes.model_hash
        meta["sshs_legacy_hash"] = hashes.legacy_hash
        write_bytes_atomic(serialize(tensors, meta), path)

    def load_weights(self, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> LoadReport:
        """Load a LoRA file (or state dict) into this network. Every module of the file must
        exist here with the same shapes and vice versa; otherwise the error names the first
        keys, shapes and what the file looks like. Modules removed by apply_to are skipped."""
        label = "the given LoRA weights" if isinstance(source, Mapping) else str(source)
        sd = source if isinstance(source, Mapping) else load_lora_state_dict(source)
        saved = read_lora_modules(sd, label)
        own = {m.lora_name: m for m in self.loras}
        ignored = tuple(n for n in saved if n not in own and n in self._dropped)
        unknown = [n for n in saved if n not in own and n not in self._dropped]
        missing = [n for n in own if n not in saved]
        shape_errors = []
        for name in (n for n in saved if n in own):
            mod = own[name]
            for part in ("lora_down", "lora_up"):
                have = tuple(getattr(mod, part).weight.shape)
                got = tuple(sd[f"{name}.{part}.weight"].shape)
                if have != got:
                    shape_errors.append((f"{name}.{part}.weight", got, have))
        if unknown or missing or shape_errors:
            raise ModelFileError(mismatch_message(label, self.family, unknown=unknown, total=len(saved),
                                                  missing=missing, shape_errors=shape_errors))
        state = {}
        for name, mod in own.items():
            state[f"{name}.lora_down.weight"] = sd[f"{name}.lora_down.weight"]
            state[f"{name}.lora_up.weight"] = sd[f"{name}.lora_up.weight"]
            state[f"{name}.alpha"] = torch.tensor(saved[name].alpha, dtype=torch.float32)
        self.load_state_dict(state, strict=True)
        for mod in own.values():
            mod.check_split_layout(label)
        if ignored:
            logger.warning("%s: %d text-encoder LoRA modules in the file are not trained in this run and "
                           "will not be in the saved file (e.g. %s)", label, len(ignored), ignored[0])
        report = LoadReport(len(own), ignored)
        logger.info("%s: %s", label, report)
        return report


def _text_encoder_lrs(text_encoder_lr: float | Sequence[float] | None, default_lr: float) -> list[float]:
    if text_encoder_lr is None:
        return [float(default_lr)]
    if isinstance(text_encoder_lr, (int, float)):
        return [float(text_encoder_lr)]
    values = [float(v) for v in text_encoder_lr]
    return values or [float(default_lr)]


def _nth_text_encoder_lr(lrs: list[float], index: int) -> float:
    if index >= len(lrs):
        raise ConfigError(
            f"--text_encoder_lr has {len(lrs)} values but text encoder {index + 1} is trained; "
            "give one value for all text encoders or one per text encoder."
        )
    return lrs[index]


# ----------------------------------------------------------------------------------------
# LoRA files


class SshsHashes(NamedTuple):
    model_hash: str
    legacy_hash: str


def compute_sshs_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> SshsHashes:
    """The sd-webui-additional-networks hashes, computed as sd-scripts does (FORMATS 4.7):
    serialize with only the ss_* metadata; model hash = sha256 of the bytes after the header;
    legacy hash = first 8 hex of sha256 of the 64 KiB at offset 1 MiB of that buffer."""
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = serialize(dict(tensors), ss_only)
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(memoryview(data)[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(memoryview(data)[0x100000:0x110000]).hexdigest()[:8]
    return SshsHashes(model_hash, legacy_hash)


def load_lora_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors: safetensors (memory-mapped), or .pt/.ckpt read with
    weights_only=True (never unpickling code)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: file not found. Check the path you passed.")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a bad pickle
        raise ModelFileError(f"{path}: not a readable LoRA file ({e}). Use a .safetensors file.") from e
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelFileError(f"{path}: not a LoRA state dict (expected a flat dict of tensors).")
    return dict(sd)


@dataclass(frozen=True)
class SavedModule:
    """What a LoRA file says about one module."""

    rank: int
    alpha: float  # alpha missing or 0 in the file means alpha = rank
    down_shape: tuple[int, ...]
    up_shape: tuple[int, ...]


# Key spellings of other LoRA formats, to say what a foreign file is.
_FOREIGN_KEY_FORMATS = (
    (re.compile(r"\.lora_[AB]\."), "a diffusers/PEFT LoRA (lora_A/lora_B keys)"),
    (re.compile(r"\.lora\.(down|up)\."), "an old diffusers attention-processor LoRA"),
    (re.compile(r"\.(hada_w|lokr_w)"), "a LyCORIS LoHa/LoKr file"),
    (re.compile(r"\.dora_scale$"), "a DoRA LoRA"),
)


def read_lora_modules(sd: Mapping[str, torch.Tensor], source: str) -> dict[str, SavedModule]:
    """Rank, alpha and shapes of every module in an sd-scripts LoRA state dict (file order).
    Used to build a network from a file (--network_weights with --dim_from_weights, --lora)."""
    foreign = [k for k in sd if k.partition(".")[2] not in LORA_SUFFIXES]
    if foreign:
        kind = next((desc for pattern, desc in _FOREIGN_KEY_FORMATS for k in foreign if pattern.search(k)),
                    "unrecognised keys")
        raise ModelFileError(
            f"{source}: not an sd-scripts-format LoRA: {kind}, e.g. '{foreign[0]}'. Expected only "
            "<name>.lora_down.weight / <name>.lora_up.weight / <name>.alpha keys; convert the file first."
        )
    names = list(dict.fromkeys(k.partition(".")[0] for k in sd))
    if not names:
        raise ModelFileError(f"{source}: the file holds no LoRA tensors.")
    modules = {}
    for name in names:
        down, up = sd.get(f"{name}.lora_down.weight"), sd.get(f"{name}.lora_up.weight")
        if down is None or up is None:
            raise ModelFileError(f"{source}: module {name} lacks its lora_down or lora_up weight; the file is damaged.")
        rank = down.shape[0]
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != rank:
            raise ModelFileError(f"{source}: {name} has inconsistent shapes: lora_down {tuple(down.shape)}, "
                                 f"lora_up {tuple(up.shape)}.")
        alpha_t = sd.get(f"{name}.alpha")
        alpha = float(alpha_t) if alpha_t is not None else 0.0
        modules[name] = SavedModule(rank, alpha or float(rank), tuple(down.shape), tuple(up.shape))
    return modules


def _expected_shapes(module: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if isinstance(module, nn.Conv2d):
        return (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
    return (rank, module.in_features), (module.out_features, rank)


def targets_from_weights(layers: Sequence[LayerRef], saved: Mapping[str, SavedModule],
                         source: str) -> tuple[list[LoRATarget], list[str]]:
    """Targets for the layers named in the file, with the file's ranks and alphas, plus the
    file's module names that match no layer (the caller decides how to report them)."""
    by_name = {layer.lora_name: layer for layer in layers}
    targets = []
    shape_errors = []
    for name, info in saved.items():
        layer = by_name.get(name)
        if layer is None:
            continue
        down_shape, up_shape = _expected_shapes(layer.module, info.rank)
        if info.down_shape != down_shape or info.up_shape != up_shape:
            shape_errors.append((name, info.down_shape, down_shape))
            continue
        targets.append(layer.target(info.rank, info.alpha))
    if shape_errors:
        name, got, want = shape_errors[0]
        raise ModelFileError(
            f"{source}: {len(shape_errors)} modules do not fit this model's layer sizes, e.g. {name}: "
            f"lora_down {got} in the file, {want} expected. The LoRA was trained on a model of another size."
        )
    unmatched = [n for n in saved if n not in by_name]
    return targets, unmatched


# Which model family a LoRA's module names belong to (sd-scripts naming), for error messages.
_KNOWN_LAYOUTS = (
    ("FLUX.1 / Chroma (networks.lora_flux)",
     re.compile(r"^lora_unet_((double|single)_blocks_\d+_|(img|txt|time|vector|guidance)_in)")),
    ("SD3 / SD3.5 (networks.lora_sd3)", re.compile(r"^lora_unet_(joint_blocks_\d+_|context_embedder|y_embedder)")),
    ("Lumina Image 2.0 (networks.lora_lumina)",
     re.compile(r"^lora_unet_((layers|noise_refiner|context_refiner)_\d+_|cap_embedder)")),
    ("Anima (networks.lora_anima)", re.compile(r"^lora_unet_(blocks_\d+_|llm_adapter_)")),
    ("SD 1.x / 2.x (networks.lora)", re.compile(r"^lora_unet_(down_blocks|up_blocks|mid_block)_|^lora_te_text_model_")),
    ("SDXL", re.compile(r"^lora_unet_(input_blocks|output_blocks|middle_block)_")),
    ("Lumina Image 2.0 or Anima text encoder", re.compile(r"^lora_te_(model_)?layers_\d+_")),
)


class LayoutGuess(NamedTuple):
    label: str
    example: str


def identify_lora_layout(names: Sequence[str]) -> LayoutGuess | None:
    """The family whose sd-scripts LoRA names most of `names` follow, or None."""
    votes: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for name in names:
        for label, pattern in _KNOWN_LAYOUTS:
            if pattern.search(name):
                votes[label] += 1
                examples.setdefault(label, name)
                break
    if not votes:
        return None
    label, _ = votes.most_common(1)[0]
    return LayoutGuess(label, examples[label])


def mismatch_message(source: str, family: str, *, unknown: Sequence[str], total: int,
                     missing: Sequence[str] = (), shape_errors: Sequence[tuple] = (),
                     hint: str | None = None) -> str:
    """The explanation for a LoRA file that does not fit a network."""
    parts = [f"{source}: this LoRA does not fit the {family} model."]
    if unknown:
        parts.append(f"{len(unknown)} of its {total} modules match no layer, e.g. {', '.join(unknown[:3])}.")
        guess = identify_lora_layout(unknown)
        if guess is not None:
            parts.append(f"Its names look like a {guess.label} LoRA ({guess.example}).")
    if hint:
        parts.append(hint)
    if missing:
        parts.append(f"{len(missing)} modules of the network are not in the file, e.g. {', '.join(missing[:3])}: "
                     "build the network from the file (--dim_from_weights) or use the network_args it was trained with.")
    if shape_errors:
        key, got, have = shape_errors[0]
        parts.append(f"{len(shape_errors)} tensors differ in shape, e.g. {key}: {got} in the file, {have} in the "
                     f"network (rank {got[0] if 'lora_down' in key else got[1]} vs "
                     f"{have[0] if 'lora_down' in key else have[1]}); pass the file's --network_dim or use "
                     "--dim_from_weights.")
    return " ".join(parts)
