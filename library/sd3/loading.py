"""Detect and load SD3 / SD3.5 files (SAI layout) and the parts they may contain.

`inspect_sd3_checkpoint` reads only the safetensors header: whether the MMDiT sits behind
`model.diffusion_model.`, which variant it is (sd-scripts' rule, FORMATS 1.3), every size
(blocks from the keys, width from x_embedder, heads from the real 64-wide head, positional
grid, pooled and context widths, MLP ratio, attn2 blocks), the dtype, and which other parts the
file holds: the VAE (`first_stage_model.`) and CLIP-L / CLIP-G / T5-XXL
(`text_encoders.<name>.transformer.`). Files of other kinds are refused with a message that
says what they look like.

`load_sd3_mmdit` builds the model on the meta device and assigns the tensors read
memory-mapped (to a GPU: read straight into GPU memory), so the weights exist once.
`load_sd3_vae`, `load_sd3_clip_l`, `load_sd3_clip_g` and `load_sd3_t5xxl` take the part from a
separate file when one is given (--vae, --clip_l...), else from the checkpoint, and say clearly
when neither has it.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from library.autoencoders import SD3_VAE_SCALING, AutoEncoder, describe_checkpoint, find_ae_prefix, load_autoencoder
from library.errors import ConfigError, ModelFileError
from library.safetensors_io import read_to_gpu, tensor_shapes
from library.sd3.model import HEAD_DIM, VARIANTS, MMDiT, SD3Params, SD3Variant, variant_name

logger = logging.getLogger(__name__)

DIT_PREFIX = "model.diffusion_model."
TEXT_ENCODER_PREFIXES = {
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}
# A tensor that each text encoder always has, under its prefix.
_TEXT_ENCODER_ANCHORS = {
    "clip_l": "text_model.embeddings.token_embedding.weight",
    "clip_g": "text_model.embeddings.token_embedding.weight",
    "t5xxl": "encoder.block.0.layer.0.SelfAttention.q.weight",
}
_ANCHOR = "joint_blocks.0.x_block.attn.qkv.weight"
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass
class SD3CheckpointInfo:
    variant: SD3Variant
    params: SD3Params
    dtype: torch.dtype                    # dtype of the big weights in the file
    prefix: str                           # "model.diffusion_model." or ""
    path: Path
    vae_prefix: str | None = None         # where the VAE is inside the file, None when absent
    text_encoder_prefixes: dict[str, str] = field(default_factory=dict)   # name -> prefix, for those inside

    @property
    def has_vae(self) -> bool:
        return self.vae_prefix is not None


# ---------------------------------------------------------------------------------------------
# Inspection.

def _block_indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _refuse(path, keys, why: str | None = None) -> ModelFileError:
    if why is None:
        what = describe_checkpoint(keys) or "an unknown model (no joint_blocks.* tensors)"
        why = f"this file looks like {what}"
    return ModelFileError(f"{path}: expected an SD3 / SD3.5 checkpoint (sd3_medium.safetensors, sd3.5_large."
                          f"safetensors, ...), but {why}. Pass the SAI single-file model to "
                          "--pretrained_model_name_or_path.")


def _params_from_shapes(path, s: dict[str, tuple[int, ...]]) -> SD3Params:
    hidden, in_channels, patch, patch_w = s["x_embedder.proj.weight"]
    if patch != patch_w:
        raise _refuse(path, s, f"its patch embedding is {patch}x{patch_w}, not square")
    depth = len(_block_indices(s, r"joint_blocks\.(\d+)\."))
    qk_norm = "joint_blocks.0.context_block.attn.ln_k.weight" in s
    head_dim = s["joint_blocks.0.x_block.attn.ln_q.weight"][0] if qk_norm else HEAD_DIM
    if head_dim != HEAD_DIM or hidden % HEAD_DIM:
        raise ModelFileError(f"{path}: attention head size {head_dim} with width {hidden}; SD3 models use "
                             f"{HEAD_DIM}-wide heads. This file is not an SD3-family model we can load.")
    n_pos = s["pos_embed"][1]
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise _refuse(path, s, f"its pos_embed has {n_pos} positions, not a square grid")
    last = depth - 1
    if f"joint_blocks.{last}.context_block.mlp.fc1.weight" in s:
        raise _refuse(path, s, f"its last block ({last}) has a full context stream; SD3's last context block "
                               "is pre-only (the file is truncated or of another model)")
    return SD3Params(
        in_channels=in_channels,
        patch_size=patch,
        depth=depth,
        hidden_size=hidden,
        num_heads=hidden // HEAD_DIM,
        mlp_ratio=s["joint_blocks.0.x_block.mlp.fc1.weight"][0] / hidden,
        adm_in_channels=s["y_embedder.mlp.0.weight"][1],
        context_in_features=s["context_embedder.weight"][1],
        pos_embed_max_size=grid,
        qk_norm=qk_norm,
        x_block_self_attn_layers=tuple(_block_indices(s, r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight$")),
        qkv_bias="joint_blocks.0.x_block.attn.qkv.bias" in s,
    )


def _torch_dtype(name: str, path) -> torch.dtype:
    try:
        return _SAFETENSORS_DTYPES[name]
    except KeyError:
        raise ModelFileError(f"{path}: tensors of dtype {name} are not supported (quantized file?). Use a "
                             "bf16, fp16 or fp32 file.") from None


def inspect_sd3_checkpoint(path: str | os.PathLike) -> SD3CheckpointInfo:
    """What an SD3-family file is and what it contains, from its header alone."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder; SD3 training takes the single-file checkpoint (e.g. "
                             "sd3.5_large.safetensors), not a diffusers folder.")
    raw = tensor_shapes(path)
    if DIT_PREFIX + _ANCHOR in raw:
        prefix = DIT_PREFIX
    elif _ANCHOR in raw:
        prefix = ""
    else:
        raise _refuse(path, raw)
    shapes = {k[len(prefix):]: shape for k, (shape, _) in raw.items() if k.startswith(prefix)}
    params = _params_from_shapes(path, shapes)
    variant = VARIANTS[variant_name(params.qk_norm, bool(params.x_block_self_attn_layers))]
    text_encoders = {name: p for name, p in TEXT_ENCODER_PREFIXES.items() if p + _TEXT_ENCODER_ANCHORS[name] in raw}
    return SD3CheckpointInfo(
        variant=variant, params=params, dtype=_torch_dtype(raw[prefix + _ANCHOR][1], path), prefix=prefix,
        path=path, vae_prefix=find_ae_prefix(raw), text_encoder_prefixes=text_encoders,
    )


