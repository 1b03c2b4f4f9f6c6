"""Detect and load Stable Diffusion 1.x / 2.x checkpoints.

Three kinds of input:
- an ldm single file (`.safetensors`; `.ckpt`/`.pt` only through torch.load(weights_only=True)):
  UNet under `model.diffusion_model.`, VAE under `first_stage_model.`, and the text encoder under
  `cond_stage_model.transformer.` (SD 1.x: CLIP ViT-L in the transformers layout, with or without
  the `text_model.` level) or `cond_stage_model.model.` (SD 2.x: OpenCLIP ViT-H);
- a diffusers folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, model_index.json);
- for --vae: an ldm VAE file (no prefix, `first_stage_model.` or `vae.`), a diffusers-layout VAE
  file, or a diffusers VAE folder.

The networks are diffusers' UNet2DConditionModel and AutoencoderKL and transformers'
CLIPTextModel. For single files every size is read from the tensor shapes (channels, channel
multipliers, depths, attention levels, context width, text width and depth) with the real
models' head rules (SD 1.x: 8 heads per attention; SD 2.x and CLIP: 64-wide heads), so any
file in the real layout loads, whatever its size; the weights are converted with diffusers'
ldm converters (`diffusers.loaders.single_file_utils`). The SD 2.x OpenCLIP tower is built with
one layer less than the file holds (its last layer is never used: SD 2.x reads the penultimate
layer), as diffusers and sd-scripts do.

SD 1.x vs 2.x is read from the file (OpenCLIP text encoder / linear transformer projections); a
`--v2` that disagrees with the file is an error naming what the file is. SDXL, SD3, FLUX and the
other families, inpainting and other non-4-channel UNets are refused with a message that says
what the file is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from library.autoencoders import SD_VAE_SCALING, AutoEncoderConfig, describe_checkpoint, find_ae_prefix
from library.errors import ConfigError, ModelFileError
from library.safetensors_io import load_file, tensor_shapes

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."      # SD 1.x: transformers CLIP
OPEN_CLIP_PREFIX = "cond_stage_model.model."       # SD 2.x: OpenCLIP
V1_NUM_HEADS = 8          # SD 1.x attention: 8 heads whatever the width
V2_HEAD_DIM = 64          # SD 2.x attention: 64-wide heads
CLIP_HEAD_DIM = 64        # CLIP ViT-L and OpenCLIP ViT-H text towers
NORM_GROUPS = 32          # GroupNorm groups of the SD UNet and VAE
VAE_SCALE_FACTOR = SD_VAE_SCALING.scale_factor     # 0.18215

_TORCH_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_UNET_ANCHOR = "input_blocks.0.0.weight"


@dataclass(frozen=True)
class SDCheckpointInfo:
    """What a checkpoint is, from its tensor names and shapes (or a diffusers folder's configs)."""

    path: Path
    layout: str                       # "ldm" (single file) or "diffusers" (folder)
    v2: bool
    unet_config: dict                 # diffusers UNet2DConditionModel config
    text_width: int                   # the UNet's context width (768 SD 1.x, 1024 SD 2.x at full size)
    has_vae: bool = True

    @property
    def label(self) -> str:
        return "SD 2.x" if self.v2 else "SD 1.x"


@dataclass
class SDComponents:
    """The three frozen networks of a checkpoint. `text_encoder` has the file's module paths
    (`text_model.encoder.layers...`) on every transformers version (library.text_encoders)."""

    unet: nn.Module                   # diffusers UNet2DConditionModel
    vae: nn.Module                    # diffusers AutoencoderKL (scaling_factor 0.18215)
    text_encoder: nn.Module
    info: SDCheckpointInfo
    tokenizer_dir: Path | None = None  # a diffusers folder's tokenizer/, when it has one


# ---------------------------------------------------------------------------------------------
# Reading files.

def _require_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise ModelFileError(f"{path}: file not found. Check the path you passed as {what}.")


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a single file: safetensors memory-mapped; .ckpt/.pt/.pth/.bin only through
    torch.load(weights_only=True) (no code is ever unpickled), unwrapping a `state_dict` entry."""
    path = Path(path)
    _require_exists(path, "the model")
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix not in _TORCH_PICKLE_SUFFIXES:
        raise ModelFileError(f"{path}: unknown file type {path.suffix!r}; give a .safetensors file (or .ckpt), or a "
                             "diffusers folder.")
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:   # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a pickle it will not load safely
        raise ModelFileError(
            f"{path}: cannot be read safely with torch.load(weights_only=True) ({type(e).__name__}: {e}). It may "
            "hold Python objects besides tensors; convert it to .safetensors (any checkpoint converter does) and "
            "pass that.") from e
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise ModelFileError(f"{path}: not a checkpoint (expected a dict of tensors, got {type(data).__name__}).")
    return {k: v for k, v in data.items() if isinstance(v, Tensor)}


def _shapes(keys_and_shapes: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    out = {}
    for k, v in keys_and_shapes.items():
        out[k] = tuple(v.shape) if isinstance(v, Tensor) else tuple(v[0])
    return out


def _sub(shapes: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


# ---------------------------------------------------------------------------------------------
# What is this file?

def _refuse_single_file(path: Path, shapes: Mapping[str, tuple]) -> None:
    keys = list(shapes)
    if any(k.startswith("conditioner.embedders.") for k in keys) or f"{UNET_PREFIX}label_emb.0.0.weight" in shapes:
        raise ModelFileError(f"{path}: this is an SDXL checkpoint (conditioner.embedders / label_emb). train_network.py "
                             "trains SD 1.x and 2.x only; SDXL needs sdxl_train_network.py, which this suite does not "
                             "have yet.")
    if UNET_PREFIX + _UNET_ANCHOR not in shapes:
        if _UNET_ANCHOR in shapes and "out.2.weight" in shapes:
            raise ModelFileError(f"{path}: holds a bare SD UNet (no model.diffusion_model. prefix, no VAE or text "
                                 "encoder). Pass the full checkpoint (UNet + VAE + text encoder) or a diffusers folder.")
        what = describe_checkpoint(keys) or "an unknown kind of file"
        raise ModelFileError(f"{path}: expected an SD 1.x/2.x checkpoint (model.diffusion_model.input_blocks...), but "
                             f"this file looks like {what}. Use the training script of that model family.")
    in_channels = shapes[UNET_PREFIX + _UNET_ANCHOR][1]
    if in_channels != 4:
        kind = "an inpainting model (9 input channels)" if in_channels == 9 else \
            f"a UNet with {in_channels} input channels (an upscaler, depth or instruct model)"
        raise ModelFileError(f"{path}: this is {kind}; LoRA training here needs a text-to-image SD 1.x/2.x model "
                             "with 4 latent input channels.")


def _detect_v2_ldm(shapes: Mapping[str, tuple]) -> bool:
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in shapes):
        return True
    if any(k.startswith(CLIP_PREFIX) for k in shapes):
        return False
    proj = [s for k, s in shapes.items() if k.startswith(UNET_PREFIX) and k.endswith(".proj_in.weight")]
    return bool(proj) and len(proj[0]) == 2


def _check_v2(info: SDCheckpointInfo, v2: bool | None) -> None:
    if v2 is None or v2 == info.v2:
        return
    if info.v2:
        raise ConfigError(f"{info.path}: this is an SD 2.x model (OpenCLIP text encoder, {info.text_width}-wide "
                          "context): add --v2 (and --v_parameterization for a 768-v model such as SD 2.0/2.1 768).")
    raise ConfigError(f"{info.path}: this is an SD 1.x model (CLIP ViT-L text encoder), but --v2 was given: remove "
                      "--v2 (and --v_parameterization unless the model was trained for v-prediction).")


def inspect_sd_checkpoint(path: str | os.PathLike, *, v2: bool | None = None,
                          shapes: Mapping[str, Any] | None = None) -> SDCheckpointInfo:
    """Detect what a checkpoint is from its header (safetensors), its tensors (`shapes`, e.g. of
    a loaded .ckpt) or its configs (diffusers folder). `v2` is the user's --v2: a mismatch with
    the file is a ConfigError."""
    path = Path(path)
    _require_exists(path, "--pretrained_model_name_or_path")
    if path.is_dir():
        info = _inspect_diffusers_folder(path)
    else:
        if shapes is None:
            if path.suffix != ".safetensors":
                shapes = read_state_dict(path)
            else:
                shapes = tensor_shapes(path)
        shapes = _shapes(shapes)
        _refuse_single_file(path, shapes)
        is_v2 = _detect_v2_ldm(shapes)
        config = unet_config_from_ldm(_sub(shapes, UNET_PREFIX), v2=is_v2, source=path)
        info = SDCheckpointInfo(path=path, layout="ldm", v2=is_v2, unet_config=config,
                                text_width=config["cross_attention_dim"],
                                has_vae=find_ae_prefix(shapes) == VAE_PREFIX)
    _check_v2(info, v2)
    return info


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: cannot read this config ({e}). The diffusers folder is incomplete.") from e


def _inspect_diffusers_folder(path: Path) -> SDCheckpointInfo:
    index = path / "model_index.json"
    if index.is_file():
        pipeline = str(_read_json(index).get("_class_name", ""))
        if any(name in pipeline for name in ("XL", "StableDiffusion3", "Flux", "Chroma", "Lumina", "Cosmos",
                                              "Anima", "PixArt", "Kandinsky")):
            raise ModelFileError(f"{path}: a diffusers folder of a {pipeline}; train_network.py trains SD 1.x/2.x only. "
                                 "Use the training script of that model family.")
    unet_cfg = path / "unet" / "config.json"
    if not unet_cfg.is_file():
        raise ModelFileError(f"{path}: a folder, but not a diffusers SD model (no unet/config.json). Pass a diffusers "
                             "folder (unet/, vae/, text_encoder/, tokenizer/) or a single .safetensors file.")
    config = _read_json(unet_cfg)
    if config.get("addition_embed_type") == "text_time":
        raise ModelFileError(f"{path}: an SDXL diffusers folder; train_network.py trains SD 1.x/2.x only.")
    if config.get("in_channels", 4) != 4:
        raise ModelFileError(f"{path}: the UNet has {config['in_channels']} input channels (inpainting or another "
                             "special model); LoRA training here needs a text-to-image model with 4.")
    te_cfg = path / "text_encoder" / "config.json"
    if not te_cfg.is_file():
        raise ModelFileError(f"{path}: the diffusers folder has no text_encoder/config.json; it is incomplete.")
    te = _read_json(te_cfg)
    is_v2 = te.get("hidden_act") == "gelu"     # OpenCLIP ViT-H (SD 2.x); CLIP ViT-L uses quick_gelu
    context = config.get("cross_attention_dim", 768)
    return SDCheckpointInfo(path=path, layout="diffusers", v2=is_v2, unet_config=config,
                            text_width=context if isinstance(context, int) else context[0],
                            has_vae=(path / "vae" / "config.json").is_file())


# ---------------------------------------------------------------------------------------------
# ldm shapes -> diffusers configs.

def unet_config_from_ldm(shapes: Mapping[str, tuple], *, v2: bool, source: Path | str = "the file") -> dict:
    """The diffusers UNet2DConditionModel config of an ldm UNet (keys without the prefix):
    channels and multipliers, res blocks per level, attention levels and depths, context width
    and projection type from the shapes; head counts from the real models' rule."""
    def need(key: str) -> tuple:
        if key not in shapes:
            raise ModelFileError(f"{source}: the UNet lacks {key}; the file is incomplete or of another layout.")
        return shapes[key]

    model_channels, in_channels = need(_UNET_ANCHOR)[:2]
    inputs = _indices(shapes, r"input_blocks\.(\d+)\.")
    ops = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in shapes]
    per_level = ops[0] if ops else len(inputs)          # res blocks + the downsampler (or the end)
    layers = per_level - 1
    levels = len(ops) + 1
    if layers < 1 or len(inputs) != levels * per_level:
        raise ModelFileError(f"{source}: unexpected UNet input block layout ({len(inputs)} input blocks, "
                             f"downsamplers at {ops}); not an SD 1.x/2.x UNet.")
    widths, attention, depths = [], [], []
    for level in range(levels):
        first = 1 + level * per_level
        widths.append(need(f"input_blocks.{first}.0.out_layers.3.weight")[0])
        has_attn = f"input_blocks.{first}.1.proj_in.weight" in shapes
        attention.append(has_attn)
        depths.append(len(_indices(shapes, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\."))
                      if has_attn else 0)
    # levels without attention take the others' depth (diffusers ignores it there; the middle
    # block uses the last entry)
    attn_depths = [d for d in depths if d]
    depths = [d or (attn_depths[0] if attn_depths else 1) for d in depths]
    attn_keys = [k for k in shapes if k.endswith("transformer_blocks.0.attn2.to_k.weight")]
    if not attn_keys or "middle_block.1.proj_in.weight" not in shapes:
        raise ModelFileError(f"{source}: the UNet has no cross-attention; not an SD 1.x/2.x text-to-image UNet.")
    context_dim = shapes[attn_keys[0]][1]
    linear = len(need("middle_block.1.proj_in.weight")) == 2
    time_dim = need("time_embed.0.weight")[0]
    if model_channels != widths[0] or time_dim != 4 * widths[0]:
        raise ModelFileError(f"{source}: conv_in width {model_channels} / time embedding width {time_dim} do not fit "
                             f"a first level of {widths[0]} channels; not an SD UNet.")
    for w in widths:
        if w % NORM_GROUPS:
            raise ModelFileError(f"{source}: UNet width {w} is not a multiple of {NORM_GROUPS} (its GroupNorm "
                                 "groups); not an SD UNet.")
    if v2:
        bad = [w for w, a in zip(widths, attention) if a and w % V2_HEAD_DIM]
        if bad:
            raise ModelFileError(f"{source}: SD 2.x attention uses {V2_HEAD_DIM}-wide heads, but a level is {bad[0]} "
                                 "wide.")
        heads: Any = [max(1, w // V2_HEAD_DIM) for w in widths]
    else:
        heads = V1_NUM_HEADS
    depth: Any = depths[0] if len(set(depths)) == 1 else depths
    mid_depth = len(_indices(shapes, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    if mid_depth != (depth if isinstance(depth, int) else depths[-1]):
        raise ModelFileError(f"{source}: the middle block has {mid_depth} transformer blocks, the last level "
                             f"{depths[-1]}; this UNet layout is not supported.")
    return {
        "sample_size": 96 if v2 else 64,
        "in_channels": in_channels,
        "out_channels": need("out.2.weight")[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": widths,
        "layers_per_block": layers,
        "cross_attention_dim": context_dim,
        "attention_head_dim": heads,
        "use_linear_projection": linear,
        "transformer_layers_per_block": depth,
        "norm_num_groups": NORM_GROUPS,
    }


def vae_config_from_ldm(shapes: Mapping[str, tuple]) -> dict:
    """The diffusers AutoencoderKL config of an ldm VAE (keys without prefix)."""
    cfg = AutoEncoderConfig.from_shapes(dict(shapes), SD_VAE_SCALING)
    return _vae_config(cfg.in_channels, cfg.out_channels, [cfg.ch * m for m in cfg.ch_mult], cfg.num_res_blocks,
                       cfg.z_channels, cfg.use_quant_conv)


def _vae_config(in_channels, out_channels, widths, layers, latent, quant_conv) -> dict:
    n = len(widths)
    return {"in_channels": in_channels, "out_channels": out_channels, "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "block_out_channels": list(widths), "layers_per_block": layers,
            "latent_channels": latent, "norm_num_groups": NORM_GROUPS, "sample_size": 512,
            "scaling_factor": VAE_SCALE_FACTOR, "use_quant_conv": quant_conv, "use_post_quant_conv": quant_conv}


def _vae_config_from_diffusers_keys(shapes: Mapping[str, tuple]) -> dict:
    levels = _indices(shapes, r"encoder\.down_blocks\.(\d+)\.")
    widths = [shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in levels]
    layers = len(_indices(shapes, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))
    return _vae_config(shapes["encoder.conv_in.weight"][1], shapes["decoder.conv_out.weight"][0], widths, layers,
                       shapes["decoder.conv_in.weight"][1], "quant_conv.weight" in shapes)


def clip_config_from_hf(shapes: Mapping[str, tuple], *, gelu: bool, num_layers: int | None = None):
    """transformers CLIPTextConfig from HF-layout keys (`text_model.*`): bundled CLIP-L config
    (quick_gelu) for SD 1.x, the OpenCLIP rules (gelu) for SD 2.x."""
    from library.text_encoders import clip_g_config, clip_l_config

    vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
    make = clip_g_config if gelu else clip_l_config
    return make(vocab_size=vocab, hidden_size=width, projection_dim=width, num_attention_heads=width // CLIP_HEAD_DIM,
                max_position_embeddings=shapes["text_model.embeddings.position_embedding.weight"][0],
                intermediate_size=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
                num_hidden_layers=num_layers if num_layers is not None else
                1 + max(_indices(shapes, r"text_model\.encoder\.layers\.(\d+)\.")))


# ---------------------------------------------------------------------------------------------
# Building modules without allocating twice.

def _assign(model: nn.Module, state: dict[str, Tensor], source, what: str, dtype: torch.dtype | None) -> nn.Module:
    wanted = model.state_dict()
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    bad_shapes = [(k, tuple(state[k].shape), tuple(wanted[k].shape)) for k in wanted
                  if k in state and tuple(state[k].shape) != tuple(wanted[k].shape)]
    if missing or unexpected or bad_shapes:
        parts = [f"{source}: the {what} does not match the layout read from the file"]
        if missing:
            parts.append(f"{len(missing)} tensors missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if bad_shapes:
            parts.append(f"{len(bad_shapes)} of another shape (e.g. {bad_shapes[0]})")
        raise ModelFileError("; ".join(parts) + ". The file is damaged or of another layout.")
    cast = {}
    for k, t in state.items():
        target = dtype if (dtype is not None and t.is_floating_point()) else wanted[k].dtype
        if t.element_size() == 1 and t.is_floating_point():   # fp8 files: widen
            target = dtype or torch.float32
        cast[k] = t.to(dtype=target)
    model.load_state_dict(cast, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _empty(factory):
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False), torch.random.fork_rng(devices=[]):
        return factory()


def build_unet(config: dict, state: dict[str, Tensor], source, dtype: torch.dtype | None) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return _assign(_empty(lambda: UNet2DConditionModel(**config)), state, source, "UNet", dtype)


def build_vae(config: dict, state: dict[str, Tensor], source, dtype: torch.dtype | None) -> nn.Module:
    from diffusers import AutoencoderKL

    return _assign(_empty(lambda: AutoencoderKL(**config)), state, source, "VAE", dtype)


def build_clip(config, state: dict[str, Tensor], source, dtype: torch.dtype | None) -> nn.Module:
    from transformers import CLIPTextModel

    from library.text_encoders import wrap_clip_text_model

    model = wrap_clip_text_model(_empty(lambda: CLIPTextModel(config)))
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    return _assign(model, state, source, "text encoder", dtype)


# ---------------------------------------------------------------------------------------------
# Converting the parts of an ldm file.

def convert_unet(sd: Mapping[str, Tensor], config: dict) -> dict[str, Tensor]:
    """ldm UNet (keys with `model.diffusion_model.`) -> diffusers keys, by diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet_only = {k: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    return convert_ldm_unet_checkpoint(unet_only, config)


def convert_vae(sd: Mapping[str, Tensor], config: dict) -> dict[str, Tensor]:
    """ldm VAE (keys without prefix) -> diffusers keys, by diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(dict(sd), config)


def clip_v1_state(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """SD 1.x text encoder keys -> `text_model.*` (older files lack the `text_model.` level)."""
    state = _sub(sd, CLIP_PREFIX)
    if not any(k.startswith("text_model.") for k in state):
        state = {"text_model." + k: v for k, v in state.items()}
    return state


def clip_v2_state(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    """SD 2.x OpenCLIP tower -> transformers CLIP keys by diffusers' converter, without the last
    layer (never used) and the projection; returns (state, number of layers kept)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    width = sd[OPEN_CLIP_PREFIX + "token_embedding.weight"].shape[1]
    blocks = _indices(sd, re.escape(OPEN_CLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\.")
    if len(blocks) < 2:
        raise ModelFileError("the SD 2.x text encoder has fewer than 2 layers; the file is incomplete.")
    # The converter reads the q/k/v split width from text_projection, or else from this config.
    holder = type("Holder", (), {"config": type("Config", (), {"hidden_size": width})()})()
    converted = convert_open_clip_checkpoint(holder, dict(sd), prefix=OPEN_CLIP_PREFIX)
    kept = len(blocks) - 1
    layer = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")
    state = {}
    for k, v in converted.items():
        m = layer.match(k)
        if k == "text_projection.weight" or (m is not None and int(m.group(1)) >= kept):
            continue
        state[k] = v
    return state, kept


# ---------------------------------------------------------------------------------------------
# Loading.

def load_sd_model(path: str | os.PathLike, *, v2: bool | None = None, vae_path: str | os.PathLike | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  vae_dtype: torch.dtype | None = None, text_encoder_dtype: torch.dtype | None = None,
                  ) -> SDComponents:
    """UNet, VAE and text encoder of an SD 1.x/2.x checkpoint (file or diffusers folder). `vae_path`
    replaces the checkpoint's VAE (--vae). Dtypes default to the file's."""
    path = Path(path)
    _require_exists(path, "--pretrained_model_name_or_path")
    te_dtype = text_encoder_dtype or dtype
    if path.is_dir():
        info = inspect_sd_checkpoint(path, v2=v2)
        unet, vae, te = _load_diffusers_folder(path, info, dtype, vae_dtype or dtype, te_dtype,
                                               need_vae=vae_path is None)
        tokenizer_dir = path / "tokenizer" if (path / "tokenizer").is_dir() else None
    else:
        sd = read_state_dict(path)
        info = inspect_sd_checkpoint(path, v2=v2, shapes=sd)
        unet = build_unet(info.unet_config, convert_unet(sd, info.unet_config), path, dtype)
        if info.v2:
            state, layers = clip_v2_state(sd)
            te = build_clip(clip_config_from_hf(_shapes(state), gelu=True, num_layers=layers), state, path, te_dtype)
        else:
            if not any(k.startswith(CLIP_PREFIX) for k in sd):
                raise ModelFileError(f"{path}: the checkpoint has no text encoder (cond_stage_model.*); pass a full "
                                     "SD 1.x/2.x checkpoint.")
            state = clip_v1_state(sd)
            te = build_clip(clip_config_from_hf(_shapes(state), gelu=False), state, path, te_dtype)
        vae = None
        if vae_path is None:
            if not info.has_vae:
                raise ModelFileError(f"{path}: the checkpoint has no VAE (first_stage_model.*); pass one with --vae.")
            vae_sd = _sub(sd, VAE_PREFIX)
            config = vae_config_from_ldm(_shapes(vae_sd))
            vae = build_vae(config, convert_vae(vae_sd, config), path, vae_dtype or dtype)
        del sd
        tokenizer_dir = None
    if vae_path is not None:
        vae = load_sd_vae(vae_path, dtype=vae_dtype or dtype)
    if te.config.hidden_size != info.text_width:
        raise ModelFileError(f"{path}: the text encoder is {te.config.hidden_size} wide but the UNet's context is "
                             f"{info.text_width}; the parts do not belong together.")
    if vae.config.latent_channels != unet.config.in_channels:
        raise ModelFileError(f"{vae_path or path}: the VAE has {vae.config.latent_channels} latent channels, the UNet "
                             f"takes {unet.config.in_channels}; use an SD 1.x/2.x VAE.")
    return SDComponents(unet=unet.to(device), vae=vae.to(device), text_encoder=te.to(device), info=info,
                        tokenizer_dir=tokenizer_dir)


def _load_diffusers_folder(path: Path, info: SDCheckpointInfo, dtype, vae_dtype, te_dtype, need_vae: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from library.text_encoders import wrap_clip_text_model

    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype) if need_vae else None
        te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=te_dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{path}: cannot load the diffusers folder ({type(e).__name__}: {e}).") from e
    for m in (unet, vae, te):
        if m is not None:
            m.eval().requires_grad_(False)
    return unet, vae, wrap_clip_text_model(te)


def load_sd_vae(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """--vae: an ldm VAE file (no prefix, `first_stage_model.` or `vae.`, e.g. a full checkpoint),
    a diffusers-layout VAE file (diffusion_pytorch_model.safetensors) or a diffusers VAE folder
    (with or without a `vae/` subfolder)."""
    from diffusers import AutoencoderKL

    path = Path(path)
    _require_exists(path, "--vae")
    if path.is_dir():
        sub = "vae" if (path / "vae" / "config.json").is_file() else None
        if not (path / (sub or "") / "config.json").is_file():
            raise ModelFileError(f"{path}: a folder without a VAE config.json; pass a VAE file or a diffusers VAE "
                                 "folder.")
        try:
            vae = AutoencoderKL.from_pretrained(path, subfolder=sub, torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelFileError(f"{path}: cannot load the diffusers VAE ({type(e).__name__}: {e}).") from e
        return vae.eval().requires_grad_(False)
    sd = read_state_dict(path)
    shapes = _shapes(sd)
    prefix = find_ae_prefix(shapes)
    if prefix is not None:
        vae_sd = _sub(sd, prefix)
        config = vae_config_from_ldm(_shapes(vae_sd))
        state = convert_vae(vae_sd, config)
    elif "encoder.down_blocks.0.resnets.0.conv1.weight" in shapes:
        config = _vae_config_from_diffusers_keys(shapes)
        state = dict(sd)
    else:
        what = describe_checkpoint(list(shapes)) or "an unknown kind of file"
        raise ModelFileError(f"{path}: expected an SD VAE for --vae, but this file looks like {what}.")
    if config["latent_channels"] != 4:
        raise ModelFileError(f"{path}: this VAE has {config['latent_channels']} latent channels; SD 1.x/2.x VAEs have "
                             "4 (it belongs to another model family).")
    return build_vae(config, state, path, dtype)


def fingerprint(path: str | os.PathLike, part: str | None = None) -> str:
    """A cheap identity of model weights for cache keys: a file's fingerprint
    (library.text_encoders.file_fingerprint), or for a diffusers folder the names, sizes and
    mtimes of the weight files of `part` (e.g. "text_encoder")."""
    from library.text_encoders import file_fingerprint

    path = Path(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            return file_fingerprint(path)
        st = path.stat()
        return f"{path.name}:{st.st_size}:{int(st.st_mtime)}"
    folder = path / part if part and (path / part).is_dir() else path
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(folder)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return f"{path.name}/{part or ''}:{h.hexdigest()[:16]}"
