"""The Anima DiT: Cosmos-Predict2's MiniTrainDIT in the original module names, plus its LLM adapter.

Module names follow the checkpoint keys (without ComfyUI's `net.` prefix), so files load with no
key conversion and LoRA names come out as sd-scripts and ComfyUI expect:
`blocks.N.{self_attn,cross_attn}.{q,k,v,output_proj}`, `blocks.N.mlp.layer{1,2}`,
`blocks.N.adaln_modulation_{self_attn,cross_attn,mlp}.{1,2}`, `x_embedder.proj.1`,
`t_embedder.1.linear_{1,2}`, `t_embedding_norm`, `final_layer.{linear,adaln_modulation.1/.2}`,
`llm_adapter.*`. `blocks` is a plain nn.ModuleList so block swap or LoRA can work on it from
outside; gradient checkpointing is per block, as for FLUX.

Shapes: latents (B, C, T, H, W) with T = 1 for images (4-D (B, C, H, W) is accepted too);
timesteps (B,) = sigma in [0, 1]; text context (B, N, crossattn_emb_channels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import Tensor, nn

from library.anima.llm_adapter import LLMAdapter, LLMAdapterParams
from library.attention import attention, attention_per_sample
from library.block_checkpointing import BlockCheckpointing
from library.block_ops import gated_residual, modulated_layer_norm, rms_norm, rotate_halves


@dataclass(frozen=True)
class AnimaParams:
    """Sizes of the DiT. The defaults are Anima's (Cosmos-Predict2 2B + LLM adapter, 28 blocks)."""

    in_channels: int = 16
    out_channels: int = 16
    model_channels: int = 2048
    num_blocks: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    crossattn_emb_channels: int = 1024
    patch_spatial: int = 2
    patch_temporal: int = 1
    concat_padding_mask: bool = True
    adaln_lora_dim: int = 256
    # NTK extrapolation ratios of the 3-D RoPE (t, h, w); Anima: 1, 4, 4.
    rope_extrapolation: tuple[float, float, float] = (1.0, 4.0, 4.0)
    llm_adapter: LLMAdapterParams | None = field(default_factory=LLMAdapterParams)

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads

    @property
    def max_blocks_to_swap(self) -> int:
        """The seed's limits: 18 / 26 / 34 for 20 / 28 / 36 blocks."""
        return self.num_blocks - 2

    def check(self) -> None:
        if self.model_channels % self.num_heads:
            raise ValueError(f"model_channels {self.model_channels} is not divisible by num_heads {self.num_heads}")
        if self.head_dim < 8 or self.head_dim % 2:
            raise ValueError(f"head size {self.head_dim} is too small or odd for the 3-D RoPE")


ANIMA_PARAMS = AnimaParams()
# The depths Anima ships (the seed's block-swap table); width and heads stay those of the 2B DiT.
DEPTH_VARIANTS = {depth: replace(ANIMA_PARAMS, num_blocks=depth) for depth in (20, 28, 36)}


# ---------------------------------------------------------------------------------------------
# Pure math: timestep features and the 3-D rotary embedding.

def timestep_features(sigmas: Tensor, channels: int) -> Tensor:
    """Sinusoidal features of sigma (no x1000 scaling), cos first then sin: (B,) -> (B, channels)."""
    half = channels // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigmas.device) / half)
    angles = sigmas.float()[:, None] * freqs[None]
    return torch.cat((torch.cos(angles), torch.sin(angles)), dim=-1)


