"""The LDM KL autoencoder (FLUX `ae.safetensors`, SD3 VAE, SD VAE) in the original key layout.

The architecture is read from the file's tensor shapes (`AutoEncoderConfig.from_shapes`); the
latent scaling is not in the file, so each family passes its own (`FLUX_AE_SCALING`, ...).
`encode` returns scaled and shifted latents and `decode` takes them, so callers never apply
the scaling by hand; `encode_moments` gives the raw posterior for families that cache raw
latents (SD3, SD).

This module also hosts `describe_checkpoint(keys)`, the shared "what kind of file is this?"
guess every loader uses to refuse a wrong file with a useful message.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from library.errors import ModelFileError
from library.safetensors_io import load_file, tensor_shapes


# ---------------------------------------------------------------------------------------------
# Configuration as data.

@dataclass(frozen=True)
class LatentScaling:
    """latent = scale_factor * (z - shift_factor)."""

    scale_factor: float
    shift_factor: float
    z_channels: int  # what the family expects, to refuse a VAE of another family early
    name: str


FLUX_AE_SCALING = LatentScaling(scale_factor=0.3611, shift_factor=0.1159, z_channels=16, name="FLUX AE")
SD3_VAE_SCALING = LatentScaling(scale_factor=1.5305, shift_factor=0.0609, z_channels=16, name="SD3 VAE")
SD_VAE_SCALING = LatentScaling(scale_factor=0.18215, shift_factor=0.0, z_channels=4, name="SD VAE")


@dataclass(frozen=True)
class AutoEncoderConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    use_quant_conv: bool = False   # SD VAEs have 1x1 quant_conv/post_quant_conv; FLUX and SD3 do not
    scale_factor: float = FLUX_AE_SCALING.scale_factor
    shift_factor: float = FLUX_AE_SCALING.shift_factor

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @staticmethod
    def from_shapes(shapes: dict[str, tuple[int, ...]], scaling: LatentScaling) -> "AutoEncoderConfig":
        """Read the architecture from unprefixed LDM key shapes (sizes, depths, channel multipliers)."""
        ch, in_channels = shapes["encoder.conv_in.weight"][:2]
        levels = 1 + _max_index(shapes, r"encoder\.down\.(\d+)\.")
        ch_mult = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels))
        return AutoEncoderConfig(
            in_channels=in_channels,
            out_channels=shapes["decoder.conv_out.weight"][0],
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=1 + _max_index(shapes, r"encoder\.down\.0\.block\.(\d+)\."),
            z_channels=shapes["decoder.conv_in.weight"][1],
            use_quant_conv="quant_conv.weight" in shapes,
            scale_factor=scaling.scale_factor,
            shift_factor=scaling.shift_factor,
        )


def _max_index(keys: Iterable[str], pattern: str) -> int:
    rx = re.compile(pattern)
    found = [int(m.group(1)) for k in keys if (m := rx.match(k))]
    if not found:
        raise KeyError(pattern)
    return max(found)


# ---------------------------------------------------------------------------------------------
# Layers (names are checkpoint keys).

def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels with 1x1 conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        # The 1x1 convolutions run as matrix products on the token layout (same math, and the
        # same kernels as diffusers' implementation, which keeps the parity test tight).
        q, k, v = (F.linear(tokens, conv.weight.flatten(1), conv.bias)[:, None] for conv in (self.q, self.k, self.v))
        # One head of width C. Called directly rather than through library.attention: the
        # head width (512 at full size) is beyond the flash/sage kernels.
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]
        out = F.linear(out, self.proj_out.weight.flatten(1), self.proj_out.bias)
        # Adding in this order keeps the token layout's memory strides for the next convolution,
        # as diffusers does; the parity test then matches to the last bit.
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # The LDM convention: pad right and bottom only, then a stride-2 3x3 convolution.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (res blocks) and an optional `downsample`/`upsample`."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        widths_in = (1,) + tuple(cfg.ch_mult)
        self.down = nn.ModuleList()
        block_out = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            block_in, block_out = cfg.ch * widths_in[i], cfg.ch * mult
            blocks = [ResnetBlock(block_in if j == 0 else block_out, block_out) for j in range(cfg.num_res_blocks)]
            level = _Level(blocks)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_out)
            self.down.append(level)
        self.mid = _Mid(block_out)
        self.norm_out = _group_norm(block_out)
        self.conv_out = nn.Conv2d(block_out, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in)
        levels: list[_Level] = []
        # Built from the deepest level up; `up.N` is indexed like `down.N` (0 = full resolution).
        for i in reversed(range(len(cfg.ch_mult))):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            level = _Level(blocks)
            if i != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class GaussianMoments:
    """The encoder's posterior before scaling: mean and log-variance (clamped to [-30, 20])."""

    mean: Tensor
    logvar: Tensor

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * noise


