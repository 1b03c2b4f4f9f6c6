"""Lumina Image 2.0's Next-DiT and its variant table.

Module names follow Alpha-VLLM's reference so `lumina-image-2.safetensors` and Comfy-Org's
`lumina_2_model_bf16.safetensors` load with no key conversion. `layers` (and the two refiner
lists) are plain nn.ModuleLists: a block-swap offloader or the LoRA injector can wrap them
from outside.

Data flow of one forward (shapes for batch B, caption length Lc, n = (H/2)(W/2) patches):

    caption (B, Lc, 2304) -> cap_embedder -> context_refiner (caption only, masked)
    latents (B, 16, H, W) -> patches (B, n, 64) -> x_embedder -> noise_refiner (image only)
    joint[b] = [caption[b, :len_b], image[b], padding]   (each sample's real caption, then its image)
            -> layers (masked when the caption lengths differ) -> final_layer -> image tokens
            -> (B, 16, H, W)

RoPE ids: caption token i sits at (i, 0, 0); image token (row, col) at (len_b, row, col).
Patches are flattened in (ph, pw, c) order, unlike FLUX's (c, ph, pw). The timestep runs the
opposite way to FLUX's sigma: t = 1 - sigma, 1 = clean image (FORMATS 3.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from library.attention import right_padding, right_padding_on_device
from library.flux.layers import EmbedND
from library.block_checkpointing import BlockCheckpointing
from library.lumina.layers import FinalLayer, JointTransformerBlock, RMSNorm, TimestepEmbedder


def ffn_hidden_dim(dim: int, multiple_of: int = 256) -> int:
    """The reference's FFN width: 4 * dim rounded up to a multiple of `multiple_of` (9216 for 2304)."""
    return multiple_of * math.ceil(4 * dim / multiple_of)


