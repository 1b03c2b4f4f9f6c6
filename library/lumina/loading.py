"""Detect and load Lumina Image 2.0 DiT files.

Two published layouts, same key names: `lumina-image-2.safetensors` (Alpha-VLLM names, no
prefix, full precision) and Comfy-Org's `lumina_2_model_bf16.safetensors` (every key behind
`model.diffusion_model.`; the all-in-one `lumina_2.safetensors` adds `vae.` and
`text_encoders.` tensors, which are skipped here). `inspect_lumina_checkpoint` reads only the
header: prefix, sizes (width, depth, refiners, heads from the q-norm width, KV heads from the
qkv height, FFN width, caption width) and dtype; files of other families are refused naming
what they look like.

`load_lumina_dit` builds the model on the meta device and assigns the tensors read
memory-mapped, one at a time (to a GPU: read straight into GPU memory), so the weights exist
once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from library.autoencoders import describe_checkpoint
from library.errors import ConfigError, ModelFileError
from library.flux.loading import _FP8_DTYPES, _count, _target_dtype, _torch_dtype
from library.lumina.model import VARIANTS, LuminaParams, NextDiT
from library.safetensors_io import read_to_gpu, tensor_shapes

logger = logging.getLogger(__name__)

COMFY_PREFIX = "model.diffusion_model."
REAL_HEAD_DIM = 96          # Lumina 2: 24 heads of 96 (RoPE axes 32 + 32 + 32)
PATCH_SIZE = 2
_ANCHOR = "cap_embedder.0.weight"
_DIFFUSERS_ANCHOR = "time_caption_embed.caption_embedder.0.weight"
# Never used by the forward; a file without it still loads (the norm gets its initial ones).
_OPTIONAL_KEYS = ("norm_final.weight",)


@dataclass
class LuminaCheckpointInfo:
    variant: str                 # key of library.lumina.model.VARIANTS
    params: LuminaParams
    dtype: torch.dtype           # dtype of the big weights in the file
    prefix: str                  # stripped from every key ("" or "model.diffusion_model.")
    path: Path


def _expected_file_message(path, what: str) -> str:
    return (f"{path}: expected a Lumina Image 2.0 DiT (lumina-image-2.safetensors or "
            f"lumina_2_model_bf16.safetensors), but this file looks like {what}. Pass the DiT file to "
            "--pretrained_model_name_or_path.")


def _params_from_shapes(path, s: dict[str, tuple[int, ...]]) -> LuminaParams:
    def shape(key: str) -> tuple[int, ...]:
        if key not in s:
            raise ModelFileError(f"{path}: tensor {key} is missing. The file is incomplete or not a Lumina Image 2.0 "
                                 "DiT; re-download it.")
        return s[key]

    dim, cap_feat_dim = shape("cap_embedder.1.weight")
    head_dim = shape("layers.0.attention.q_norm.weight")[0]
    if head_dim != REAL_HEAD_DIM:
        raise ModelFileError(f"{path}: attention head size {head_dim}; Lumina Image 2.0 uses {REAL_HEAD_DIM} (RoPE "
                             "axes 32+32+32). This is another Next-DiT (e.g. Lumina-Next), which is not supported.")
    n_heads = dim // head_dim
    qkv_rows = shape("layers.0.attention.qkv.weight")[0]
    n_kv_heads = (qkv_rows // head_dim - n_heads) // 2
    patch_features = shape("x_embedder.weight")[1]
    n_refiners = _count(s, r"noise_refiner\.(\d+)\.")
    n_context_refiners = _count(s, r"context_refiner\.(\d+)\.")
    if n_context_refiners != n_refiners:
        raise ModelFileError(f"{path}: {n_refiners} noise refiners but {n_context_refiners} context refiners; "
                             "Lumina Image 2.0 has as many of each. The file is damaged.")
    if patch_features % (PATCH_SIZE * PATCH_SIZE) or n_kv_heads < 1:
        raise ModelFileError(f"{path}: x_embedder takes {patch_features} features and qkv has {qkv_rows} rows; "
                             "this is not the Lumina Image 2.0 layout.")
    params = LuminaParams(
        patch_size=PATCH_SIZE,
        in_channels=patch_features // (PATCH_SIZE * PATCH_SIZE),
        dim=dim,
        n_layers=_count(s, r"layers\.(\d+)\."),
        n_refiner_layers=n_refiners,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        ffn_hidden_dim=shape("layers.0.feed_forward.w1.weight")[0],
        cap_feat_dim=cap_feat_dim,
    )
    t_width = shape("t_embedder.mlp.0.weight")[0]
    if t_width != params.adaln_dim:
        raise ModelFileError(f"{path}: timestep embedding of width {t_width}; a Lumina DiT of width {dim} has "
                             f"{params.adaln_dim}. The file is not the Lumina Image 2.0 layout.")
    return params


def inspect_lumina_checkpoint(path: str | os.PathLike) -> LuminaCheckpointInfo:
    """What a Lumina Image 2.0 file is, from its header alone."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path}: a folder. Pass the single DiT file (lumina-image-2.safetensors or "
                             "lumina_2_model_bf16.safetensors); diffusers folders are not supported.")
    raw = tensor_shapes(path)
    keys = set(raw)
    if COMFY_PREFIX + _ANCHOR in keys:
        prefix = COMFY_PREFIX
    elif _ANCHOR in keys:
        prefix = ""
    elif any(k.endswith(_DIFFUSERS_ANCHOR) for k in keys):
        raise ModelFileError(f"{path}: a Lumina 2 transformer in the diffusers layout. Pass the single-file version "
                             "(lumina-image-2.safetensors or lumina_2_model_bf16.safetensors) instead.")
    else:
        raise ModelFileError(_expected_file_message(path, describe_checkpoint(keys) or "an unknown model"))
    shapes = {k[len(prefix):]: shape for k, (shape, _) in raw.items() if k.startswith(prefix)}
    params = _params_from_shapes(path, shapes)
    return LuminaCheckpointInfo(variant="lumina2", params=params,
                                dtype=_torch_dtype(raw[prefix + "layers.0.attention.qkv.weight"][1], path),
                                prefix=prefix, path=path)


