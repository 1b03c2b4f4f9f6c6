"""Chroma: FLUX.1-schnell pruned of its per-block modulation layers and of CLIP.

A small MLP (`distilled_guidance_layer`, the "approximator") produces every modulation vector
of the network at once from (sigma, guidance, row index). Rows are handed out in this order:
single blocks x 3 (shift, scale, gate), double-block image x 6, double-block text x 6, final
layer x 2 (shift, scale). Chroma joins the streams image first, then text, and attends to
exactly one padding token after each caption (the pretrained weights depend on that).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from library.flux.layers import (
    DoubleBlockModulation,
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    ModulationOut,
    RMSNorm,
    SingleStreamBlock,
    timestep_embedding,
)
from library.flux.model import BlockCheckpointing, FluxParams, drop_unattended_text, joint_key_mask

ATTENDED_PADDING_TOKENS = 1


class Approximator(nn.Module):
    """in_proj -> N x (x + MLP(RMSNorm(x))) -> out_proj; one output row per modulation vector."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, n_layers: int):
        super().__init__()
        self.in_proj = nn.Linear(in_dim, hidden_dim, bias=True)
        self.layers = nn.ModuleList(MLPEmbedder(hidden_dim, hidden_dim) for _ in range(n_layers))
        self.norms = nn.ModuleList(RMSNorm(hidden_dim) for _ in range(n_layers))
        self.out_proj = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.in_proj(x)
        for layer, norm in zip(self.layers, self.norms):
            x = x + layer(norm(x))
        return self.out_proj(x)


class Chroma(BlockCheckpointing, nn.Module):
    def __init__(self, params: FluxParams):
        super().__init__()
        params.check()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.in_channels
        self.num_heads = params.num_heads
        self.hidden_size = params.hidden_size
        self.trim_padded_text = True
        self.pe_embedder = EmbedND(dim=params.head_dim, theta=params.theta, axes_dim=list(params.axes_dim))
        self.img_in = nn.Linear(params.in_channels, params.hidden_size, bias=True)
        self.txt_in = nn.Linear(params.context_in_dim, params.hidden_size)
        self.distilled_guidance_layer = Approximator(
            params.approximator_in_dim, params.hidden_size, params.approximator_hidden_dim, params.approximator_depth
        )
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio, qkv_bias=params.qkv_bias,
                              own_modulation=False)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio, own_modulation=False)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(params.hidden_size, self.out_channels, own_modulation=False)

    @property
    def mod_index_length(self) -> int:
        return 3 * self.params.depth_single_blocks + 2 * 6 * self.params.depth + 2

    def approximator_input(self, timesteps: Tensor, guidance: Tensor) -> Tensor:
        """(B, mod_index_length, approximator_in_dim): [temb(sigma), temb(guidance), temb(row index)]."""
        quarter = self.params.approximator_in_dim // 4
        n = self.mod_index_length
        per_sample = torch.cat(
            (timestep_embedding(timesteps, quarter), timestep_embedding(guidance, quarter)), dim=-1
        )
        index = timestep_embedding(torch.arange(n, device=timesteps.device), 2 * quarter)
        batch = timesteps.shape[0]
        return torch.cat((per_sample[:, None, :].expand(-1, n, -1), index[None].expand(batch, -1, -1)), dim=-1)

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                y: Tensor | None = None, guidance: Tensor | None = None,
                txt_attention_mask: Tensor | None = None) -> Tensor:
        """Same call as Flux.forward; `y` is ignored (Chroma has no CLIP) and `guidance`
        defaults to 0, the value Chroma is trained and sampled with."""
        if guidance is None:
            guidance = torch.zeros_like(timesteps)
        if txt_attention_mask is not None:
            txt_attention_mask = attend_one_padding_token(txt_attention_mask)
            if self.trim_padded_text:  # exact, see drop_unattended_text
                txt, txt_ids, txt_attention_mask = drop_unattended_text(txt, txt_ids, txt_attention_mask)

        img = self.img_in(img)
        txt = self.txt_in(txt)
        mods = self.distilled_guidance_layer(self.approximator_input(timesteps, guidance).to(img.dtype))
        single_mods, double_mods, final_mod = split_modulations(
            mods, self.params.depth, self.params.depth_single_blocks
        )

        # Chroma joins the streams image first, then text.
        pe = self.pe_embedder(torch.cat((img_ids, txt_ids), dim=1))
        attn_mask = None
        if txt_attention_mask is not None:
            attn_mask = joint_key_mask(txt_attention_mask, img.shape[1], txt_first=False)

        for block, mod in zip(self.double_blocks, double_mods):
            img, txt = self.run_block(block, img, txt, mod, pe, attn_mask, txt_first=False)
        n_img = img.shape[1]
        x = torch.cat((img, txt), dim=1)
        for block, mod in zip(self.single_blocks, single_mods):
            x = self.run_block(block, x, mod, pe, attn_mask)
        return self.final_layer(x[:, :n_img], final_mod)


def split_modulations(mods: Tensor, depth: int, depth_single: int
                      ) -> tuple[list[ModulationOut], list[DoubleBlockModulation], tuple[Tensor, Tensor]]:
    """Hand out the approximator rows (B, N, dim) in Chroma's order (see the module docstring)."""

    def rows(start: int) -> ModulationOut:
        return ModulationOut(*(mods[:, start + i: start + i + 1] for i in range(3)))

    single = [rows(3 * i) for i in range(depth_single)]
    img_offset = 3 * depth_single
    txt_offset = img_offset + 6 * depth
    double = [
        DoubleBlockModulation(
            img_attn=rows(img_offset + 6 * i), img_mlp=rows(img_offset + 6 * i + 3),
            txt_attn=rows(txt_offset + 6 * i), txt_mlp=rows(txt_offset + 6 * i + 3),
        )
        for i in range(depth)
    ]
    final = (mods[:, -2:-1], mods[:, -1:])
    return single, double, final


def attend_one_padding_token(mask: Tensor) -> Tensor:
    """Open the first padding position after each caption (right-padded masks)."""
    mask = mask.bool()
    lengths = mask.sum(dim=1, keepdim=True)
    positions = torch.arange(mask.shape[1], device=mask.device)[None]
    return mask | ((positions >= lengths) & (positions < lengths + ATTENDED_PADDING_TOKENS))