def rope3d_angles(head_dim: int, t: int, h: int, w: int, extrapolation: tuple[float, float, float],
                  device: torch.device | str | None = None) -> Tensor:
    """Rotation angles (t*h*w, head_dim) in float32, token order (t, h, w) row-major.

    The head is split into h = w = head_dim // 6 * 2 channels and t = the rest; each axis has
    its own base 10000 * ratio ** (d / (d - 2)) (NTK-aware extrapolation). The angle vector is
    [t, h, w] frequencies repeated twice, for the rotate-half convention."""
    dim_h = head_dim // 6 * 2
    dim_t = head_dim - 2 * dim_h

    def freqs(dim: int, ratio: float) -> Tensor:
        theta = 10000.0 * ratio ** (dim / (dim - 2))
        exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=device)[: dim // 2] / dim
        return 1.0 / theta ** exponent

    ratio_t, ratio_h, ratio_w = extrapolation
    ang_t = torch.outer(torch.arange(t, dtype=torch.float32, device=device), freqs(dim_t, ratio_t))
    ang_h = torch.outer(torch.arange(h, dtype=torch.float32, device=device), freqs(dim_h, ratio_h))
    ang_w = torch.outer(torch.arange(w, dtype=torch.float32, device=device), freqs(dim_h, ratio_w))
    grid = torch.cat((
        ang_t[:, None, None, :].expand(t, h, w, -1),
        ang_h[None, :, None, :].expand(t, h, w, -1),
        ang_w[None, None, :, :].expand(t, h, w, -1),
    ), dim=-1)
    return torch.cat((grid, grid), dim=-1).reshape(t * h * w, head_dim)


# ---------------------------------------------------------------------------------------------
# Layers (checkpoint names).

class RMSNorm(nn.Module):
    """RMS norm with float32 statistics, in the input's dtype (`weight` as in the checkpoint);
    PyTorch's fused kernel (library/block_ops.py)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Self- (context_dim None) or cross-attention with per-head RMS q/k norms; RoPE on
    self-attention only. No biases."""

    def __init__(self, query_dim: int, context_dim: int | None, num_heads: int, head_dim: int):
        super().__init__()
        inner = num_heads * head_dim
        self.is_self_attention = context_dim is None
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(query_dim, inner, bias=False)
        self.q_norm = RMSNorm(head_dim)
        self.k_proj = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.k_norm = RMSNorm(head_dim)
        self.v_proj = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.output_proj = nn.Linear(inner, query_dim, bias=False)
        self.split_attn = False  # --split_attn: one sample at a time

    def forward(self, x: Tensor, context: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        context = x if context is None else context
        q = self.q_norm(rearrange(self.q_proj(x), "b l (h d) -> b l h d", d=self.head_dim))
        k = self.k_norm(rearrange(self.k_proj(context), "b l (h d) -> b l h d", d=self.head_dim))
        v = rearrange(self.v_proj(context), "b l (h d) -> b l h d", d=self.head_dim)
        if self.is_self_attention and rope is not None:
            q, k = rotate_halves(q, *rope), rotate_halves(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = (attention_per_sample if self.split_attn else attention)(q, k, v)
        return self.output_proj(rearrange(out, "b h l d -> b l (h d)"))


class GPT2FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden, bias=False)
        self.activation = nn.GELU()
        self.layer2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer2(self.activation(self.layer1(x)))


def adaln_modulation(dim: int, lora_dim: int, chunks: int) -> nn.Sequential:
    """SiLU -> down to the AdaLN-LoRA width -> up to `chunks` x dim (keys `.1` and `.2`)."""
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, lora_dim, bias=False), nn.Linear(lora_dim, chunks * dim, bias=False))


def modulation(module: nn.Module, emb: Tensor, adaln_lora: Tensor, chunks: int) -> list[Tensor]:
    """The AdaLN parameters (shift, scale[, gate]) for one sample each, shaped (B, 1, D)."""
    out = module(emb) + adaln_lora[:, : module[2].out_features]
    return [c[:, None, :] for c in out.chunk(chunks, dim=-1)]