def load_lumina_dit(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[NextDiT, LuminaCheckpointInfo]:
    """Load a Lumina Image 2.0 DiT.

    dtype None keeps the file dtype (an fp8 file is widened to bf16); torch.float8_e4m3fn keeps
    or casts the matrices to fp8 storage (1-D tensors in bf16); any other dtype casts
    everything. The model comes back in eval mode with requires_grad off."""
    if dtype is not None and dtype in _FP8_DTYPES and dtype != torch.float8_e4m3fn:
        raise ConfigError(f"fp8 storage supports float8_e4m3fn only, not {dtype}.")
    info = inspect_lumina_checkpoint(path)
    with torch.device("meta"):
        model = NextDiT(info.params)
    wanted = list(model.state_dict())

    state = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        available = set(f.keys())
        # To a GPU: the tensors the model needs, read straight into GPU memory at once
        on_gpu = read_to_gpu(dict.fromkeys(available, path), [info.prefix + k for k in wanted], device)
        for key in wanted:
            full = info.prefix + key
            if full not in available:
                if key in _OPTIONAL_KEYS:
                    state[key] = torch.ones(model.get_parameter(key).shape, device=device,
                                            dtype=torch.bfloat16 if dtype in _FP8_DTYPES else (dtype or info.dtype))
                    continue
                raise ModelFileError(f"{path}: tensor {full} is missing. The file is incomplete or a different "
                                     "variant; re-download it.")
            t = on_gpu.pop(full) if full in on_gpu else f.get_tensor(full)   # popped: a cast copy replaces it
            state[key] = t.to(device=device, dtype=_target_dtype(key, t, dtype, path))
        extra = {k[len(info.prefix):] for k in available if k.startswith(info.prefix)} - set(wanted)
    if extra:
        logger.warning("%s: ignoring %d tensors the model does not use, e.g. %s", path, len(extra), sorted(extra)[:3])
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval().requires_grad_(False), info


def describe_variant(info: LuminaCheckpointInfo) -> str:
    p = info.params
    return (f"Lumina Image 2.0 ({VARIANTS[info.variant].name}): width {p.dim}, {p.n_layers} layers, "
            f"{p.n_refiner_layers}+{p.n_refiner_layers} refiners, {p.n_heads} heads / {p.n_kv_heads} KV heads, "
            f"{info.dtype}")
