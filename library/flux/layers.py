"""The building blocks of the FLUX.1 / Chroma DiT, in Black Forest Labs' module names.

Attribute names here ARE the checkpoint key names (`double_blocks.N.img_attn.qkv.weight`...)
and the LoRA names (`lora_unet_double_blocks_0_img_attn_qkv`), so do not rename anything.
The LoRA module finds its targets by the class names DoubleStreamBlock and SingleStreamBlock.

Chroma uses the same blocks without their own modulation layers: the model hands each block
precomputed modulation vectors (`own_modulation=False`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from library.attention import attention
from library.block_ops import gated_residual, modulated_layer_norm, rms_norm, rotate_pairs


# ---------------------------------------------------------------------------------------------
# Pure math: rotary position embedding and the sinusoidal timestep embedding.

def rope_frequencies(positions: Tensor, dim: int, theta: int) -> Tensor:
    """(..., L) positions -> (..., L, dim/2, 2) [cos, sin] of the rotation angles.

    Angles are computed in float64 (positions up to a few hundred times frequencies near 1
    lose digits in float32) and returned as float32.
    """
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return torch.stack((angles.cos(), angles.sin()), dim=-1).float()


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate consecutive channel pairs (x0, x1) of x (B, H, L, D) by freqs (B, 1, L, D/2, 2)."""
    return rotate_pairs(x, freqs)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t (B,) scaled by `time_factor`, cos half first, then sin."""
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    embedding = torch.cat((torch.cos(args), torch.sin(args)), dim=-1)
    if dim % 2:
        embedding = torch.cat((embedding, torch.zeros_like(embedding[:, :1])), dim=-1)
    return embedding


class EmbedND(nn.Module):
    """RoPE over several id axes: each token's ids (L, n_axes) rotate separate channel groups."""

    def __init__(self, dim: int, theta: int, axes_dim: list[int]):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        # ids (B, L, n_axes) -> (B, 1, L, head_dim/2, 2), broadcast over heads.
        per_axis = [rope_frequencies(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)]
        return torch.cat(per_axis, dim=-2).unsqueeze(1)


# ---------------------------------------------------------------------------------------------
# Small layers.

class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in float32, with a learned `scale` (checkpoint name)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.scale, 1e-6)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class SelfAttention(nn.Module):
    """Holds the attention weights of one stream; the blocks run the joint attention."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def finish_qkv(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The qkv projection (B, L, 3 * dim) -> normed q, k and v, each (B, H, L, D)."""
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


@dataclass
class ModulationOut:
    """One adaLN modulation: x -> (1 + scale) * norm(x) + shift; the branch output is * gate.
    Each tensor is (B, 1, dim)."""

    shift: Tensor
    scale: Tensor
    gate: Tensor

    def norm_modulate(self, x: Tensor, norm: nn.LayerNorm) -> Tensor:
        """(1 + scale) * norm(x) + shift, in one fused kernel where it can (library/block_ops.py)."""
        return modulated_layer_norm(x, self.shift, self.scale, norm.eps)


@dataclass
class DoubleBlockModulation:
    """The four modulations of a double block (attention and MLP, per stream)."""

    img_attn: ModulationOut
    img_mlp: ModulationOut
    txt_attn: ModulationOut
    txt_mlp: ModulationOut


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        chunks = self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        first = ModulationOut(*chunks[:3])
        second = ModulationOut(*chunks[3:]) if self.is_double else None
        return first, second


def _mlp(hidden_size: int, mlp_hidden_dim: int) -> nn.Sequential:
    # Sequential indices 0 and 2 are checkpoint names (img_mlp.0, img_mlp.2).
    return nn.Sequential(
        nn.Linear(hidden_size, mlp_hidden_dim, bias=True),
        nn.GELU(approximate="tanh"),
        nn.Linear(mlp_hidden_dim, hidden_size, bias=True),
    )


def _layer_norm(hidden_size: int) -> nn.LayerNorm:
    return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)


# ---------------------------------------------------------------------------------------------
# Blocks.

