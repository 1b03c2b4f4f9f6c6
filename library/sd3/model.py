"""The SD3 / SD3.5 MMDiT in Stability AI's module names, and the variant table.

Attribute names ARE the checkpoint keys under `model.diffusion_model.` (`joint_blocks.N.
x_block.attn.qkv.weight`, `x_embedder.proj.weight`, `pos_embed`...) and the LoRA names
(`lora_unet_joint_blocks_0_context_block_attn_qkv`), so do not rename anything. The LoRA
module finds its block targets by the class name `SingleDiTBlock` (sd-scripts' name).

Variants (detected from a file by library.sd3.loading):
- SD3 Medium: 24 blocks, no q/k norm.
- SD3.5 Medium: 24 blocks, RMS q/k norm, and a second self-attention over the image tokens
  only (`x_block.attn2`) in blocks 0-12, whose modulation has 9 chunks instead of 6.
- SD3.5 Large: 38 blocks, RMS q/k norm.
In every variant the hidden width is 64 x depth with 64-wide heads, and the last block's
context stream is "pre-only": it only feeds the joint attention (qkv + a 2-chunk modulation).

`joint_blocks` is a plain nn.ModuleList (block swap and LoRA work on it from outside); each
block can run under activation checkpointing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from einops import rearrange
from torch import Tensor, nn

from library.attention import attention
from library.block_checkpointing import BlockCheckpointing
from library.block_ops import gated_residual, modulated_layer_norm, rms_norm
from library.sd3.pos_embed import ScaledPosEmbeds, center_offsets, check_fits, crop_table, random_offsets

HEAD_DIM = 64
TIMESTEP_EMBED_DIM = 256


@dataclass(frozen=True)
class SD3Params:
    in_channels: int = 16
    patch_size: int = 2
    depth: int = 24
    hidden_size: int = 1536
    num_heads: int = 24
    mlp_ratio: float = 4.0
    adm_in_channels: int = 2048          # pooled text: CLIP-L 768 + CLIP-G 1280
    context_in_features: int = 4096      # T5-XXL width (CLIP states are zero-padded to it)
    pos_embed_max_size: int = 192        # the positional table is G x G patches
    qk_norm: bool = False                # RMS norm on q and k per head (SD3.5)
    x_block_self_attn_layers: tuple[int, ...] = ()   # blocks with x_block.attn2 (SD3.5 M: 0-12)
    qkv_bias: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def check(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        bad = [i for i in self.x_block_self_attn_layers if not 0 <= i < self.depth - 1]
        if bad:
            raise ValueError(f"x_block self-attention layers {bad} must be blocks 0..{self.depth - 2}")


@dataclass(frozen=True)
class SD3Variant:
    """What differs between SD3 Medium, SD3.5 Medium and SD3.5 Large, as data."""

    name: str                       # sd-scripts' model_type, also ss_base_model_version
    label: str
    params: SD3Params
    modelspec_architecture: str


SD3_MEDIUM_PARAMS = SD3Params()

VARIANTS: dict[str, SD3Variant] = {
    "medium": SD3Variant("medium", "SD3 Medium", SD3_MEDIUM_PARAMS, "stable-diffusion-3-medium/lora"),
    "5-medium": SD3Variant(
        "5-medium", "SD3.5 Medium",
        replace(SD3_MEDIUM_PARAMS, pos_embed_max_size=384, qk_norm=True, x_block_self_attn_layers=tuple(range(13))),
        "stable-diffusion-3-5-medium/lora",
    ),
    "5-large": SD3Variant(
        "5-large", "SD3.5 Large",
        replace(SD3_MEDIUM_PARAMS, depth=38, hidden_size=2432, num_heads=38, qk_norm=True),
        "stable-diffusion-3-5-large/lora",
    ),
}


def variant_name(qk_norm: bool, has_x_self_attn: bool) -> str:
    """sd-scripts' rule: no q/k norm -> "medium"; q/k norm with attn2 -> "5-medium"; else "5-large"."""
    if not qk_norm:
        return "medium"
    return "5-medium" if has_x_self_attn else "5-large"


# ---------------------------------------------------------------------------------------------
# Small layers.

def timestep_embedding(t: Tensor, dim: int = TIMESTEP_EMBED_DIM, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t (B,) as given (SD3 passes 0..1000), cos half first, float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)


