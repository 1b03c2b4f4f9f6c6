"""The Qwen-Image VAE (Wan-2.1-style causal 3-D VAE, 16 latent channels, 8x spatial) for Anima.

The network is diffusers' `AutoencoderKLQwenImage` (it serves as is: same architecture, diffusers
key layout). Files come in two layouts and both load: the ComfyUI / original Wan layout that
Anima ships (`conv1`, `encoder.downsamples.N.residual.K`, `decoder.upsamples.N`, `decoder.head.*`)
is converted by `from_wan` (the inverse, `to_wan`, writes that layout), and the diffusers layout
(`quant_conv`, `encoder.down_blocks.N.conv1`) loads directly. `.pth` files are read with
`torch.load(weights_only=True)` only. Sizes come from the shapes, so tiny files load too.

Images are single frames: `encode` takes (B, 3, H, W) in [-1, 1] and returns the posterior
**mode**, normalised per channel, (z - mean) / std (B, 16, H/8, W/8); `decode` inverts that.

Memory options (`--vae_chunk_size`, `--vae_disable_cache`):
- chunk_size N: every causal 3-D convolution runs on bands of N output rows (with the halo rows
  it needs), so the padded copy and the convolution workspace of a large image stay small.
  The result is the same; only the peak memory falls.
- disable_cache: skip the feature cache the VAE keeps for frame-by-frame video processing (a
  clone of every convolution's input). On a single frame the cache never changes the result.
"""

from __future__ import annotations

import os
import re
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from library.autoencoders import describe_checkpoint
from library.errors import ConfigError, ModelFileError
from library.safetensors_io import load_file, tensor_shapes

# Per-channel latent statistics of the Qwen-Image VAE (FORMATS 1.5).
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
LATENT_CHANNELS = 16
DOWNSCALE = 8


@dataclass(frozen=True)
class QwenImageVAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3

    def build(self) -> nn.Module:
        from diffusers import AutoencoderKLQwenImage

        return AutoencoderKLQwenImage(
            base_dim=self.base_dim, z_dim=self.z_dim, dim_mult=list(self.dim_mult), num_res_blocks=self.num_res_blocks,
            attn_scales=[], temperal_downsample=list(self.temporal_downsample), dropout=0.0,
            input_channels=self.in_channels, latents_mean=list(LATENTS_MEAN[: self.z_dim]),
            latents_std=list(LATENTS_STD[: self.z_dim]),
        )

    @staticmethod
    def from_shapes(s: dict[str, tuple[int, ...]]) -> "QwenImageVAEConfig":
        """From diffusers-layout key shapes (the encoder's flat down_blocks list tells the levels)."""
        base_dim, in_channels = s["encoder.conv_in.weight"][:2]
        n_flat = 1 + max(int(m.group(1)) for k in s if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))
        resamples = [i for i in range(n_flat) if f"encoder.down_blocks.{i}.resample.1.weight" in s]
        num_res_blocks = resamples[0] if resamples else n_flat
        levels = len(resamples) + 1
        dim_mult = tuple(s[f"encoder.down_blocks.{level * (num_res_blocks + 1)}.conv1.weight"][0] // base_dim
                         for level in range(levels))
        temporal = tuple(f"encoder.down_blocks.{i}.time_conv.weight" in s for i in resamples)
        return QwenImageVAEConfig(base_dim=base_dim, z_dim=s["post_quant_conv.weight"][0], dim_mult=dim_mult,
                                  num_res_blocks=num_res_blocks, temporal_downsample=temporal,
                                  in_channels=in_channels)


# ---------------------------------------------------------------------------------------------
# Key adapter: ComfyUI / original Wan layout <-> diffusers layout.

def _resblock(wan: str, diffusers: str) -> list[tuple[str, str]]:
    return [(f"{wan}.residual.0", f"{diffusers}.norm1"), (f"{wan}.residual.2", f"{diffusers}.conv1"),
            (f"{wan}.residual.3", f"{diffusers}.norm2"), (f"{wan}.residual.6", f"{diffusers}.conv2"),
            (f"{wan}.shortcut", f"{diffusers}.conv_shortcut")]


def _resample(wan: str, diffusers: str) -> list[tuple[str, str]]:
    return [(f"{wan}.resample.1", f"{diffusers}.resample.1"), (f"{wan}.time_conv", f"{diffusers}.time_conv")]