class Block(nn.Module):
    """Self-attention, cross-attention and MLP, each as x + gate * f(norm(x) * (1 + scale) + shift),
    with the norm + modulation and the gated residual as fused kernels (library/block_ops.py)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, mlp_ratio: float, adaln_lora_dim: int):
        super().__init__()
        head_dim = dim // num_heads
        self.layer_norm_self_attn = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = Attention(dim, None, num_heads, head_dim)
        self.layer_norm_cross_attn = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(dim, context_dim, num_heads, head_dim)
        self.layer_norm_mlp = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = GPT2FeedForward(dim, int(dim * mlp_ratio))
        self.adaln_modulation_self_attn = adaln_modulation(dim, adaln_lora_dim, 3)
        self.adaln_modulation_cross_attn = adaln_modulation(dim, adaln_lora_dim, 3)
        self.adaln_modulation_mlp = adaln_modulation(dim, adaln_lora_dim, 3)

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, rope: tuple[Tensor, Tensor],
                adaln_lora: Tensor) -> Tensor:
        """x (B, L, D) tokens; emb (B, D) normalised timestep features; adaln_lora (B, 3D)."""
        shift, scale, gate = modulation(self.adaln_modulation_self_attn, emb, adaln_lora, 3)
        normed = modulated_layer_norm(x, shift, scale, self.layer_norm_self_attn.eps)
        x = gated_residual(x, gate, self.self_attn(normed, rope=rope))
        shift, scale, gate = modulation(self.adaln_modulation_cross_attn, emb, adaln_lora, 3)
        normed = modulated_layer_norm(x, shift, scale, self.layer_norm_cross_attn.eps)
        x = gated_residual(x, gate, self.cross_attn(normed, context))
        shift, scale, gate = modulation(self.adaln_modulation_mlp, emb, adaln_lora, 3)
        return gated_residual(x, gate, self.mlp(modulated_layer_norm(x, shift, scale, self.layer_norm_mlp.eps)))


class PatchEmbed(nn.Module):
    """(B, C, T, H, W) -> (B, T', H', W', D); `proj.0` rearranges, `proj.1` is the checkpoint's Linear."""

    def __init__(self, in_channels: int, dim: int, patch_spatial: int, patch_temporal: int):
        super().__init__()
        self.proj = nn.Sequential(
            Rearrange("b c (t r) (h m) (w n) -> b t h w (c r m n)", r=patch_temporal, m=patch_spatial,
                      n=patch_spatial),
            nn.Linear(in_channels * patch_spatial * patch_spatial * patch_temporal, dim, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Timesteps(nn.Module):
    """`t_embedder.0`: sigma -> sinusoidal features (no weights)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, sigmas: Tensor) -> Tensor:
        return timestep_features(sigmas, self.channels)