# ---------------------------------------------------------------------------------------------
# The autoencoder.

# Tile size (latent pixels) for the out-of-memory retry: 512 image pixels a side.
OOM_TILE_SIZE = 64


class AutoEncoder(nn.Module):
    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)
            self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)
        self.slicing = False
        self.tile_size: int | None = None      # latent pixels; None = encode/decode in one piece
        self.tile_overlap: int = 8
        # On CUDA, a one-piece encode/decode that runs out of memory is retried in tiles of this
        # many latent pixels (None: let the error through). Large sample images and caching at
        # high resolution then work on small cards instead of failing.
        self.oom_tile_size: int | None = OOM_TILE_SIZE
        self._told_about_tiles = False

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    # Memory options for large images.
    def enable_slicing(self) -> None:
        """Encode/decode one sample of a batch at a time."""
        self.slicing = True

    def disable_slicing(self) -> None:
        self.slicing = False

    def enable_tiling(self, tile_size: int = 64, tile_overlap: int = 8) -> None:
        """Encode and decode in overlapping tiles (sizes in latent pixels; blended linearly).
        Tiles see only their own neighbourhood, so the result differs slightly from one piece."""
        self.tile_size, self.tile_overlap = tile_size, tile_overlap

    def disable_tiling(self) -> None:
        self.tile_size = None

    # Scaling.
    def scale_latents(self, z: Tensor) -> Tensor:
        return self.config.scale_factor * (z - self.config.shift_factor)

    def unscale_latents(self, latents: Tensor) -> Tensor:
        return latents / self.config.scale_factor + self.config.shift_factor

    # Encoding.
    def encode_moments(self, x: Tensor) -> GaussianMoments:
        """x (B, 3, H, W) in [-1, 1] -> unscaled posterior, (B, z, H/8, W/8) each."""
        if self.slicing and x.shape[0] > 1:
            parts = [self.encode_moments(xi) for xi in x.split(1)]
            return GaussianMoments(torch.cat([p.mean for p in parts]), torch.cat([p.logvar for p in parts]))
        x = x.to(self.dtype)
        scale = self.config.downscale

        def tiled(tile: int, overlap: int) -> Tensor:
            return run_tiled(self._encode_raw, x, tile * scale, overlap * scale, up=1, down=scale)

        if self.tile_size is not None and max(x.shape[-2:]) > self.tile_size * scale:
            h = tiled(self.tile_size, self.tile_overlap)
        else:
            # tiles must cut the image on latent-pixel borders
            can_tile = all(n % scale == 0 for n in x.shape[-2:])
            h = self._tiles_on_oom("encode", x, lambda: self._encode_raw(x), tiled if can_tile else None)
        mean, logvar = h.chunk(2, dim=1)
        return GaussianMoments(mean, logvar.clamp(-30.0, 20.0))

    def _encode_raw(self, x: Tensor) -> Tensor:
        h = self.encoder(x)
        return self.quant_conv(h) if self.config.use_quant_conv else h

    def encode(self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """x (B, 3, H, W) in [-1, 1] -> scaled latents. `sample=True` draws from the posterior
        (what FLUX training caches); False returns the scaled mean."""
        moments = self.encode_moments(x)
        z = moments.sample(generator) if sample else moments.mean
        return self.scale_latents(z)

    # Decoding.
    def decode(self, latents: Tensor, tile_size: int | None = None, tile_overlap: int | None = None) -> Tensor:
        """Scaled latents (B, z, h, w) -> image (B, 3, 8h, 8w), about [-1, 1] (not clamped)."""
        tile_size = tile_size if tile_size is not None else self.tile_size
        tile_overlap = tile_overlap if tile_overlap is not None else self.tile_overlap
        if self.slicing and latents.shape[0] > 1:
            return torch.cat([self.decode(z, tile_size, tile_overlap) for z in latents.split(1)])
        z = self.unscale_latents(latents).to(self.dtype)

        def tiled(tile: int, overlap: int) -> Tensor:
            return decode_tiled(self._decode_raw, z, tile, overlap, self.config.downscale)

        if tile_size is not None and max(z.shape[-2:]) > tile_size:
            return tiled(tile_size, tile_overlap)
        return self._tiles_on_oom("decode", z, lambda: self._decode_raw(z), tiled)

    def _tiles_on_oom(self, what: str, x: Tensor, one_piece, tiled) -> Tensor:
        """one_piece(); if the GPU runs out of memory, tiled(oom_tile_size, overlap) instead, with
        a note the first time (tiled None: the error goes through)."""
        try:
            return one_piece()
        except torch.OutOfMemoryError:   # raised by the GPU allocators (the CPU's is a RuntimeError)
            if self.oom_tile_size is None or tiled is None:
                raise
        if x.is_cuda:
            torch.cuda.empty_cache()   # outside the except block: the failed attempt's tensors are freed
        if not self._told_about_tiles:
            print(f"note: out of GPU memory for a one-piece VAE {what} of {tuple(x.shape[-2:])}; using tiles of "
                  f"{self.oom_tile_size} latent pixels from now on when needed (the seams differ slightly "
                  "from a one-piece result)")
            self._told_about_tiles = True
        return tiled(self.oom_tile_size, min(self.tile_overlap, self.oom_tile_size // 4))

    def _decode_raw(self, z: Tensor) -> Tensor:
        if self.config.use_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _edge_ramp(length: int, ramp: int, ramp_start: bool, ramp_end: bool, like: Tensor) -> Tensor:
    """1-D blending weights: linear ramps over `ramp` pixels at the tile edges that overlap a neighbour."""
    w = torch.ones(length, dtype=like.dtype, device=like.device)
    if ramp > 0:
        up = torch.arange(1, ramp + 1, dtype=like.dtype, device=like.device) / (ramp + 1)
        if ramp_start:
            w[:ramp] = up
        if ramp_end:
            w[-ramp:] = up.flip(0)
    return w


def decode_tiled(decode_fn, z: Tensor, tile: int, overlap: int, scale: int) -> Tensor:
    """Decode overlapping latent tiles with `decode_fn` and blend them with linear edge ramps.

    A decoder that treats every pixel independently gives exactly the one-piece result, which
    is how the blending is tested."""
    return run_tiled(decode_fn, z, tile, overlap, up=scale, down=1)


def run_tiled(fn, x: Tensor, tile: int, overlap: int, *, up: int, down: int) -> Tensor:
    """fn over overlapping tiles of x (tile and overlap in x's pixels), each output tile blended
    into place with linear edge ramps; fn maps a (.., h, w) tile to (.., h*up/down, w*up/down)
    (a decoder: up=8; an encoder: down=8, with tile, overlap and x's size multiples of 8)."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be in [0, tile size {tile})")
    if any(n % down for n in (tile, overlap, *x.shape[-2:])):
        raise ValueError(f"tile {tile}, overlap {overlap} and size {tuple(x.shape[-2:])} must be multiples of {down}")
    h, w = x.shape[-2:]

    def o(n: int) -> int:   # input pixels -> output pixels
        return n * up // down

    stride = tile - overlap
    out = None
    weight_sum = None
    ys, xs = _tile_starts(h, tile, stride), _tile_starts(w, tile, stride)
    for y in ys:
        for x0 in xs:
            piece = fn(x[..., y: y + tile, x0: x0 + tile])
            if out is None:
                out = piece.new_zeros(piece.shape[:2] + (o(h), o(w)))
                weight_sum = piece.new_zeros((o(h), o(w)))
            ph, pw = piece.shape[-2:]
            wy = _edge_ramp(ph, o(overlap), y > 0, y + tile < h, piece)
            wx = _edge_ramp(pw, o(overlap), x0 > 0, x0 + tile < w, piece)
            weight = wy[:, None] * wx[None, :]
            out[..., o(y): o(y) + ph, o(x0): o(x0) + pw] += piece * weight
            weight_sum[o(y): o(y) + ph, o(x0): o(x0) + pw] += weight
    return out / weight_sum


# ---------------------------------------------------------------------------------------------
# Loading.

AE_PREFIXES = ("", "vae.", "first_stage_model.")


def find_ae_prefix(keys: Iterable[str]) -> str | None:
    keys = set(keys)
    for prefix in AE_PREFIXES:
        # encoder.down.N.block.M is the LDM layout; diffusers VAEs share conv_in but use down_blocks.
        if all(f"{prefix}{k}" in keys for k in ("encoder.conv_in.weight", "decoder.conv_in.weight",
                                                 "encoder.down.0.block.0.conv1.weight")):
            return prefix
    return None


def load_autoencoder(path: str | os.PathLike, scaling: LatentScaling, device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None) -> AutoEncoder:
    """Load an LDM-layout KL autoencoder (no prefix, `vae.` or `first_stage_model.`), refusing
    other files and VAEs of the wrong latent width."""
    raw = tensor_shapes(path)
    prefix = find_ae_prefix(raw)
    if prefix is None:
        what = describe_checkpoint(raw) or "not an autoencoder (no encoder.conv_in.weight)"
        hint = ""
        if any(k.endswith("encoder.down_blocks.0.resnets.0.conv1.weight") for k in raw):
            hint = " It is in the diffusers layout; pass the single-file version (e.g. ae.safetensors) instead."
        raise ModelFileError(
            f"{path}: expected the {scaling.name} ({scaling.z_channels}-channel autoencoder such as ae.safetensors), "
            f"but this file looks like {what}.{hint}"
        )
    shapes = {k[len(prefix):]: s for k, (s, _) in raw.items() if k.startswith(prefix)}
    config = AutoEncoderConfig.from_shapes(shapes, scaling)
    if config.z_channels != scaling.z_channels:
        raise ModelFileError(
            f"{path}: this autoencoder has {config.z_channels} latent channels, but the {scaling.name} has "
            f"{scaling.z_channels}. It belongs to another model family; pass the matching VAE file."
        )
    with torch.device("meta"):
        model = AutoEncoder(config)
    expected = set(model.state_dict())
    keys = [prefix + k for k in shapes if k in expected]
    missing = expected - {k[len(prefix):] for k in keys}
    if missing:
        raise ModelFileError(f"{path}: the autoencoder is missing {len(missing)} tensors, e.g. {sorted(missing)[:3]}. "
                             "The file is incomplete or of another layout.")
    tensors = load_file(path, device=device, keys=keys)
    state = {}
    for k, t in tensors.items():
        # Without a requested dtype keep the file's; an 8-bit float file is widened to float32.
        target_dtype = dtype or (t.dtype if t.element_size() > 1 else torch.float32)
        state[k[len(prefix):]] = t.to(device=device, dtype=target_dtype)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval().requires_grad_(False)


def load_flux_ae(path: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> AutoEncoder:
    return load_autoencoder(path, FLUX_AE_SCALING, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# "What is this file?" for refusal messages (shared by every loader).

# (pattern searched in every key, what the file is), most specific first.
_CHECKPOINT_KINDS: tuple[tuple[str, str], ...] = (
    (r"\.(lora_down|lora_up|lora_A|lora_B)\.weight$", "a LoRA file (not a base model)"),
    (r"(^|\.)distilled_guidance_layer\.in_proj\.weight$", "a Chroma DiT"),
    (r"(^|\.)double_blocks\.\d+\.img_attn\.qkv\.weight$", "a FLUX.1 DiT"),
    (r"(^|\.)pos_embed\.pos_embed$", "an SD3/SD3.5 transformer in the diffusers layout"),
    (r"(^|\.)time_text_embed\.timestep_embedder\.linear_1\.weight$", "a FLUX.1 transformer in the diffusers layout"),
    (r"(^|\.)joint_blocks\.\d+\.", "an SD3/SD3.5 model (MMDiT joint_blocks)"),
    (r"(^|\.)(cap_embedder\.0\.weight$|layers\.\d+\.attention\.qkv\.weight$)", "a Lumina Image 2.0 DiT"),
    # A standalone Anima LLM adapter file (inside a DiT its keys sit under `llm_adapter.`; the DiT's
    # own attention output is `output_proj`, never `o_proj`).
    (r"^blocks\.\d+\.cross_attn\.o_proj\.weight$", "an Anima LLM adapter (its weights only, no DiT)"),
    (r"(^|\.)(net\.blocks\.\d+\.|blocks\.\d+\.self_attn\.)", "an Anima (Cosmos-Predict2) DiT"),
    (r"(^|\.)input_blocks\.\d+\.", "an SD 1.x/2.x/SDXL UNet checkpoint"),
    (r"(^|\.)encoder\.down_blocks\.\d+\.resnets\.", "a VAE in the diffusers layout"),
    (r"(^|\.)encoder\.(downsamples\.\d+\.residual\.|down_blocks\.\d+\.norm1\.gamma$)",
     "a Qwen-Image / Wan 3-D causal VAE (e.g. qwen_image_vae.safetensors)"),
    (r"(^|\.)encoder\.conv_in\.weight$", "an autoencoder (VAE, e.g. ae.safetensors)"),
    (r"(^|\.)encoder\.block\.\d+\.layer\.0\.SelfAttention\.q\.weight$",
     "a T5 text encoder (e.g. t5xxl_fp16.safetensors)"),
    (r"(^|\.)text_model\.embeddings\.token_embedding\.weight$", "a CLIP text encoder (e.g. clip_l.safetensors)"),
    (r"(^|\.)transformer\.resblocks\.\d+\.attn\.in_proj_weight$", "an OpenCLIP text encoder"),
    (r"(^|\.)layers\.\d+\.self_attn\.q_norm\.weight$", "a Qwen3 text encoder (e.g. qwen_3_06b_base.safetensors)"),
    (r"(^|\.)layers\.\d+\.pre_feedforward_layernorm\.weight$",
     "a Gemma2 text encoder (e.g. gemma_2_2b_fp16.safetensors)"),
    (r"(^|\.)layers\.\d+\.self_attn\.q_proj\.weight$", "a language-model text encoder (Gemma/Qwen)"),
)


def describe_checkpoint(keys: Iterable[str]) -> str | None:
    """A short guess of what a checkpoint is from its key names ("a T5 text encoder"), or None.
    Files that hold several models (all-in-one checkpoints) are named after the first match."""
    keys = [k for k in keys if k != "__metadata__"]
    for pattern, description in _CHECKPOINT_KINDS:
        rx = re.compile(pattern)
        if any(rx.search(k) for k in keys):
            return description
    return None


__all__ = [
    "AutoEncoder", "AutoEncoderConfig", "GaussianMoments", "LatentScaling", "FLUX_AE_SCALING", "SD3_VAE_SCALING",
    "SD_VAE_SCALING", "load_autoencoder", "load_flux_ae", "describe_checkpoint", "decode_tiled", "run_tiled", "find_ae_prefix",
]