def module_pairs(levels: int, num_res_blocks: int) -> list[tuple[str, str]]:
    """(Wan module path, diffusers module path) for every module that holds tensors."""
    pairs = [("conv1", "quant_conv"), ("conv2", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv1", f"{part}.conv_in"), (f"{part}.head.0", f"{part}.norm_out"),
                  (f"{part}.head.2", f"{part}.conv_out")]
        pairs += _resblock(f"{part}.middle.0", f"{part}.mid_block.resnets.0")
        pairs += [(f"{part}.middle.1.{n}", f"{part}.mid_block.attentions.0.{n}") for n in ("norm", "to_qkv", "proj")]
        pairs += _resblock(f"{part}.middle.2", f"{part}.mid_block.resnets.1")
    flat = 0  # the encoder keeps one flat list (same indices in both layouts)
    for level in range(levels):
        for _ in range(num_res_blocks):
            pairs += _resblock(f"encoder.downsamples.{flat}", f"encoder.down_blocks.{flat}")
            flat += 1
        if level != levels - 1:
            pairs += _resample(f"encoder.downsamples.{flat}", f"encoder.down_blocks.{flat}")
            flat += 1
    flat = 0  # the decoder's flat Wan list becomes up_blocks.L.resnets.R / .upsamplers.0
    for level in range(levels):
        for r in range(num_res_blocks + 1):
            pairs += _resblock(f"decoder.upsamples.{flat}", f"decoder.up_blocks.{level}.resnets.{r}")
            flat += 1
        if level != levels - 1:
            pairs += _resample(f"decoder.upsamples.{flat}", f"decoder.up_blocks.{level}.upsamplers.0")
            flat += 1
    return pairs


def _rename(state: dict[str, Tensor], table: dict[str, str], source: str) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module not in table:
            raise ModelFileError(f"{source}: unexpected VAE tensor {key}; the file is not a Qwen-Image / Wan VAE "
                                 "layout we can load.")
        out[f"{table[module]}.{param}"] = value
    return out


def _wan_levels(keys) -> tuple[int, int]:
    """(levels, num_res_blocks) of a Wan-layout file: resample modules split the encoder list."""
    flat = sorted({int(m.group(1)) for k in keys if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k))})
    resamples = sorted({int(m.group(1)) for k in keys if (m := re.match(r"encoder\.downsamples\.(\d+)\.resample", k))})
    num_res_blocks = resamples[0] if resamples else len(flat)
    return len(resamples) + 1, num_res_blocks


def from_wan(state: dict[str, Tensor], source: str = "the VAE") -> dict[str, Tensor]:
    levels, num_res_blocks = _wan_levels(state)
    return _rename(state, dict(module_pairs(levels, num_res_blocks)), source)


def to_wan(state: dict[str, Tensor], config: QwenImageVAEConfig) -> dict[str, Tensor]:
    table = {d: w for w, d in module_pairs(len(config.dim_mult), config.num_res_blocks)}
    return _rename(state, table, "the VAE")


def is_wan_layout(keys) -> bool:
    return "encoder.conv1.weight" in keys and any(k.startswith("encoder.downsamples.") for k in keys)


# ---------------------------------------------------------------------------------------------
# Banded causal convolution (--vae_chunk_size).

def _banded_causal_conv(conv: nn.Conv3d, x: Tensor, cache_x: Tensor | None = None, *, rows: int) -> Tensor:
    """The causal conv's forward computed on bands of `rows` output rows. Zero padding is added
    per band (edges only), so each band sees exactly the inputs the whole-image call would."""
    pad_w0, pad_w1, pad_h0, pad_h1, pad_t0, pad_t1 = conv._padding
    if cache_x is not None and pad_t0 > 0:
        x = torch.cat((cache_x.to(x.device), x), dim=2)
        pad_t0 -= cache_x.shape[2]
    kh = conv.kernel_size[1]
    height = x.shape[3]
    out_rows = height + pad_h0 + pad_h1 - kh + 1
    if conv.stride[1] != 1 or out_rows <= rows:
        return nn.Conv3d.forward(conv, F.pad(x, (pad_w0, pad_w1, pad_h0, pad_h1, pad_t0, pad_t1)))
    bands = []
    for start in range(0, out_rows, rows):
        stop = min(out_rows, start + rows)
        first, last = start - pad_h0, stop + kh - 1 - pad_h0  # input rows [first, last) in unpadded coordinates
        band = x[:, :, :, max(first, 0): min(last, height)]
        band = F.pad(band, (pad_w0, pad_w1, max(0, -first), max(0, last - height), pad_t0, pad_t1))
        bands.append(nn.Conv3d.forward(conv, band))
    return torch.cat(bands, dim=3)