def norm_modulate(x: Tensor, norm: nn.LayerNorm, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: norm(x) * (1 + scale) + shift for x (B, L, D) with per-sample shift and scale
    (B, D), norm a LayerNorm without affine; fused where it can (library/block_ops.py)."""
    return modulated_layer_norm(x, shift[:, None], scale[:, None], norm.eps)


def gated(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """The gated residual x + gate * y for x, y (B, L, D) and a per-sample gate (B, D)."""
    return gated_residual(x, gate[:, None], y)


def _layer_norm(hidden_size: int) -> nn.LayerNorm:
    return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, (H/p)(W/p), hidden) with one strided convolution (`x_embedder.proj`)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class MLPEmbedder(nn.Module):
    """`mlp.0` -> SiLU -> `mlp.2` (t_embedder on the timestep features, y_embedder on pooled text)."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class RMSNorm(nn.Module):
    """Per-head RMS norm of q or k with a learned `weight` (SD3.5 `ln_q` / `ln_k`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class AttentionLinears(nn.Module):
    """The weights of one attention stream: `qkv`, `proj` (absent when pre-only), and `ln_q` /
    `ln_k` with q/k norm. The joint attention itself runs in JointBlock."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, pre_only: bool, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
        self.qk_norm = qk_norm
        if qk_norm:
            self.ln_q = RMSNorm(dim // num_heads)
            self.ln_k = RMSNorm(dim // num_heads)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, dim) -> q, k, v each (B, H, L, D); the qkv output is laid out (3, H, D)."""
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        if self.qk_norm:
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v


class MLP(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden_dim, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


@dataclass
class StreamModulation:
    """The adaLN chunks of one stream for one block; each tensor is (B, D). Pre-only context
    streams have only the attention shift/scale; x streams with attn2 have a second set."""

    shift_msa: Tensor
    scale_msa: Tensor
    gate_msa: Tensor | None = None
    shift_mlp: Tensor | None = None
    scale_mlp: Tensor | None = None
    gate_mlp: Tensor | None = None
    shift_msa2: Tensor | None = None
    scale_msa2: Tensor | None = None
    gate_msa2: Tensor | None = None


class SingleDiTBlock(nn.Module):
    """One stream of a joint block (sd-scripts' name; SAI's DismantledBlock)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, pre_only: bool,
                 qk_norm: bool, x_block_self_attn: bool = False):
        super().__init__()
        if x_block_self_attn and pre_only:
            raise ValueError("a pre-only stream cannot have a second self-attention")
        self.pre_only = pre_only
        self.x_block_self_attn = x_block_self_attn
        self.norm1 = _layer_norm(hidden_size)
        self.attn = AttentionLinears(hidden_size, num_heads, qkv_bias, pre_only, qk_norm)
        if x_block_self_attn:
            self.attn2 = AttentionLinears(hidden_size, num_heads, qkv_bias, False, qk_norm)
        if not pre_only:
            self.norm2 = _layer_norm(hidden_size)
            self.mlp = MLP(hidden_size, int(hidden_size * mlp_ratio))
        self.n_mods = 2 if pre_only else (9 if x_block_self_attn else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, self.n_mods * hidden_size))

    def modulation(self, c: Tensor) -> StreamModulation:
        return StreamModulation(*self.adaLN_modulation(c).chunk(self.n_mods, dim=-1))

    def pre_attention(self, x: Tensor, mod: StreamModulation):
        """q, k, v (B, H, L, D) for the joint attention, and for attn2 when present (else None)."""
        qkv = self.attn.project_qkv(norm_modulate(x, self.norm1, mod.shift_msa, mod.scale_msa))
        qkv2 = None
        if self.x_block_self_attn:
            qkv2 = self.attn2.project_qkv(norm_modulate(x, self.norm1, mod.shift_msa2, mod.scale_msa2))
        return qkv, qkv2

    def post_attention(self, x: Tensor, attn_out: Tensor, mod: StreamModulation,
                       attn2_out: Tensor | None = None) -> Tensor:
        """Residual updates after attention; attn outputs are (B, L, dim)."""
        x = gated(x, mod.gate_msa, self.attn.proj(attn_out))
        if attn2_out is not None:
            x = gated(x, mod.gate_msa2, self.attn2.proj(attn2_out))
        return gated(x, mod.gate_mlp, self.mlp(norm_modulate(x, self.norm2, mod.shift_mlp, mod.scale_mlp)))


def _merge_heads(x: Tensor) -> Tensor:
    return rearrange(x, "B H L D -> B L (H D)")


class JointBlock(nn.Module):
    """Context and image streams with separate weights and one joint attention over both
    (context tokens first). Returns the new context (None after a pre-only block) and x."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, pre_only: bool,
                 qk_norm: bool, x_block_self_attn: bool):
        super().__init__()
        self.context_block = SingleDiTBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, pre_only, qk_norm)
        self.x_block = SingleDiTBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, False, qk_norm,
                                      x_block_self_attn=x_block_self_attn)

    def forward(self, context: Tensor, x: Tensor, c: Tensor) -> tuple[Tensor | None, Tensor]:
        ctx_mod = self.context_block.modulation(c)
        x_mod = self.x_block.modulation(c)
        (ctx_q, ctx_k, ctx_v), _ = self.context_block.pre_attention(context, ctx_mod)
        (x_q, x_k, x_v), x_qkv2 = self.x_block.pre_attention(x, x_mod)

        joint = attention(torch.cat((ctx_q, x_q), dim=2), torch.cat((ctx_k, x_k), dim=2),
                          torch.cat((ctx_v, x_v), dim=2))
        joint = _merge_heads(joint)
        n_ctx = context.shape[1]
        ctx_out, x_out = joint[:, :n_ctx], joint[:, n_ctx:]

        x_attn2 = _merge_heads(attention(*x_qkv2)) if x_qkv2 is not None else None
        x = self.x_block.post_attention(x, x_out, x_mod, x_attn2)
        context = None if self.context_block.pre_only else self.context_block.post_attention(context, ctx_out, ctx_mod)
        return context, x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = _layer_norm(hidden_size)
        # Output channels are laid out (ph, pw, c); see MMDiT.unpatchify.
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        # Chunks are (shift, scale) in that order (diffusers stores them swapped).
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(norm_modulate(x, self.norm_final, shift, scale))


# ---------------------------------------------------------------------------------------------
# The model.

class MMDiT(BlockCheckpointing, nn.Module):
    """SD3 / SD3.5 MMDiT: latents (B, C, H, W), timesteps (B,) in [0, 1000], pooled text y
    (B, adm_in) and context (B, L, context_in) -> velocity (B, C, H, W)."""

    def __init__(self, params: SD3Params):
        super().__init__()
        params.check()
        self.params = params
        hidden = params.hidden_size
        self.patch_size = params.patch_size
        self.in_channels = self.out_channels = params.in_channels
        self.x_embedder = PatchEmbed(params.patch_size, params.in_channels, hidden)
        self.t_embedder = MLPEmbedder(TIMESTEP_EMBED_DIM, hidden)
        self.y_embedder = MLPEmbedder(params.adm_in_channels, hidden)
        self.context_embedder = nn.Linear(params.context_in_features, hidden)
        # The fixed sin-cos table from the checkpoint (not trained).
        self.register_buffer("pos_embed", torch.zeros(1, params.pos_embed_max_size ** 2, hidden))
        self.joint_blocks = nn.ModuleList(
            JointBlock(hidden, params.num_heads, params.mlp_ratio, params.qkv_bias, pre_only=i == params.depth - 1,
                       qk_norm=params.qk_norm, x_block_self_attn=i in params.x_block_self_attn_layers)
            for i in range(params.depth)
        )
        self.final_layer = FinalLayer(hidden, params.patch_size, self.out_channels)
        self.pos_emb_random_crop_rate = 0.0
        self.scaled_pos_embeds: ScaledPosEmbeds | None = None

    # -- positional embedding options ------------------------------------------------------------

    def set_pos_emb_random_crop_rate(self, rate: float) -> None:
        """--pos_emb_random_crop_rate: the probability that a training forward pass uses a random
        window of the positional table instead of the centre one (never in eval mode)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"pos_emb_random_crop_rate must be in [0, 1], got {rate}")
        self.pos_emb_random_crop_rate = float(rate)

    def enable_scaled_pos_embed(self, latent_sizes: list[int] | None) -> None:
        """--enable_scaled_pos_embed: per-resolution tables for these latent sizes (see
        pos_embed.latent_sizes_for_resolutions); None turns it off. The checkpoint's table stays
        loaded so that the state dict is unchanged."""
        self.scaled_pos_embeds = (None if latent_sizes is None else
                                  ScaledPosEmbeds.for_latent_sizes(self.params.hidden_size, latent_sizes,
                                                                   self.patch_size))

    def positional_embedding(self, h: int, w: int, random_crop: bool = False) -> Tensor:
        """(1, h*w, hidden) for an image of h x w patches, centre window unless random_crop."""
        if self.scaled_pos_embeds is not None:
            table, size = self.scaled_pos_embeds.table_for(h, w, device=self.pos_embed.device)
        else:
            table, size = self.pos_embed, self.params.pos_embed_max_size
        check_fits(size, h, w)
        top, left = random_offsets(size, h, w) if random_crop else center_offsets(size, h, w)
        return crop_table(table, size, h, w, top, left)

    def _draw_random_crop(self) -> bool:
        rate = self.pos_emb_random_crop_rate
        return self.training and rate > 0.0 and float(torch.rand(())) < rate

    # -- forward -------------------------------------------------------------------------------

    def unpatchify(self, x: Tensor, h: int, w: int) -> Tensor:
        p = self.patch_size
        return rearrange(x, "B (h w) (p q C) -> B C (h p) (w q)", h=h, w=w, p=p, q=p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, context: Tensor) -> Tensor:
        """x (B, C, H, W) latents (H, W multiples of the patch size); t (B,) timesteps in [0, 1000]
        (sigma * 1000); y (B, adm_in) pooled text; context (B, L, context_in) text states."""
        if x.ndim != 4 or context.ndim != 3:
            raise ValueError(f"x must be (B, C, H, W) and context (B, L, C); got {tuple(x.shape)} and "
                             f"{tuple(context.shape)}")
        _, _, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"the latent size {height}x{width} must be a multiple of the patch size {p} "
                             f"(images a multiple of {8 * p} pixels)")
        h, w = height // p, width // p
        pos = self.positional_embedding(h, w, random_crop=self._draw_random_crop())
        x = self.x_embedder(x) + pos.to(device=x.device, dtype=x.dtype)
        c = self.t_embedder(timestep_embedding(t).to(x.dtype)) + self.y_embedder(y.to(x.dtype))
        context = self.context_embedder(context.to(x.dtype))
        for block in self.joint_blocks:
            context, x = self.run_block(block, context, x, c)
        return self.unpatchify(self.final_layer(x, c), h, w)
