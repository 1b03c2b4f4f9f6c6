"""tiny Anima set (DiT with LLM adapter, Qwen3, Qwen-Image VAE, Qwen3 and T5 tokenizers)

Tiny random Anima checkpoints in the exact real key layouts: the DiT with its LLM adapter in
ComfyUI's `net.` layout (as Anima ships it) or without the prefix, the adapter alone (for
--llm_adapter_path), Qwen3 as a single file (`model.` keys), and the VAE in the ComfyUI / Wan
layout or the diffusers layout. Tiny sizes keep the real head sizes (DiT 128, adapter 64,
Qwen3 128) so the loaders' size inference runs exactly as on real files.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from library.anima.llm_adapter import LLMAdapterParams
from library.anima.loading import COMFY_PREFIX
from library.anima.model import ANIMA_PARAMS, Anima, AnimaParams
from library.anima.vae import QwenImageVAEConfig, to_wan
from library.safetensors_io import save_file_atomic
from library.tiny import tokenizers as tiny_tokenizers
from library.tiny.flux import init_random_

TINY_QWEN3_WIDTH = 256      # 2 heads of 128 (1 KV head)
TINY_CONTEXT_WIDTH = 128    # adapter width = the DiT's cross-attention input (real: 1024)
TINY_VAE_CONFIG = QwenImageVAEConfig(base_dim=16)


def tiny_adapter_params() -> LLMAdapterParams:
    vocab = 64 * math.ceil(tiny_tokenizers.t5_vocab_size() / 64)  # like 32128 rows for 32100 ids
    return LLMAdapterParams(source_dim=TINY_QWEN3_WIDTH, target_dim=TINY_CONTEXT_WIDTH, model_dim=TINY_CONTEXT_WIDTH,
                            num_layers=2, num_heads=TINY_CONTEXT_WIDTH // 64, mlp_hidden=4 * TINY_CONTEXT_WIDTH,
                            vocab_size=vocab)


def tiny_anima_params(num_blocks: int = 2) -> AnimaParams:
    """Real layout, tiny sizes: width 256 = 2 heads of 128, AdaLN-LoRA 64."""
    return replace(ANIMA_PARAMS, model_channels=256, num_heads=2, num_blocks=num_blocks, adaln_lora_dim=64,
                   crossattn_emb_channels=TINY_CONTEXT_WIDTH, llm_adapter=tiny_adapter_params())


def tiny_qwen3_config_overrides() -> dict:
    vocab = 64 * math.ceil(tiny_tokenizers.qwen3_vocab_size() / 64)
    specials = tiny_tokenizers._qwen3_vocab_and_merges()[0]
    return dict(vocab_size=vocab, bos_token_id=specials["<|endoftext|>"], eos_token_id=specials["<|im_end|>"],
                hidden_size=TINY_QWEN3_WIDTH, head_dim=128, num_attention_heads=2,
                num_key_value_heads=1, num_hidden_layers=2, max_window_layers=2, intermediate_size=512)


# ---------------------------------------------------------------------------------------------
# Random models.

def build_anima_model(params: AnimaParams, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      seed: int = 0) -> Anima:
    """Random weights allocated directly on `device` (also used by full-size GPU benchmarks)."""
    with torch.device("meta"):
        model = Anima(params)
    model = model.to(dtype=dtype).to_empty(device=device)
    return init_random_(model, seed)


def random_qwen3(seed: int = 0, **overrides):
    from transformers import Qwen3Config, Qwen3Model

    from library.text_encoders import bundled_config

    base = {k: v for k, v in bundled_config("qwen3_06b").items() if k not in ("architectures", "torch_dtype")}
    config = Qwen3Config(**(base | tiny_qwen3_config_overrides() | overrides))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3Model(config).eval()
    return init_random_(model, seed)


def random_vae(config: QwenImageVAEConfig = TINY_VAE_CONFIG, seed: int = 0) -> nn.Module:
    """diffusers' AutoencoderKLQwenImage with random weights (diffusers layout)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = config.build().eval()
    return init_random_(model, seed)