def _set_band_rows(model: nn.Module, rows: int | None) -> None:
    """Instance-level forward overrides on every causal conv (class and names unchanged)."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    for module in model.modules():
        if isinstance(module, QwenImageCausalConv3d):
            if rows is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = types.MethodType(
                    lambda self, x, cache_x=None: _banded_causal_conv(self, x, cache_x, rows=rows), module)


# ---------------------------------------------------------------------------------------------
# The VAE for images.

class QwenImageVAE(nn.Module):
    """Images <-> normalised latents with the Qwen-Image VAE (`model` is diffusers' network)."""

    def __init__(self, model: nn.Module, config: QwenImageVAEConfig, *, chunk_size: int | None = None,
                 disable_cache: bool = False):
        super().__init__()
        self.model = model
        self.config = config
        self.use_cache = not disable_cache
        self.chunk_size = None
        self.set_chunk_size(chunk_size)
        z = config.z_dim
        self.register_buffer("latents_mean", torch.tensor(LATENTS_MEAN[:z]).view(1, z, 1, 1), persistent=False)
        self.register_buffer("latents_std", torch.tensor(LATENTS_STD[:z]).view(1, z, 1, 1), persistent=False)

    def set_chunk_size(self, chunk_size: int | None) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ConfigError(f"--vae_chunk_size must be a positive number of rows (e.g. 64), got {chunk_size}.")
        self.chunk_size = chunk_size
        _set_band_rows(self.model, chunk_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.quant_conv.weight.device

    def encode_moments(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> raw posterior parameters (B, 2*z, H/8, W/8) (mean, logvar)."""
        x = images.to(self.dtype).unsqueeze(2)
        if self.use_cache:
            h = self.model._encode(x)
        else:
            h = self.model.quant_conv(self.model.encoder(x))
        return h.squeeze(2)

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalised latents (B, 16, H/8, W/8): (mode - mean) / std."""
        if images.shape[-1] % DOWNSCALE or images.shape[-2] % DOWNSCALE:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of {DOWNSCALE}")
        mode = self.encode_moments(images)[:, : self.config.z_dim]
        return (mode - self.latents_mean.to(mode)) / self.latents_std.to(mode)

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents (B, 16, h, w) -> images (B, 3, 8h, 8w) in [-1, 1]."""
        z = latents.to(self.dtype) * self.latents_std.to(self.dtype) + self.latents_mean.to(self.dtype)
        z = z.unsqueeze(2)
        if self.use_cache:
            out = self.model._decode(z, return_dict=False)[0]
        else:
            out = self.model.decoder(self.model.post_quant_conv(z))
        return out.squeeze(2).clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Loading.

def read_vae_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A .safetensors file (memory-mapped) or a .pth/.pt/.ckpt read with weights_only=True."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: file not found. Check --vae.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many kinds for a bad or unsafe pickle
        raise ModelFileError(f"{path}: cannot be read as a plain tensor file with weights_only loading ({e}). "
                             "Use the .safetensors version of the VAE.") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelFileError(f"{path}: not a VAE state dict (expected a flat dict of tensors).")
    return dict(state)


def _diffusers_names(path, keys) -> dict[str, str]:
    """diffusers name -> the file's name, for a VAE in the Wan/ComfyUI layout (maybe behind `vae.`)
    or diffusers'; files of other kinds are refused by name."""
    names = {k[len("vae."):] if k.startswith("vae.") else k: k for k in keys}
    if is_wan_layout(names):
        return from_wan(names, str(path))
    if not ("encoder.conv_in.weight" in names and "post_quant_conv.weight" in names
            and "encoder.down_blocks.0.norm1.gamma" in names):
        what = describe_checkpoint(names) or "an unknown kind of file"
        raise ModelFileError(f"{path}: expected the Qwen-Image VAE (qwen_image_vae.safetensors, 16 latent channels), "
                             f"but this file looks like {what}. Pass the Qwen-Image VAE to --vae.")
    return names


def load_qwen_image_vae(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, chunk_size: int | None = None,
                        disable_cache: bool = False) -> QwenImageVAE:
    """Load the Qwen-Image VAE from either layout, refusing files of other kinds by name. To a GPU
    a .safetensors file is checked from its header, then read straight into GPU memory."""
    state = None
    if torch.device(device).type == "cuda" and Path(path).suffix == ".safetensors":
        file_shapes = {k: shape for k, (shape, _) in tensor_shapes(path).items()}
    else:
        state = read_vae_state_dict(path)
        file_shapes = {k: tuple(t.shape) for k, t in state.items()}
    names = _diffusers_names(path, file_shapes)
    shapes = {k: file_shapes[f] for k, f in names.items()}
    config = QwenImageVAEConfig.from_shapes(shapes)
    if config.z_dim != LATENT_CHANNELS:
        raise ModelFileError(f"{path}: this VAE has {config.z_dim} latent channels; Anima's Qwen-Image VAE has "
                             f"{LATENT_CHANNELS}. It belongs to another model.")
    with torch.device("meta"):
        model = config.build()
    expected = set(model.state_dict())
    missing = sorted(expected - set(names))
    if missing:
        raise ModelFileError(f"{path}: the VAE is missing {len(missing)} tensors (e.g. {missing[:3]}); the file is "
                             "incomplete.")
    if state is None:
        state = load_file(path, device=device, keys=[names[k] for k in expected])
    tensors = {}
    for k in expected:
        t = state.pop(names[k])   # popped: a cast copy replaces it, not doubles it
        target = dtype or (t.dtype if t.element_size() > 1 else torch.float32)
        tensors[k] = t.to(device=device, dtype=target)
    model.load_state_dict(tensors, assign=True, strict=True)
    vae = QwenImageVAE(model.eval().requires_grad_(False), config, chunk_size=chunk_size,
                       disable_cache=disable_cache)
    return vae.to(device).eval().requires_grad_(False)
