"""tiny FLUX.1 dev/schnell or Chroma set (DiT, AE, CLIP-L, T5, tokenizers)

Tiny random FLUX / Chroma checkpoints in the exact real key layouts, plus full-size builders.

Tiny sizes keep the real head sizes (DiT 128, CLIP 64, T5 64) so the loaders' size inference
is exercised exactly as on real files. Weights are random but scaled so activations stay O(1)
and every output depends on every input (no zero-initialised final layer).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from library.autoencoders import FLUX_AE_SCALING, AutoEncoder, AutoEncoderConfig
from library.flux.chroma import Chroma
from library.flux.model import VARIANTS, Flux, FluxParams
from library.safetensors_io import save_file_atomic
from library.tiny import tokenizers as tiny_tokenizers

TINY_CLIP_WIDTH = 128      # 2 heads of 64
TINY_T5_WIDTH = 128        # 2 heads of d_kv 64

TINY_AE_CONFIG = AutoEncoderConfig(
    ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16,
    scale_factor=FLUX_AE_SCALING.scale_factor, shift_factor=FLUX_AE_SCALING.shift_factor,
)


def tiny_flux_params(variant: str = "dev") -> FluxParams:
    """Real layout, tiny sizes: hidden 256 = 2 heads of 128, 2 double + 2 single blocks."""
    return replace(
        VARIANTS[variant].params,
        vec_in_dim=TINY_CLIP_WIDTH, context_in_dim=TINY_T5_WIDTH, hidden_size=256, num_heads=2,
        depth=2, depth_single_blocks=2, approximator_hidden_dim=128, approximator_depth=2,
    )


def tiny_clip_config_overrides() -> dict:
    return dict(hidden_size=TINY_CLIP_WIDTH, num_attention_heads=TINY_CLIP_WIDTH // 64, intermediate_size=256,
                num_hidden_layers=2, vocab_size=tiny_tokenizers.clip_vocab_size(), projection_dim=TINY_CLIP_WIDTH)


def tiny_t5_config_overrides() -> dict:
    # Like the real file, the embedding has a few more rows than the tokenizer has ids (32128 vs 32100).
    vocab = 64 * math.ceil(tiny_tokenizers.t5_vocab_size() / 64)
    return dict(d_model=TINY_T5_WIDTH, num_heads=TINY_T5_WIDTH // 64, d_kv=64, d_ff=256, num_layers=2,
                num_decoder_layers=2, vocab_size=vocab)


# ---------------------------------------------------------------------------------------------
# Random initialisation.

@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic, variance-preserving random weights: matrices ~ N(0, 1/fan_in), norm gains
    ~ 1 + N(0, 0.1^2) (not exactly 1, so a dropped gain would show), biases ~ N(0, 0.02^2)."""
    for i, (name, p) in enumerate(model.named_parameters()):
        device = p.device
        gen = torch.Generator(device=device).manual_seed(seed * 100_003 + i)
        work = torch.empty(p.shape, dtype=torch.float32 if p.element_size() == 1 else p.dtype, device=device)
        if p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            work.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
        elif name.endswith("bias"):
            work.normal_(0.0, 0.02, generator=gen)
        else:  # RMSNorm .scale, GroupNorm/LayerNorm .weight
            work.normal_(1.0, 0.1, generator=gen)
        p.copy_(work)
    return model


def build_flux_model(params: FluxParams, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     *, chroma: bool = False, seed: int = 0) -> nn.Module:
    """A FLUX (or Chroma) model with random weights allocated directly on `device` in `dtype`;
    used by the full-size GPU benchmarks without writing a 24 GB file."""
    with torch.device("meta"):
        model = (Chroma if chroma else Flux)(params)
    model = model.to(dtype=dtype).to_empty(device=device)
    return init_random_(model, seed)


def random_autoencoder(config: AutoEncoderConfig = TINY_AE_CONFIG, seed: int = 0) -> AutoEncoder:
    model = AutoEncoder(config)
    return init_random_(model, seed)


def random_clip_l(seed: int = 0, **overrides):
    from transformers import CLIPTextModel

    from library.text_encoders import clip_l_config

    from library.text_encoders import wrap_clip_text_model

    config = clip_l_config(**(tiny_clip_config_overrides() | overrides))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = wrap_clip_text_model(CLIPTextModel(config)).eval()
    return init_random_(model, seed)