class TimestepEmbedding(nn.Module):
    """`t_embedder.1`: with AdaLN-LoRA the block embedding is the sinusoid itself and this MLP
    produces the shared (B, 3D) AdaLN-LoRA term."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.activation = nn.SiLU()
        self.linear_2 = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear_2(self.activation(self.linear_1(features)))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_spatial: int, patch_temporal: int, out_channels: int, adaln_lora_dim: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_spatial * patch_spatial * patch_temporal * out_channels, bias=False)
        self.adaln_modulation = adaln_modulation(dim, adaln_lora_dim, 2)

    def forward(self, x: Tensor, emb: Tensor, adaln_lora: Tensor) -> Tensor:
        shift, scale = modulation(self.adaln_modulation, emb, adaln_lora, 2)
        return self.linear(modulated_layer_norm(x, shift, scale, self.layer_norm.eps))


# ---------------------------------------------------------------------------------------------
# The model.

class Anima(BlockCheckpointing, nn.Module):
    """MiniTrainDIT + LLM adapter. forward: noisy latents, sigma and text -> velocity (same shape)."""

    def __init__(self, params: AnimaParams = ANIMA_PARAMS):
        super().__init__()
        params.check()
        self.params = params
        dim = params.model_channels
        in_channels = params.in_channels + (1 if params.concat_padding_mask else 0)
        self.x_embedder = PatchEmbed(in_channels, dim, params.patch_spatial, params.patch_temporal)
        self.t_embedder = nn.Sequential(Timesteps(dim), TimestepEmbedding(dim))
        self.t_embedding_norm = RMSNorm(dim)
        if params.llm_adapter is not None:
            self.llm_adapter = LLMAdapter(params.llm_adapter)
        self.blocks = nn.ModuleList(
            Block(dim, params.crossattn_emb_channels, params.num_heads, params.mlp_ratio, params.adaln_lora_dim)
            for _ in range(params.num_blocks)
        )
        self.final_layer = FinalLayer(dim, params.patch_spatial, params.patch_temporal, params.out_channels,
                                      params.adaln_lora_dim)

    @property
    def has_llm_adapter(self) -> bool:
        return self.params.llm_adapter is not None

    def set_split_attn(self, enabled: bool) -> None:
        """--split_attn: run every DiT attention one sample at a time (same result, less memory)."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.split_attn = enabled

    def encode_context(self, qwen3_hidden: Tensor, t5_input_ids: Tensor, t5_attn_mask: Tensor | None = None,
                       qwen3_attn_mask: Tensor | None = None) -> Tensor:
        """Qwen3 hidden states + T5 ids -> the cross-attention context (see LLMAdapter.forward)."""
        if not self.has_llm_adapter:
            raise RuntimeError("this DiT has no LLM adapter; load one with --llm_adapter_path")
        return self.llm_adapter(qwen3_hidden, t5_input_ids, t5_attn_mask, qwen3_attn_mask)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, *, t5_input_ids: Tensor | None = None,
                t5_attn_mask: Tensor | None = None, qwen3_attn_mask: Tensor | None = None,
                padding_mask: Tensor | None = None) -> Tensor:
        """x (B, C, T, H, W) or (B, C, H, W); timesteps (B,) sigma; context: the cross-attention
        context, or the Qwen3 hidden states when `t5_input_ids` is given (the adapter then runs
        here, inside the module DDP wraps, so its LoRA gets gradients synchronised).
        padding_mask (B, 1, H, W): 1 = padded pixel; None = no padding (always so for images)."""
        image = x.ndim == 4
        if image:
            x = x.unsqueeze(2)
        if x.ndim != 5:
            raise ValueError(f"latents must be (B, C, T, H, W) or (B, C, H, W); got {tuple(x.shape)}")
        if t5_input_ids is not None:
            context = self.encode_context(context, t5_input_ids, t5_attn_mask, qwen3_attn_mask)
        p = self.params
        b, _, t, h, w = x.shape
        if p.concat_padding_mask:
            if padding_mask is None:
                mask = x.new_zeros(b, 1, t, h, w)
            else:
                mask = F.interpolate(padding_mask.to(x.dtype), size=(h, w), mode="nearest")
                mask = mask.unsqueeze(2).expand(b, 1, t, h, w)
            x = torch.cat((x, mask), dim=1)
        tokens = self.x_embedder(x)  # (B, T', H', W', D)
        grid = tokens.shape[1:4]
        tokens = tokens.flatten(1, 3)

        angles = rope3d_angles(p.head_dim, *grid, p.rope_extrapolation, device=x.device)
        rope = (torch.cos(angles), torch.sin(angles))
        features = self.t_embedder[0](timesteps).to(tokens.dtype)
        adaln_lora = self.t_embedder[1](features)
        emb = self.t_embedding_norm(features)
        context = context.to(tokens.dtype)
        if tokens.dtype == torch.float16 and torch.is_autocast_enabled(tokens.device.type):
            # As the original: under fp16 autocast the residual stream stays float32 (fp16 overflows
            # there); the matmuls still run in fp16.
            tokens = tokens.float()

        for block in self.blocks:
            tokens = self.run_block(block, tokens, emb, context, rope, adaln_lora)
        out = self.final_layer(tokens, emb, adaln_lora)
        out = rearrange(out, "b (t h w) (p1 p2 r c) -> b c (t r) (h p1) (w p2)", t=grid[0], h=grid[1], w=grid[2],
                        p1=p.patch_spatial, p2=p.patch_spatial, r=p.patch_temporal)
        return out.squeeze(2) if image else out