@dataclass(frozen=True)
class LuminaParams:
    patch_size: int = 2
    in_channels: int = 16               # FLUX AE latent channels
    dim: int = 2304
    n_layers: int = 26
    n_refiner_layers: int = 2           # each of noise_refiner and context_refiner
    n_heads: int = 24
    n_kv_heads: int = 8                 # grouped-query attention
    ffn_hidden_dim: int = 9216
    norm_eps: float = 1e-5
    cap_feat_dim: int = 2304            # Gemma2-2B hidden size
    axes_dims: tuple[int, int, int] = (32, 32, 32)
    axes_lens: tuple[int, int, int] = (300, 512, 512)  # largest caption length / patch rows / patch cols
    theta: int = 10_000

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def adaln_dim(self) -> int:
        """Width of the timestep embedding that drives every modulation."""
        return min(self.dim, 1024)

    @property
    def patch_features(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    def check(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if sum(self.axes_dims) != self.head_dim:
            raise ValueError(f"axes_dims {self.axes_dims} must sum to the head dim {self.head_dim}")


@dataclass(frozen=True)
class LuminaVariant:
    name: str
    params: LuminaParams
    base_model_version: str             # ss_base_model_version
    modelspec_architecture: str         # modelspec.architecture of a LoRA
    modelspec_implementation: str = "https://github.com/Alpha-VLLM/Lumina-Image-2.0"


VARIANTS: dict[str, LuminaVariant] = {
    "lumina2": LuminaVariant(name="lumina2", params=LuminaParams(), base_model_version="lumina2",
                             modelspec_architecture="lumina-2/lora"),
}


class NextDiT(BlockCheckpointing, nn.Module):
    """Lumina Image 2.0 transformer: latents (B, C, H, W), t (B,) with 1 = clean, caption states
    (B, L, cap_feat_dim) and their mask (B, L) -> velocity towards the image (B, C, H, W)."""

    def __init__(self, params: LuminaParams):
        super().__init__()
        params.check()
        self.params = params
        self.in_channels = self.out_channels = params.in_channels
        self.patch_size = params.patch_size

        def block(modulation: bool) -> JointTransformerBlock:
            return JointTransformerBlock(params.dim, params.n_heads, params.n_kv_heads, params.ffn_hidden_dim,
                                         params.norm_eps, modulation, params.adaln_dim)

        self.t_embedder = TimestepEmbedder(params.adaln_dim)
        self.cap_embedder = nn.Sequential(RMSNorm(params.cap_feat_dim, params.norm_eps),
                                          nn.Linear(params.cap_feat_dim, params.dim, bias=True))
        self.context_refiner = nn.ModuleList(block(False) for _ in range(params.n_refiner_layers))
        self.x_embedder = nn.Linear(params.patch_features, params.dim, bias=True)
        self.noise_refiner = nn.ModuleList(block(True) for _ in range(params.n_refiner_layers))
        self.layers = nn.ModuleList(block(True) for _ in range(params.n_layers))
        # In the checkpoints but never used by the reference forward; kept so files load strictly.
        self.norm_final = RMSNorm(params.dim, params.norm_eps)
        self.final_layer = FinalLayer(params.dim, params.patch_features, params.adaln_dim)
        self.rope_embedder = EmbedND(dim=params.head_dim, theta=params.theta, axes_dim=list(params.axes_dims))

    def forward(self, x: Tensor, t: Tensor, cap_feats: Tensor, cap_mask: Tensor | None = None,
                fixed_length: bool = False) -> Tensor:
        """x (B, C, H, W) latents (H, W multiples of the patch size); t (B,) model time, 1 = clean;
        cap_feats (B, L, cap_feat_dim) Gemma2 states; cap_mask (B, L), 1 = real token,
        right-padded (None = all real). Caption padding never affects the output.

        fixed_length: keep the caption's padded length L and read the caption lengths nowhere on
        the host (--cuda_graph: shapes then depend on the batch's shapes alone, and the step
        never waits on the GPU). Same outputs; the padding after the longest caption is computed
        and masked instead of cut."""
        batch, _, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not a multiple of the patch size {p}")
        rows, cols = height // p, width // p
        n_img = rows * cols
        device = x.device
        if fixed_length:
            n_cap = cap_feats.shape[1]
            self._check_positions(n_cap, rows, cols)
            cap_lens_t = (torch.full((batch,), n_cap, device=device) if cap_mask is None
                          else cap_mask.bool().sum(dim=1))
            cap_padding = right_padding_on_device(cap_lens_t, n_cap)
            joint_len = n_cap + n_img
            joint_padding = right_padding_on_device(cap_lens_t + n_img, joint_len)
        else:
            cap_lens = caption_lengths(cap_mask, batch, cap_feats.shape[1])
            self._check_positions(max(cap_lens), rows, cols)
            # Padding after the longest caption changes nothing (padded keys are masked, padded
            # queries are dropped): cut it before any compute is spent on it.
            n_cap = max(cap_lens)
            cap_lens_t = torch.tensor(cap_lens, device=device)
            cap_padding = right_padding(cap_lens, n_cap, device)
            joint_len = n_cap + n_img
            joint_padding = right_padding([n + n_img for n in cap_lens], joint_len, device)

        cap = self.cap_embedder(cap_feats[:, :n_cap])
        adaln_input = self.t_embedder(t)

        cap_ids = torch.zeros(batch, n_cap, 3, device=device)
        cap_ids[..., 0] = torch.arange(n_cap, device=device)
        img_ids = torch.zeros(batch, n_img, 3, device=device)
        img_ids[..., 0] = cap_lens_t[:, None]
        img_ids[..., 1] = torch.arange(rows, device=device).repeat_interleave(cols)
        img_ids[..., 2] = torch.arange(cols, device=device).repeat(rows)

        cap_freqs = self.rope_embedder(cap_ids)
        for block in self.context_refiner:
            cap = self.run_block(block, cap, cap_freqs, cap_padding)

        img = self.x_embedder(rearrange(x, "b c (h ph) (w pw) -> b (h w) (ph pw c)", ph=p, pw=p))
        img_freqs = self.rope_embedder(img_ids)
        for block in self.noise_refiner:
            img = self.run_block(block, img, img_freqs, None, adaln_input)

        joint = join_caption_and_image(cap, img, cap_lens_t, joint_len)
        joint_freqs = self.rope_embedder(join_caption_and_image(cap_ids, img_ids, cap_lens_t, joint_len))
        for block in self.layers:
            joint = self.run_block(block, joint, joint_freqs, joint_padding, adaln_input)

        out = self.final_layer(joint, adaln_input)
        img_positions = cap_lens_t[:, None] + torch.arange(n_img, device=device)
        out = out.gather(1, img_positions[..., None].expand(-1, -1, out.shape[-1]))
        return rearrange(out, "b (h w) (ph pw c) -> b c (h ph) (w pw)", h=rows, w=cols, ph=p, pw=p)

    def _check_positions(self, longest_caption: int, rows: int, cols: int) -> None:
        # The reference looks RoPE angles up in tables of these lengths; beyond them the model
        # was never trained (and the reference fails), so refuse rather than extrapolate.
        cap_max, rows_max, cols_max = self.params.axes_lens
        if longest_caption >= cap_max:
            raise ValueError(f"caption of {longest_caption} tokens; Lumina 2 supports at most {cap_max - 1}. "
                             "Lower --gemma2_max_token_length.")
        if rows > rows_max or cols > cols_max:
            raise ValueError(f"latent of {rows}x{cols} patches; Lumina 2 supports at most {rows_max}x{cols_max} "
                             f"({rows_max * 16}x{cols_max * 16} pixels).")


def caption_lengths(cap_mask: Tensor | None, batch: int, length: int) -> list[int]:
    """Real tokens per caption from a right-padded mask (one host sync), checking its form."""
    if cap_mask is None:
        return [length] * batch
    if tuple(cap_mask.shape) != (batch, length):
        raise ValueError(f"caption mask of shape {tuple(cap_mask.shape)}; expected {(batch, length)}")
    mask = cap_mask.bool()
    lengths = mask.sum(dim=1)
    is_prefix = (torch.arange(length, device=mask.device)[None, :] < lengths[:, None]) == mask
    *values, right_padded = torch.cat((lengths, is_prefix.all()[None].long())).tolist()
    if not right_padded:
        raise ValueError("the caption mask must be right-padded (real tokens first, then padding)")
    if min(values) < 1:
        raise ValueError("every caption needs at least one real token (Gemma2 always emits <bos>)")
    return values


def join_caption_and_image(cap: Tensor, img: Tensor, cap_lens: Tensor, joint_len: int) -> Tensor:
    """(B, Lc, D) and (B, n, D) -> (B, joint_len, D): sample b holds its first cap_lens[b] caption
    tokens, then its n image tokens, then zeros."""
    batch, n_cap, dim = cap.shape
    n_img = img.shape[1]
    j = torch.arange(joint_len, device=cap.device)[None, :]
    starts = cap_lens[:, None]
    cap_part = cap.gather(1, j.clamp(max=n_cap - 1).expand(batch, -1)[..., None].expand(-1, -1, dim))
    img_part = img.gather(1, (j - starts).clamp(0, n_img - 1)[..., None].expand(-1, -1, dim))
    is_img = (j >= starts) & (j < starts + n_img)
    return torch.where((j < starts)[..., None], cap_part, torch.where(is_img[..., None], img_part, 0.0))