class DoubleStreamBlock(nn.Module):
    """Image and text streams with separate weights, one joint attention over both."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = True,
                 own_modulation: bool = True):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        if own_modulation:
            self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = _layer_norm(hidden_size)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.img_norm2 = _layer_norm(hidden_size)
        self.img_mlp = _mlp(hidden_size, mlp_hidden_dim)

        if own_modulation:
            self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = _layer_norm(hidden_size)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.txt_norm2 = _layer_norm(hidden_size)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden_dim)
        self.own_modulation = own_modulation

    def modulations(self, vec: Tensor | DoubleBlockModulation) -> DoubleBlockModulation:
        if not self.own_modulation:
            assert isinstance(vec, DoubleBlockModulation), "this block needs precomputed modulations"
            return vec
        img_attn, img_mlp = self.img_mod(vec)
        txt_attn, txt_mlp = self.txt_mod(vec)
        return DoubleBlockModulation(img_attn, img_mlp, txt_attn, txt_mlp)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor | DoubleBlockModulation, pe: Tensor,
                attn_mask: Tensor | None = None, txt_first: bool = True) -> tuple[Tensor, Tensor]:
        """img (B, Li, dim), txt (B, Lt, dim); `vec` is the conditioning vector (FLUX) or the
        precomputed modulations (Chroma). `pe` and `attn_mask` follow the joint token order:
        text first for FLUX (txt_first=True), image first for Chroma."""
        mod = self.modulations(vec)
        img_in = mod.img_attn.norm_modulate(img, self.img_norm1)
        txt_in = mod.txt_attn.norm_modulate(txt, self.txt_norm1)
        img_qkv = self.img_attn.qkv(img_in)   # image first, as before (LoRA dropout draws in this order)
        attns, qkvs = (self.txt_attn, self.img_attn), (self.txt_attn.qkv(txt_in), img_qkv)
        if not txt_first:
            attns, qkvs = attns[::-1], qkvs[::-1]
        q, k, v = (torch.cat(x, dim=2) for x in zip(*(attn.finish_qkv(qkv) for attn, qkv in zip(attns, qkvs))))
        q, k = apply_rope(q, pe), apply_rope(k, pe)
        joint = rearrange(attention(q, k, v, attn_mask), "B H L D -> B L (H D)")

        n_txt = txt.shape[1]
        if txt_first:
            txt_out, img_out = joint[:, :n_txt], joint[:, n_txt:]
        else:
            img_out, txt_out = joint[:, :-n_txt], joint[:, -n_txt:]

        img = gated_residual(img, mod.img_attn.gate, self.img_attn.proj(img_out))
        img = gated_residual(img, mod.img_mlp.gate, self.img_mlp(mod.img_mlp.norm_modulate(img, self.img_norm2)))
        txt = gated_residual(txt, mod.txt_attn.gate, self.txt_attn.proj(txt_out))
        txt = gated_residual(txt, mod.txt_mlp.gate, self.txt_mlp(mod.txt_mlp.norm_modulate(txt, self.txt_norm2)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over the joined tokens; attention and MLP run in parallel from one linear1."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, own_modulation: bool = True):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        # linear1 output = q, k, v (3 * hidden) followed by the MLP input (mlp_hidden_dim).
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = _layer_norm(hidden_size)
        self.mlp_act = nn.GELU(approximate="tanh")
        if own_modulation:
            self.modulation = Modulation(hidden_size, double=False)
        self.own_modulation = own_modulation

    def forward(self, x: Tensor, vec: Tensor | ModulationOut, pe: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        if self.own_modulation:
            mod, _ = self.modulation(vec)
        else:
            assert isinstance(vec, ModulationOut), "this block needs precomputed modulations"
            mod = vec
        qkv, mlp_in = torch.split(self.linear1(mod.norm_modulate(x, self.pre_norm)),
                                  [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        q, k = apply_rope(q, pe), apply_rope(k, pe)
        attn = rearrange(attention(q, k, v, attn_mask), "B H L D -> B L (H D)")
        return gated_residual(x, mod.gate, self.linear2(torch.cat((attn, self.mlp_act(mlp_in)), dim=2)))


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int, own_modulation: bool = True):
        super().__init__()
        self.norm_final = _layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels, bias=True)
        if own_modulation:
            # Output is (shift, scale) in that order (diffusers stores it swapped).
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))
        self.own_modulation = own_modulation

    def forward(self, x: Tensor, vec: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        """vec: the conditioning vector (B, dim), or Chroma's precomputed (shift, scale), each (B, 1, dim)."""
        if self.own_modulation:
            shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        else:
            shift, scale = vec
        return self.linear(modulated_layer_norm(x, shift, scale, self.norm_final.eps))