# ---------------------------------------------------------------------------------------------
# Loading.

def _target_dtype(t: torch.Tensor, requested: torch.dtype | None) -> torch.dtype:
    """None keeps the file dtype (an fp8 file is widened to bf16: it cannot be computed with)."""
    if requested is None:
        return torch.bfloat16 if t.dtype in _FP8_DTYPES else t.dtype
    return requested


def load_sd3_mmdit(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> tuple[MMDiT, SD3CheckpointInfo]:
    """The MMDiT of an SD3 / SD3.5 file, in eval mode with requires_grad off. dtype None keeps
    the file's (fp8 widened to bf16); any float dtype casts everything. fp8 storage is not
    offered for SD3 yet."""
    if dtype is not None and dtype in _FP8_DTYPES:
        raise ConfigError("fp8 base weights are not supported for SD3 yet; load in bf16/fp16 (drop --fp8_base).")
    info = inspect_sd3_checkpoint(path)
    with torch.device("meta"):
        model = MMDiT(info.params)
    wanted = list(model.state_dict())
    with safe_open(str(info.path), framework="pt", device="cpu") as f:
        present = set(f.keys())
        missing = [info.prefix + k for k in wanted if info.prefix + k not in present]
        if missing:
            raise ModelFileError(f"{path}: {len(missing)} MMDiT tensors are missing, e.g. {missing[:3]}. The file "
                                 "is incomplete or a different variant; re-download it.")
        # To a GPU: the tensors the model needs, read straight into GPU memory at once
        on_gpu = read_to_gpu(dict.fromkeys(present, info.path), [info.prefix + k for k in wanted], device)
        state = {}
        for key in wanted:
            full = info.prefix + key
            t = on_gpu.pop(full) if full in on_gpu else f.get_tensor(full)   # popped: a cast copy replaces it
            state[key] = t.to(device=device, dtype=_target_dtype(t, dtype))
    own = {k for k in present if k.startswith(info.prefix)} if info.prefix else \
        {k for k in present if not k.startswith(("first_stage_model.", "text_encoders."))}
    extra = {k[len(info.prefix):] for k in own} - set(wanted)
    if extra:
        logger.warning("%s: ignoring %d MMDiT tensors the model does not use, e.g. %s", path, len(extra),
                       sorted(extra)[:3])
    model.load_state_dict(state, assign=True, strict=True)
    logger.info("%s: %s, %d blocks, width %d, positional grid %d", Path(path).name, info.variant.label,
                info.params.depth, info.params.hidden_size, info.params.pos_embed_max_size)
    return model.eval().requires_grad_(False), info


def load_sd3_vae(checkpoint: str | os.PathLike | None, vae_path: str | os.PathLike | None = None, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> AutoEncoder:
    """The SD3 VAE (16 channels, scale 1.5305, shift 0.0609) from --vae when given, else from
    the checkpoint's `first_stage_model.` tensors."""
    if vae_path is not None:
        return load_autoencoder(vae_path, SD3_VAE_SCALING, device=device, dtype=dtype)
    if checkpoint is None or find_ae_prefix(tensor_shapes(checkpoint)) is None:
        raise ModelFileError(f"{checkpoint}: this SD3 checkpoint has no VAE inside (first_stage_model.*); pass the "
                             "VAE file with --vae.")
    return load_autoencoder(checkpoint, SD3_VAE_SCALING, device=device, dtype=dtype)


def _text_encoder_source(name: str, option: str, checkpoint, separate) -> tuple[str | os.PathLike, str | None]:
    """(file, prefix) of a text encoder: the separate file wins; else the checkpoint's copy."""
    if separate is not None:
        return separate, None
    if checkpoint is not None:
        prefix = TEXT_ENCODER_PREFIXES[name]
        if prefix + _TEXT_ENCODER_ANCHORS[name] in tensor_shapes(checkpoint):
            return checkpoint, prefix
    raise ModelFileError(f"{checkpoint}: the checkpoint has no {name} inside (text_encoders.{name}.*); pass the "
                         f"file with {option} (e.g. {name}.safetensors).")


def load_sd3_clip_l(checkpoint=None, clip_l_path=None, *, device="cpu", dtype=None) -> nn.Module:
    from library.text_encoders import load_clip_l_with_projection

    source, prefix = _text_encoder_source("clip_l", "--clip_l", checkpoint, clip_l_path)
    return load_clip_l_with_projection(source, device=device, dtype=dtype, prefix=prefix)


def load_sd3_clip_g(checkpoint=None, clip_g_path=None, *, device="cpu", dtype=None) -> nn.Module:
    from library.text_encoders import load_clip_g

    source, prefix = _text_encoder_source("clip_g", "--clip_g", checkpoint, clip_g_path)
    return load_clip_g(source, device=device, dtype=dtype, prefix=prefix)


def load_sd3_t5xxl(checkpoint=None, t5xxl_path=None, *, device="cpu", dtype=None, fp8_storage: bool = False,
                   required: bool = True) -> nn.Module | None:
    """T5-XXL from --t5xxl or the checkpoint. With required=False a missing T5 gives None
    (SD3 then conditions on zeros in its place)."""
    from library.text_encoders import load_t5xxl

    try:
        source, prefix = _text_encoder_source("t5xxl", "--t5xxl", checkpoint, t5xxl_path)
    except ModelFileError:
        if required:
            raise
        return None
    return load_t5xxl(source, device=device, dtype=dtype, fp8_storage=fp8_storage, prefix=prefix)
