"""tiny Lumina Image 2.0 set (DiT, Gemma2 with embedded tokenizer, AE, tokenizer cache)

Tiny random Lumina 2 checkpoints in the exact real key layouts, plus a full-size builder.

The DiT keeps the real head size (96, RoPE axes 32+32+32) and grouped-query attention (2 heads,
1 KV head); the Gemma2 keeps its real head size 256. The Gemma2 file is written like
Comfy-Org's gemma_2_2b_fp16.safetensors: keys behind `model.` and the sentencepiece tokenizer
as a uint8 tensor `spiece_model`. The AE is the tiny FLUX AE.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from library.lumina.loading import COMFY_PREFIX
from library.lumina.model import LuminaParams, NextDiT, ffn_hidden_dim
from library.safetensors_io import save_file_atomic
from library.tiny import tokenizers as tiny_tokenizers
from library.tiny.flux import _to_file_dtype, init_random_, write_ae

TINY_GEMMA2_WIDTH = 128      # 2 query heads and 1 KV head of 256 (Gemma2's real head size)
TINY_DIT_WIDTH = 192         # 2 heads of 96
LAYOUTS = {"alpha-vllm": "", "comfy": COMFY_PREFIX}


def tiny_lumina_params() -> LuminaParams:
    return LuminaParams(dim=TINY_DIT_WIDTH, n_layers=2, n_refiner_layers=2, n_heads=2, n_kv_heads=1,
                        ffn_hidden_dim=ffn_hidden_dim(TINY_DIT_WIDTH), cap_feat_dim=TINY_GEMMA2_WIDTH)


def tiny_gemma2_config_overrides() -> dict:
    return dict(vocab_size=tiny_tokenizers.gemma_vocab_size(), hidden_size=TINY_GEMMA2_WIDTH, intermediate_size=256,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=256)


def build_lumina_model(params: LuminaParams, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       *, seed: int = 0) -> NextDiT:
    """A Next-DiT with random weights allocated directly on `device` in `dtype`; used by the
    full-size GPU benchmarks without writing a 10 GB file."""
    with torch.device("meta"):
        model = NextDiT(params)
    model = model.to(dtype=dtype).to_empty(device=device)
    return init_random_(model, seed)


def lumina_state_dict(params: LuminaParams | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    return build_lumina_model(params or tiny_lumina_params(), seed=seed).state_dict()


def write_lumina_dit(path: str | os.PathLike, *, layout: str = "alpha-vllm", params: LuminaParams | None = None,
                     seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """`layout` "alpha-vllm" (lumina-image-2.safetensors, no prefix) or "comfy"
    (lumina_2_model_bf16.safetensors, keys behind model.diffusion_model.)."""
    prefix = LAYOUTS[layout]
    state = _to_file_dtype(lumina_state_dict(params, seed), dtype)
    save_file_atomic({prefix + k: v for k, v in state.items()}, path)
    return Path(path)


def random_gemma2(seed: int = 0, **overrides) -> nn.Module:
    from transformers import Gemma2Model

    from library.lumina.gemma2 import gemma2_config

    config = gemma2_config(**(tiny_gemma2_config_overrides() | overrides))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma2Model(config).eval()
    init_random_(model, seed)
    with torch.no_grad():  # Gemma's RMSNorm scales by (1 + weight): centre the random gains on 0
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.sub_(1.0)
    return model


def write_gemma2(path: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype = torch.float32, prefix: str = "model.",
                 with_tokenizer: bool = True) -> Path:
    """Like Comfy-Org's gemma_2_2b_fp16.safetensors: `model.`-prefixed Gemma2Model keys and, with
    `with_tokenizer`, the sentencepiece model as the uint8 tensor `spiece_model`."""
    state = {prefix + k: v for k, v in _to_file_dtype(random_gemma2(seed).state_dict(), dtype).items()}
    if with_tokenizer:
        spiece = tiny_tokenizers.build_gemma_spiece_model()
        state["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    save_file_atomic(state, path)
    return Path(path)


def write_gemma2_tokenizer_cache(cache_dir: str | os.PathLike) -> Path:
    """The tiny Gemma tokenizer under DIR/google_gemma-2-2b (for files without `spiece_model`)."""
    cache_dir = Path(cache_dir)
    tiny_tokenizers.write_gemma_tokenizer(
        cache_dir / tiny_tokenizers.cache_folder_name(tiny_tokenizers.GEMMA_TOKENIZER_ID))
    return cache_dir


@dataclass
class TinyLuminaPaths:
    dit: Path
    gemma2: Path
    ae: Path
    tokenizer_cache_dir: Path
    layout: str


def write_tiny_lumina_set(out_dir: str | os.PathLike, *, layout: str = "alpha-vllm", seed: int = 0,
                          dtype: torch.dtype = torch.float32, gemma2_tokenizer: bool = True) -> TinyLuminaPaths:
    """DiT (in `layout`), Gemma2 (with its embedded tokenizer unless told otherwise), AE and a
    tokenizer cache dir, all tiny and offline."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dit_name = "lumina-image-2-tiny.safetensors" if layout == "alpha-vllm" else "lumina_2_model_bf16-tiny.safetensors"
    return TinyLuminaPaths(
        dit=write_lumina_dit(out / dit_name, layout=layout, seed=seed, dtype=dtype),
        gemma2=write_gemma2(out / "gemma_2_2b_fp16-tiny.safetensors", seed=seed + 1, dtype=dtype,
                            with_tokenizer=gemma2_tokenizer),
        ae=write_ae(out / "ae.safetensors", seed=seed + 2, dtype=dtype),
        tokenizer_cache_dir=write_gemma2_tokenizer_cache(out / "tokenizers"),
        layout=layout,
    )


# ---------------------------------------------------------------- `python -m library.tiny lumina`

def add_cli_arguments(parser) -> None:
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="alpha-vllm",
                        help="DiT key layout: alpha-vllm (lumina-image-2.safetensors) or comfy "
                             "(lumina_2_model_bf16.safetensors, model.diffusion_model. prefix)")
    parser.add_argument("--gemma2_without_tokenizer", action="store_true",
                        help="leave the spiece_model tensor out of the Gemma2 file (the tokenizer then comes from "
                             "the written tokenizer cache dir)")


def write_cli(args) -> dict[str, Path | str | None]:
    return vars(write_tiny_lumina_set(args.out, layout=args.layout, seed=args.seed, dtype=args.torch_dtype,
                                      gemma2_tokenizer=not args.gemma2_without_tokenizer))
