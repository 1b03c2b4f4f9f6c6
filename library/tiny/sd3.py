"""tiny SD3 Medium / SD3.5 Medium / SD3.5 Large set (single file with VAE + CLIP-L/G + T5, separate TEs, tokenizers)

Tiny random SD3-family checkpoints in the exact real key layouts (SAI single file:
`model.diffusion_model.`, `first_stage_model.`, `text_encoders.{clip_l,clip_g,t5xxl}.transformer.`),
plus separate clip_l / clip_g / t5xxl files as in the SD3 repositories' text_encoders folder.

Sizes keep the real rules: MMDiT hidden = 64 x depth with 64-wide heads, CLIP and T5 heads of
64, the pooled width = CLIP-L + CLIP-G widths, the context width = the T5 width. The
positional table is the real sin-cos table on a small grid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from library.autoencoders import SD3_VAE_SCALING
from library.sd3.model import VARIANTS, MMDiT, SD3Params
from library.sd3.pos_embed import sincos_table
from library.safetensors_io import save_file_atomic
from library.tiny import tokenizers as tiny_tokenizers
from library.tiny.flux import (TINY_AE_CONFIG, TINY_CLIP_WIDTH, _to_file_dtype, init_random_, random_autoencoder,
                               random_clip_l, random_t5)

DIT_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE_PREFIXES = {
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}
TINY_CLIP_L_WIDTH = TINY_CLIP_WIDTH   # 2 heads
TINY_CLIP_G_WIDTH = 192               # 3 heads
TINY_T5_WIDTH = 384                   # 6 heads; the MMDiT context width
TINY_SD3_VAE_CONFIG = replace(TINY_AE_CONFIG, scale_factor=SD3_VAE_SCALING.scale_factor,
                              shift_factor=SD3_VAE_SCALING.shift_factor)

_FILE_STEMS = {"medium": "sd3_medium", "5-medium": "sd3.5_medium", "5-large": "sd3.5_large"}
# Per variant: depth (hidden = 64 x depth), positional grid, blocks with x_block.attn2.
_TINY_SHAPES = {
    "medium": dict(depth=3, pos_embed_max_size=16, x_block_self_attn_layers=()),
    "5-medium": dict(depth=3, pos_embed_max_size=24, x_block_self_attn_layers=(0, 1)),
    "5-large": dict(depth=4, pos_embed_max_size=16, x_block_self_attn_layers=()),
}


def tiny_sd3_params(variant: str = "5-medium") -> SD3Params:
    if variant not in VARIANTS:
        raise ValueError(f"unknown SD3 variant {variant!r}; choose one of {sorted(VARIANTS)}")
    shape = _TINY_SHAPES[variant]
    depth = shape["depth"]
    return replace(VARIANTS[variant].params, depth=depth, hidden_size=64 * depth, num_heads=depth,
                   adm_in_channels=TINY_CLIP_L_WIDTH + TINY_CLIP_G_WIDTH, context_in_features=TINY_T5_WIDTH,
                   pos_embed_max_size=shape["pos_embed_max_size"],
                   x_block_self_attn_layers=shape["x_block_self_attn_layers"])


# ---------------------------------------------------------------------------------------------
# Models with random weights.

def build_mmdit(params: SD3Params, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0) -> MMDiT:
    """An MMDiT with random weights allocated directly on `device` (full-size benchmarks too)
    and the real sin-cos positional table."""
    with torch.device("meta"):
        model = MMDiT(params)
    model = model.to(dtype=dtype).to_empty(device=device)
    init_random_(model, seed)
    with torch.no_grad():
        model.pos_embed.copy_(sincos_table(params.hidden_size, params.pos_embed_max_size))
    return model


def mmdit_state_dict(variant: str = "5-medium", params: SD3Params | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    return build_mmdit(params or tiny_sd3_params(variant), seed=seed).state_dict()


def random_clip_g(seed: int = 0, **overrides) -> nn.Module:
    from transformers import CLIPTextModelWithProjection

    from library.text_encoders import clip_g_config

    config = clip_g_config(**(dict(hidden_size=TINY_CLIP_G_WIDTH, num_attention_heads=TINY_CLIP_G_WIDTH // 64,
                                   intermediate_size=2 * TINY_CLIP_G_WIDTH, num_hidden_layers=2,
                                   vocab_size=tiny_tokenizers.clip_vocab_size(), projection_dim=TINY_CLIP_G_WIDTH)
                              | overrides))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModelWithProjection(config).eval()
    return init_random_(model, seed)


def _clip_file_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def clip_l_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """CLIP-L keys as in clip_l.safetensors of the SD3 repositories, with a text projection."""
    state = _clip_file_state(random_clip_l(seed))
    gen = torch.Generator().manual_seed(seed + 7)
    state["text_projection.weight"] = torch.randn(TINY_CLIP_L_WIDTH, TINY_CLIP_L_WIDTH, generator=gen) \
        / TINY_CLIP_L_WIDTH ** 0.5
    return state


def clip_g_state(seed: int = 0) -> dict[str, torch.Tensor]:
    return _clip_file_state(random_clip_g(seed))


def t5xxl_state(seed: int = 0) -> dict[str, torch.Tensor]:
    state = random_t5(seed, d_model=TINY_T5_WIDTH, num_heads=TINY_T5_WIDTH // 64).state_dict()
    state.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight; files store it once
    return state


def vae_state(seed: int = 0) -> dict[str, torch.Tensor]:
    return random_autoencoder(TINY_SD3_VAE_CONFIG, seed).state_dict()


# ---------------------------------------------------------------------------------------------
# Writers.

def _save(state: dict[str, torch.Tensor], path, dtype: torch.dtype, prefix: str = "") -> Path:
    save_file_atomic({prefix + k: v for k, v in _to_file_dtype(state, dtype).items()}, path)
    return Path(path)


def write_sd3_checkpoint(path: str | os.PathLike, variant: str = "5-medium", *, params: SD3Params | None = None,
                         seed: int = 0, dtype: torch.dtype = torch.float32, prefix: str = DIT_PREFIX,
                         include_vae: bool = True, text_encoders: tuple[str, ...] = ()) -> Path:
    """The DiT (behind `prefix`), optionally with the VAE and the named text encoders
    ("clip_l", "clip_g", "t5xxl") inside, like SAI's all-in-one files. Each component gets
    the same seed as its separate file would (see write_tiny_sd3_set)."""
    state = {prefix + k: v for k, v in mmdit_state_dict(variant, params, seed).items()}
    if include_vae:
        state |= {VAE_PREFIX + k: v for k, v in vae_state(seed + 1).items()}
    makers = {"clip_l": (clip_l_state, 2), "clip_g": (clip_g_state, 3), "t5xxl": (t5xxl_state, 4)}
    for name in text_encoders:
        make, offset = makers[name]
        state |= {TE_PREFIXES[name] + k: v for k, v in make(seed + offset).items()}
    return _save(state, path, dtype)


def write_sd3_vae(path, *, seed: int = 0, dtype: torch.dtype = torch.float32, prefix: str = "") -> Path:
    return _save(vae_state(seed), path, dtype, prefix)


def write_clip_l(path, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    return _save(clip_l_state(seed), path, dtype)


def write_clip_g(path, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    return _save(clip_g_state(seed), path, dtype)


def write_t5xxl(path, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    return _save(t5xxl_state(seed), path, dtype)


def write_tokenizer_cache(cache_dir) -> Path:
    """CLIP-L, CLIP-G and T5 tokenizers under their hub-id folder names."""
    tiny_tokenizers.write_tokenizer_cache(cache_dir)
    return tiny_tokenizers.write_clip_g_tokenizer(cache_dir)


@dataclass
class TinySD3Paths:
    checkpoint: Path          # DiT + VAE (+ text encoders when all_in_one)
    clip_l: Path
    clip_g: Path
    t5xxl: Path
    tokenizer_cache_dir: Path
    variant: str


def write_tiny_sd3_set(out_dir: str | os.PathLike, *, variant: str = "5-medium", seed: int = 0,
                       dtype: torch.dtype = torch.float32, all_in_one: bool = False) -> TinySD3Paths:
    """The SD3 checkpoint (DiT + VAE, and with all_in_one also CLIP-L/G and T5 inside), the
    separate text-encoder files (the same weights) and a tokenizer cache dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = ("clip_l", "clip_g", "t5xxl") if all_in_one else ()
    suffix = "_incl_clips_t5xxl" if all_in_one else ""
    return TinySD3Paths(
        checkpoint=write_sd3_checkpoint(out / f"{_FILE_STEMS[variant]}{suffix}-tiny.safetensors", variant, seed=seed, dtype=dtype, text_encoders=names),
        clip_l=write_clip_l(out / "clip_l.safetensors", seed=seed + 2, dtype=dtype),
        clip_g=write_clip_g(out / "clip_g.safetensors", seed=seed + 3, dtype=dtype),
        t5xxl=write_t5xxl(out / "t5xxl.safetensors", seed=seed + 4, dtype=dtype),
        tokenizer_cache_dir=write_tokenizer_cache(out / "tokenizers"),
        variant=variant,
    )


# ---------------------------------------------------------------- `python -m library.tiny sd3`

def add_cli_arguments(parser) -> None:
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="5-medium",
                        help="medium = SD3 Medium, 5-medium = SD3.5 Medium, 5-large = SD3.5 Large")
    parser.add_argument("--all_in_one", action="store_true",
                        help="also put CLIP-L, CLIP-G and T5 inside the checkpoint (like sd3_medium_incl_clips_t5xxlfp16)")


def write_cli(args) -> dict[str, Path | str | None]:
    return vars(write_tiny_sd3_set(args.out, variant=args.variant, seed=args.seed, dtype=args.torch_dtype,
                                   all_in_one=args.all_in_one))
