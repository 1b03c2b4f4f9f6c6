"""Anima's own command-line options (model files, text lengths, attention, VAE memory), declared
once here for anima_train_network.py and the inference script, with their checks."""

from __future__ import annotations

import argparse

from torch import nn

from library.anima.text import DEFAULT_QWEN3_MAX_LENGTH, DEFAULT_T5_MAX_LENGTH
from library.attention import (ATTN_MODE_BACKENDS, INFERENCE_ONLY_BACKENDS, backend_for_attn_mode,
                               set_attention_backend)
from library.errors import ConfigError


def add_anima_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Anima")
    g.add_argument("--qwen3", type=str, default=None,
                   help="Qwen3-0.6B text encoder: a Hugging Face model folder or a single .safetensors file "
                        "(config bundled in configs/qwen3_06b/); always frozen")
    g.add_argument("--vae", type=str, default=None, help="Qwen-Image VAE, .safetensors or .pth (ComfyUI or diffusers "
                                                         "layout)")
    g.add_argument("--llm_adapter_path", type=str, default=None,
                   help="LLM adapter weights in a separate file (default: the adapter inside the DiT file)")
    g.add_argument("--t5_tokenizer_path", type=str, default=None,
                   help="folder with the T5 tokenizer files (default: google/t5-v1_1-xxl from --tokenizer_cache_dir "
                        "or the hub); only the tokenizer is used, never T5 itself")
    g.add_argument("--qwen3_max_token_length", type=int, default=DEFAULT_QWEN3_MAX_LENGTH,
                   help="Qwen3 tokens per caption (padded / truncated)")
    g.add_argument("--t5_max_token_length", type=int, default=DEFAULT_T5_MAX_LENGTH,
                   help="T5 tokens per caption for the LLM adapter (padded / truncated)")
    g.add_argument("--attn_mode", type=str, default="torch", choices=list(ATTN_MODE_BACKENDS),
                   help="attention kernel of the DiT: torch (SDPA), flash, xformers (needs --split_attn), "
                        "sageattn (inference only)")
    g.add_argument("--split_attn", action="store_true",
                   help="compute attention one sample at a time (less memory, same result)")
    g.add_argument("--vae_chunk_size", type=int, default=None,
                   help="run the VAE's convolutions on bands of this many rows (less memory, same result)")
    g.add_argument("--vae_disable_cache", action="store_true",
                   help="do not keep the VAE's frame cache (less memory; images are single frames, so the result "
                        "is the same)")


def check_anima_arguments(args: argparse.Namespace, *, training: bool) -> None:
    """Every problem at once, before any model is loaded."""
    problems = []
    for name in ("qwen3", "vae"):
        if not getattr(args, name, None):
            problems.append(f"--{name} is required")
    for name in ("qwen3_max_token_length", "t5_max_token_length"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be at least 1")
    if args.vae_chunk_size is not None and args.vae_chunk_size < 1:
        problems.append("--vae_chunk_size must be a positive number of rows (e.g. 64)")
    if args.attn_mode == "xformers" and not args.split_attn:
        problems.append("--attn_mode xformers needs --split_attn")
    if training and backend_for_attn_mode(args.attn_mode) in INFERENCE_ONLY_BACKENDS:
        problems.append(f"--attn_mode {args.attn_mode} has no backward pass and cannot train; use torch, flash or "
                        "xformers (sageattn works for sampling and inference)")
    if problems:
        raise ConfigError("invalid Anima options:\n  " + "\n  ".join(problems))


def apply_attention_options(args: argparse.Namespace, model: nn.Module) -> None:
    """Select the kernel (an error when its package is missing) and --split_attn on the DiT."""
    set_attention_backend(backend_for_attn_mode(args.attn_mode))
    model.set_split_attn(bool(args.split_attn))