def random_t5(seed: int = 0, **overrides):
    from transformers import T5EncoderModel

    from library.text_encoders import t5xxl_config

    config = t5xxl_config(**(tiny_t5_config_overrides() | overrides))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config).eval()
        # HF's T5 init is tuned for d_model 4096 (tiny outputs at width 128); widen it a little.
        init_random_(model, seed)
    return model


# ---------------------------------------------------------------------------------------------
# Writers.

def _to_file_dtype(state: dict[str, torch.Tensor], dtype: torch.dtype, fp8_only_matrices: bool = True
                   ) -> dict[str, torch.Tensor]:
    """Cast for saving. fp8 files keep 1-D tensors (norms, biases) in bf16, like published fp8 files."""
    out = {}
    for k, t in state.items():
        if dtype.itemsize == 1 and fp8_only_matrices and t.ndim < 2:
            out[k] = t.to(torch.bfloat16)
        else:
            out[k] = t.to(dtype)
    return out


def flux_state_dict(variant: str = "dev", params: FluxParams | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    params = params or tiny_flux_params(variant)
    model = build_flux_model(params, chroma=VARIANTS[variant].is_chroma, seed=seed)
    return model.state_dict()


def write_flux_dit(path: str | os.PathLike, variant: str = "dev", *, params: FluxParams | None = None, seed: int = 0,
                   dtype: torch.dtype = torch.float32, prefix: str = "") -> Path:
    state = _to_file_dtype(flux_state_dict(variant, params, seed), dtype)
    save_file_atomic({prefix + k: v for k, v in state.items()}, path)
    return Path(path)


def write_ae(path: str | os.PathLike, *, config: AutoEncoderConfig = TINY_AE_CONFIG, seed: int = 0,
             dtype: torch.dtype = torch.float32, prefix: str = "") -> Path:
    state = random_autoencoder(config, seed).state_dict()
    save_file_atomic({prefix + k: v.to(dtype) for k, v in state.items()}, path)
    return Path(path)


def write_clip_l(path: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 with_projection: bool = True) -> Path:
    state = random_clip_l(seed).state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    if with_projection:
        # Published clip_l.safetensors files carry the (unused) projection of CLIPTextModelWithProjection.
        gen = torch.Generator().manual_seed(seed + 7)
        state["text_projection.weight"] = torch.randn(TINY_CLIP_WIDTH, TINY_CLIP_WIDTH, generator=gen) / 16
    save_file_atomic({k: v.to(dtype) for k, v in state.items()}, path)
    return Path(path)


def write_t5xxl(path: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    state = random_t5(seed).state_dict()
    state.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight; files store it once
    save_file_atomic(_to_file_dtype(state, dtype), path)
    return Path(path)


@dataclass
class TinyFluxPaths:
    dit: Path
    ae: Path
    clip_l: Path | None
    t5xxl: Path
    tokenizer_cache_dir: Path
    variant: str


def write_tiny_flux_set(out_dir: str | os.PathLike, *, variant: str = "dev", seed: int = 0,
                        dtype: torch.dtype = torch.float32) -> TinyFluxPaths:
    """DiT, AE, CLIP-L (not for Chroma), T5 and a tokenizer cache dir, all tiny and offline."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dit_name = "chroma-tiny.safetensors" if variant == "chroma" else f"flux1-{variant}-tiny.safetensors"
    uses_clip = VARIANTS[variant].uses_clip
    return TinyFluxPaths(
        dit=write_flux_dit(out / dit_name, variant, seed=seed, dtype=dtype),
        ae=write_ae(out / "ae.safetensors", seed=seed + 1, dtype=dtype),
        clip_l=write_clip_l(out / "clip_l.safetensors", seed=seed + 2, dtype=dtype) if uses_clip else None,
        t5xxl=write_t5xxl(out / "t5xxl.safetensors", seed=seed + 3, dtype=dtype),
        tokenizer_cache_dir=tiny_tokenizers.write_tokenizer_cache(out / "tokenizers"),
        variant=variant,
    )


# ---------------------------------------------------------------- `python -m library.tiny flux`

def add_cli_arguments(parser) -> None:
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="dev")


def write_cli(args) -> dict[str, Path | str | None]:
    return vars(write_tiny_flux_set(args.out, variant=args.variant, seed=args.seed, dtype=args.torch_dtype))
