"""The FLUX.1 DiT (dev, schnell) and the variant table shared with Chroma.

Module names follow Black Forest Labs' reference so `flux1-dev.safetensors` loads with no key
conversion. `double_blocks` and `single_blocks` are plain nn.ModuleLists: a block-swap
offloader or the LoRA injector can wrap them from outside.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from library.block_checkpointing import BlockCheckpointing  # noqa: F401  (re-exported)
from library.flux.layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
    timestep_embedding,
)


@dataclass(frozen=True)
class FluxParams:
    in_channels: int = 64           # 16 latent channels x 2x2 patch
    vec_in_dim: int = 768           # CLIP-L pooled width (unused by Chroma)
    context_in_dim: int = 4096      # T5-XXL width
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19                 # double blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True
    # Chroma's modulation approximator (ignored by FLUX).
    approximator_in_dim: int = 64
    approximator_hidden_dim: int = 5120
    approximator_depth: int = 5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def check(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {self.head_dim}")


@dataclass(frozen=True)
class FluxVariant:
    """Everything that differs between dev, schnell and Chroma, as data."""

    name: str
    params: FluxParams
    is_chroma: bool
    uses_clip: bool
    default_t5_max_length: int      # sd-scripts: 512 dev, 256 schnell, 512 Chroma
    shift_schedule: bool            # sampling schedule shifted by resolution (not for schnell)
    base_model_version: str         # ss_base_model_version
    modelspec_architecture: str     # modelspec.architecture of a LoRA
    modelspec_implementation: str = "https://github.com/black-forest-labs/flux"


FLUX_DEV_PARAMS = FluxParams()

VARIANTS: dict[str, FluxVariant] = {
    "dev": FluxVariant(
        name="dev", params=FLUX_DEV_PARAMS, is_chroma=False, uses_clip=True, default_t5_max_length=512,
        shift_schedule=True, base_model_version="flux1", modelspec_architecture="flux-1-dev/lora",
    ),
    "schnell": FluxVariant(
        name="schnell", params=replace(FLUX_DEV_PARAMS, guidance_embed=False), is_chroma=False, uses_clip=True,
        default_t5_max_length=256, shift_schedule=False, base_model_version="flux1",
        modelspec_architecture="flux-1-schnell/lora",
    ),
    "chroma": FluxVariant(
        name="chroma", params=replace(FLUX_DEV_PARAMS, guidance_embed=False), is_chroma=True, uses_clip=False,
        default_t5_max_length=512, shift_schedule=True, base_model_version="chroma",
        modelspec_architecture="chroma/lora", modelspec_implementation="https://huggingface.co/lodestones/Chroma",
    ),
}


class Flux(BlockCheckpointing, nn.Module):
    """FLUX.1 transformer on packed latents: (B, L_img, 64) in, velocity (B, L_img, 64) out."""

    def __init__(self, params: FluxParams):
        super().__init__()
        params.check()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.in_channels
        self.num_heads = params.num_heads
        self.hidden_size = params.hidden_size
        self.pe_embedder = EmbedND(dim=params.head_dim, theta=params.theta, axes_dim=list(params.axes_dim))
        self.img_in = nn.Linear(params.in_channels, params.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=params.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, params.hidden_size)
        if params.guidance_embed:
            self.guidance_in = MLPEmbedder(in_dim=256, hidden_dim=params.hidden_size)
        self.txt_in = nn.Linear(params.context_in_dim, params.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio, qkv_bias=params.qkv_bias)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(params.hidden_size, self.out_channels)
        # With a T5 mask, drop text positions no sample attends to (exact; see drop_unattended_text).
        self.trim_padded_text = True

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                y: Tensor, guidance: Tensor | None = None, txt_attention_mask: Tensor | None = None) -> Tensor:
        """img (B, Li, 64) packed latents; img_ids (B, Li, 3); txt (B, Lt, 4096) T5 states; txt_ids
        (B, Lt, 3); timesteps (B,) sigma in [0, 1]; y (B, 768) CLIP pooled; guidance (B,) for dev;
        txt_attention_mask (B, Lt), 1 = real token, only with --apply_t5_attn_mask."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be (B, L, C); got {tuple(img.shape)} and {tuple(txt.shape)}")
        if txt_attention_mask is not None and self.trim_padded_text:
            txt, txt_ids, txt_attention_mask = drop_unattended_text(txt, txt_ids, txt_attention_mask)
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("FLUX.1-dev needs a guidance value (the embedded guidance scale)")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        vec = vec + self.vector_in(y.to(img.dtype))
        txt = self.txt_in(txt)

        # FLUX joins the streams text first, then image.
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        attn_mask = None
        if txt_attention_mask is not None:
            attn_mask = joint_key_mask(txt_attention_mask, img.shape[1], txt_first=True)

        for block in self.double_blocks:
            img, txt = self.run_block(block, img, txt, vec, pe, attn_mask)
        n_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = self.run_block(block, x, vec, pe, attn_mask)
        return self.final_layer(x[:, n_txt:], vec)


def drop_unattended_text(txt: Tensor, txt_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Cut the text after the last position any sample attends to, and return mask None when
    every remaining position is attended (the common batch-of-one case).

    Exact for the image output: a masked key contributes nothing to any query, and a padded
    text position's own output never reaches an image token. It saves the padded tokens'
    compute and lets attention run unmasked on the fastest kernels (with a mask, SDPA falls back
    to slower ones). Costs one host sync to learn the new length.
    """
    mask = mask.bool()
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    keep = max(int((mask * positions).amax()), 1)
    txt, txt_ids, mask = txt[:, :keep], txt_ids[:, :keep], mask[:, :keep]
    return txt, txt_ids, (None if bool(mask.all()) else mask)


def joint_key_mask(txt_mask: Tensor, n_img: int, txt_first: bool) -> Tensor:
    """Bool key mask (B, 1, 1, Lt + Li) over the joint sequence: text as given, image all True.

    Only keys are masked: a query at a padded text position still gets a (meaningless, finite)
    output, which never reaches an image token because every query ignores padded keys. This
    gives the same image output as the square (query x key) mask of the references without
    fully-masked rows, which some kernels turn into NaN.
    """
    txt_mask = txt_mask.bool()
    img_mask = torch.ones(txt_mask.shape[0], n_img, dtype=torch.bool, device=txt_mask.device)
    joint = torch.cat((txt_mask, img_mask) if txt_first else (img_mask, txt_mask), dim=1)
    return joint[:, None, None, :]
