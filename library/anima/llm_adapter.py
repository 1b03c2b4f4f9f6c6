"""Anima's LLM adapter: Qwen3 hidden states -> the T5-compatible cross-attention space of the DiT.

The queries are learned embeddings of the caption's T5 token ids (T5 itself never runs); six
transformer blocks each self-attend over those queries and cross-attend to the Qwen3 hidden
states, both with RoPE on queries and keys (positions 0.. of each sequence). The output goes
through `out_proj` and an RMS norm; positions where the T5 mask is 0 are zeroed and the result
is zero-padded to 512 tokens, the context length the DiT was trained with (ComfyUI and diffusers
do the same; the DiT's cross-attention has no mask, so the number of zero tokens matters).

Checkpoint names (under `llm_adapter.`): `embed`, `blocks.N.{norm_self_attn, self_attn.{q,k,v,o}_proj,
self_attn.{q,k}_norm, norm_cross_attn, cross_attn.*, norm_mlp, mlp.0, mlp.2}`, `out_proj`, `norm`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from library.attention import attention

MIN_CONTEXT_LENGTH = 512
T5_EOS_ID = 1  # `</s>`: the ids of an empty caption are [1, 0, 0, ...]
T5_PAD_ID = 0


@dataclass(frozen=True)
class LLMAdapterParams:
    source_dim: int = 1024      # Qwen3 hidden size
    target_dim: int = 1024      # embedding / output width (= the DiT's crossattn_emb_channels)
    model_dim: int = 1024       # width inside the blocks (an in_proj exists when it differs)
    num_layers: int = 6
    num_heads: int = 16         # head size 64
    mlp_hidden: int = 4096
    vocab_size: int = 32128     # T5 v1.1 embedding rows
    self_attention: bool = True
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads


class AdapterRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        normed = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            normed = normed.to(self.weight.dtype)
        return self.weight * normed


def rope_cos_sin(length: int, head_dim: int, theta: float, device, dtype) -> tuple[Tensor, Tensor]:
    """(length, head_dim) cos and sin for the rotate-half convention (frequencies repeated)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, L, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class AdapterAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, num_heads: int, head_dim: int):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(query_dim, inner, bias=False)
        self.q_norm = AdapterRMSNorm(head_dim)
        self.k_proj = nn.Linear(context_dim, inner, bias=False)
        self.k_norm = AdapterRMSNorm(head_dim)
        self.v_proj = nn.Linear(context_dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, query_dim, bias=False)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None, rope_q: tuple[Tensor, Tensor],
                rope_k: tuple[Tensor, Tensor]) -> Tensor:
        b, lq, _ = x.shape
        lk = context.shape[1]
        q = self.q_norm(self.q_proj(x).view(b, lq, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(context).view(b, lk, self.num_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(context).view(b, lk, self.num_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, *rope_q), _rotate(k, *rope_k)
        out = attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, lq, -1))


class LLMAdapterTransformerBlock(nn.Module):
    def __init__(self, p: LLMAdapterParams):
        super().__init__()
        self.has_self_attn = p.self_attention
        if p.self_attention:
            self.norm_self_attn = AdapterRMSNorm(p.model_dim)
            self.self_attn = AdapterAttention(p.model_dim, p.model_dim, p.num_heads, p.head_dim)
        self.norm_cross_attn = AdapterRMSNorm(p.model_dim)
        self.cross_attn = AdapterAttention(p.model_dim, p.source_dim, p.num_heads, p.head_dim)
        self.norm_mlp = AdapterRMSNorm(p.model_dim)
        self.mlp = nn.Sequential(nn.Linear(p.model_dim, p.mlp_hidden), nn.GELU(), nn.Linear(p.mlp_hidden, p.model_dim))

    def forward(self, x: Tensor, source: Tensor, target_mask: Tensor | None, source_mask: Tensor | None,
                rope_target: tuple[Tensor, Tensor], rope_source: tuple[Tensor, Tensor]) -> Tensor:
        if self.has_self_attn:
            normed = self.norm_self_attn(x)
            x = x + self.self_attn(normed, normed, target_mask, rope_target, rope_target)
        x = x + self.cross_attn(self.norm_cross_attn(x), source, source_mask, rope_target, rope_source)
        return x + self.mlp(self.norm_mlp(x))


def _key_mask(mask: Tensor | None) -> Tensor | None:
    """(B, L) 1 = real token -> bool (B, 1, 1, L). A row with no real token (a dropped caption)
    attends to every position instead of none: those positions hold zeros (the Qwen3 output is
    zeroed at padding), so the result is the "attend to nothing" zero vector rather than NaN."""
    if mask is None:
        return None
    mask = mask.bool()
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask[:, None, None, :]


class LLMAdapter(nn.Module):
    def __init__(self, p: LLMAdapterParams = LLMAdapterParams()):
        super().__init__()
        self.params = p
        self.embed = nn.Embedding(p.vocab_size, p.target_dim)
        self.in_proj = nn.Linear(p.target_dim, p.model_dim) if p.model_dim != p.target_dim else nn.Identity()
        self.blocks = nn.ModuleList(LLMAdapterTransformerBlock(p) for _ in range(p.num_layers))
        self.out_proj = nn.Linear(p.model_dim, p.target_dim)
        self.norm = AdapterRMSNorm(p.target_dim)

    def forward(self, source_hidden: Tensor, target_ids: Tensor, target_mask: Tensor | None = None,
                source_mask: Tensor | None = None, min_length: int = MIN_CONTEXT_LENGTH) -> Tensor:
        """source_hidden (B, S, source_dim) Qwen3 states; target_ids (B, L) T5 ids; masks (B, L) /
        (B, S), 1 = real token. Returns (B, max(L, min_length), target_dim)."""
        x = self.in_proj(self.embed(target_ids).to(source_hidden.dtype))
        p = self.params
        rope_target = rope_cos_sin(x.shape[1], p.head_dim, p.rope_theta, x.device, x.dtype)
        rope_source = rope_cos_sin(source_hidden.shape[1], p.head_dim, p.rope_theta, x.device, x.dtype)
        t_mask, s_mask = _key_mask(target_mask), _key_mask(source_mask)
        for block in self.blocks:
            x = block(x, source_hidden, t_mask, s_mask, rope_target, rope_source)
        x = self.norm(self.out_proj(x))
        if target_mask is not None:
            x = x * target_mask.to(x.dtype)[..., None]
        if x.shape[1] < min_length:
            x = F.pad(x, (0, 0, 0, min_length - x.shape[1]))
        return x
