"""The building blocks of Lumina Image 2.0's Next-DiT, in the Alpha-VLLM checkpoint's module names.

Attribute names here ARE the checkpoint keys (`layers.N.attention.qkv.weight`,
`noise_refiner.N.adaLN_modulation.1.weight`...) and the LoRA names
(`lora_unet_layers_0_attention_qkv`), so do not rename anything. The LoRA module finds its
targets by the class names JointTransformerBlock and FinalLayer.

The rotary embedding (consecutive channel pairs, angles in float64) and the sinusoidal
timestep embedding (cos half first) are the same math as FLUX's and come from
library.flux.layers; Lumina feeds t in [0, 1] without FLUX's x1000.

Norms, modulation and gated residuals use the fused ops of library/block_ops.py (as FLUX does):
the same math as the reference up to bf16 rounding, in a few kernels instead of many.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from library.attention import RightPadding, attention_right_padded
from library.block_ops import gated_residual, modulated_layer_norm, modulated_rms_norm, rms_norm
from library.flux.layers import apply_rope, timestep_embedding

FREQUENCY_EMBEDDING_SIZE = 256


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learned `weight` (checkpoint name), as the reference's
    x * rsqrt(mean(x^2) + eps) * weight: one fused kernel, statistics and the product in
    float32, one rounding to x's dtype (the weight is first cast to x's dtype)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class JointAttention(nn.Module):
    """Grouped-query self-attention with per-head RMS-normed q and k and 3-axis RoPE.
    `qkv` stacks q (n_heads), k and v (n_kv_heads each) heads of `head_dim` along dim 0."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, norm_eps: float):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.qkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * head_dim, bias=False)
        self.out = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, norm_eps)
        self.k_norm = RMSNorm(head_dim, norm_eps)

    def forward(self, x: Tensor, freqs: Tensor, padding: RightPadding | None) -> Tensor:
        """x (B, L, dim); freqs (B, 1, L, head_dim/2, 2) from EmbedND; padding None = all real."""
        batch, length, _ = x.shape
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_width, kv_width, kv_width], dim=-1)
        # (B, L, heads, D) -> (B, heads, L, D)
        q = self.q_norm(q.view(batch, length, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(batch, length, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        repeats = self.n_heads // self.n_kv_heads
        if repeats > 1:  # kv head j serves query heads j*repeats .. (j+1)*repeats - 1
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        out = attention_right_padded(q, k, v, padding)
        return self.out(out.transpose(1, 2).reshape(batch, length, q_width))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class JointTransformerBlock(nn.Module):
    """Pre- and post-normed attention and FFN (sandwich norms). With `modulation` (noise
    refiner and main layers) the timestep embedding scales the pre-norms and tanh-gates both
    branches; the context refiner has no modulation."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, ffn_hidden_dim: int, norm_eps: float,
                 modulation: bool, adaln_dim: int):
        super().__init__()
        self.attention = JointAttention(dim, n_heads, n_kv_heads, dim // n_heads, norm_eps)
        self.feed_forward = FeedForward(dim, ffn_hidden_dim)
        self.attention_norm1 = RMSNorm(dim, norm_eps)
        self.ffn_norm1 = RMSNorm(dim, norm_eps)
        self.attention_norm2 = RMSNorm(dim, norm_eps)
        self.ffn_norm2 = RMSNorm(dim, norm_eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, 4 * dim, bias=True))

    def forward(self, x: Tensor, freqs: Tensor, padding: RightPadding | None,
                adaln_input: Tensor | None = None) -> Tensor:
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), freqs, padding))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        if adaln_input is None:
            raise ValueError("a modulated Lumina block needs the timestep embedding")
        # (B, 4*dim) -> four (B, 1, dim)
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln_input).unsqueeze(1).chunk(4, dim=-1)
        pre_attn, pre_ffn = self.attention_norm1, self.ffn_norm1
        attn = self.attention(modulated_rms_norm(x, pre_attn.weight, scale_msa, pre_attn.eps), freqs, padding)
        x = gated_residual(x, gate_msa.tanh(), self.attention_norm2(attn))
        ffn = self.feed_forward(modulated_rms_norm(x, pre_ffn.weight, scale_mlp, pre_ffn.eps))
        return gated_residual(x, gate_mlp.tanh(), self.ffn_norm2(ffn))


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (1 = clean image) -> sinusoid (256, cos then sin) -> MLP of width min(dim, 1024)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_EMBEDDING_SIZE, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))

    def forward(self, t: Tensor) -> Tensor:
        t_freq = timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE, time_factor=1.0)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    """Affine-free LayerNorm scaled by the timestep embedding, then the patch projection."""

    def __init__(self, dim: int, out_features: int, adaln_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_features, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, dim, bias=True))

    def forward(self, x: Tensor, adaln_input: Tensor) -> Tensor:
        scale = self.adaLN_modulation(adaln_input).unsqueeze(1)
        return self.linear(modulated_layer_norm(x, None, scale, self.norm_final.eps))   # no shift in Lumina