# ---------------------------------------------------------------------------------------------
# Writers.

def anima_state_dict(params: AnimaParams | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    return build_anima_model(params or tiny_anima_params(), seed=seed).state_dict()


def write_anima_dit(path: str | os.PathLike, *, params: AnimaParams | None = None, seed: int = 0,
                    dtype: torch.dtype = torch.float32, prefix: str = COMFY_PREFIX, with_adapter: bool = True) -> Path:
    state = anima_state_dict(params, seed)
    if not with_adapter:
        state = {k: v for k, v in state.items() if not k.startswith("llm_adapter.")}
    save_file_atomic({prefix + k: v.to(dtype) for k, v in state.items()}, path)
    return Path(path)


def write_llm_adapter(path: str | os.PathLike, *, params: AnimaParams | None = None, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> Path:
    """The adapter alone, keys without prefix (`embed.weight`, `blocks.0...`), for --llm_adapter_path."""
    state = anima_state_dict(params, seed)
    adapter = {k[len("llm_adapter."):]: v.to(dtype) for k, v in state.items() if k.startswith("llm_adapter.")}
    save_file_atomic(adapter, path)
    return Path(path)


def write_qwen3(path: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Single file with `model.` keys, as ComfyUI's qwen_3_06b_base.safetensors."""
    state = random_qwen3(seed).state_dict()
    save_file_atomic({f"model.{k}": v.to(dtype) for k, v in state.items()}, path)
    return Path(path)


def write_vae(path: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype = torch.float32,
              layout: str = "wan", config: QwenImageVAEConfig = TINY_VAE_CONFIG) -> Path:
    """layout "wan" (ComfyUI / original, as Anima ships it) or "diffusers"."""
    state = random_vae(config, seed).state_dict()
    if layout == "wan":
        state = to_wan(state, config)
    elif layout != "diffusers":
        raise ValueError(f"unknown VAE layout {layout!r}; use 'wan' or 'diffusers'")
    save_file_atomic({k: v.to(dtype) for k, v in state.items()}, path)
    return Path(path)


@dataclass
class TinyAnimaPaths:
    dit: Path
    llm_adapter: Path
    qwen3: Path
    vae: Path
    tokenizer_cache_dir: Path
    t5_tokenizer: Path


def write_tiny_anima_set(out_dir: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                         num_blocks: int = 2, prefix: str = COMFY_PREFIX) -> TinyAnimaPaths:
    """DiT (+adapter), the adapter alone, Qwen3, VAE and a tokenizer cache dir, all tiny and offline."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = tiny_anima_params(num_blocks)
    cache = tiny_tokenizers.write_anima_tokenizer_cache(out / "tokenizers")
    return TinyAnimaPaths(
        dit=write_anima_dit(out / "anima-tiny.safetensors", params=params, seed=seed, dtype=dtype, prefix=prefix),
        llm_adapter=write_llm_adapter(out / "llm_adapter-tiny.safetensors", params=params, seed=seed, dtype=dtype),
        qwen3=write_qwen3(out / "qwen_3_06b-tiny.safetensors", seed=seed + 1, dtype=dtype),
        vae=write_vae(out / "qwen_image_vae-tiny.safetensors", seed=seed + 2, dtype=dtype),
        tokenizer_cache_dir=cache,
        t5_tokenizer=cache / tiny_tokenizers.cache_folder_name(tiny_tokenizers.T5_TOKENIZER_ID),
    )


# ---------------------------------------------------------------- `python -m library.tiny anima`

def add_cli_arguments(parser) -> None:
    parser.add_argument("--num_blocks", type=int, default=2, help="DiT depth (the real models have 20, 28 or 36)")
    parser.add_argument("--no_net_prefix", action="store_true",
                        help="write DiT keys without ComfyUI's `net.` prefix")


def write_cli(args) -> dict[str, Path | str | None]:
    paths = write_tiny_anima_set(args.out, seed=args.seed, dtype=args.torch_dtype, num_blocks=args.num_blocks,
                                 prefix="" if args.no_net_prefix else COMFY_PREFIX)
    return vars(paths)
