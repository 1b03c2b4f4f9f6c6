"""LoRA for Stable Diffusion 1.x / 2.x: targets and defaults only (FORMATS 4.6).

Used through `--network_module networks.lora` (sd-scripts' module name for SD; networks/lora.py
re-exports `create_network` / `create_network_from_weights` from here). The LoRA math, saving,
loading, merging and optimizer groups live in networks/lora_core.py.

Targets, named after diffusers' module paths as sd-scripts names them:
- LoRA-LierLa (default): every Linear and 1x1 Conv2d inside the UNet's Transformer2DModel blocks
  (proj_in/proj_out, attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2), e.g.
  `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q` (192 modules on SD 1.5),
  and the text encoder's attention and MLP Linears,
  `lora_te_text_model_encoder_layers_0_self_attn_q_proj` (72 on SD 1.5, 138 on SD 2.x);
- LoRA-C3Lier (`conv_dim`, `conv_alpha`): also the ResnetBlock2D, Downsample2D and Upsample2D
  layers: their 3x3 convolutions at conv_dim / conv_alpha (default alpha 1), their Linear
  (time_emb_proj) and 1x1 convolutions (conv_shortcut) at network_dim / network_alpha.

Block-wise options (25 blocks: IN00-IN11, MID, OUT00-OUT11, as sd-scripts numbers them: ResNet /
attention j of down level i is IN(1 + 3i + j), a downsampler IN(3i + 3), up level i is
OUT(3i + j), its upsampler OUT(3i + 2)):
- `block_dims` / `block_alphas` (25 values) replace network_dim / network_alpha per block,
  `conv_block_dims` / `conv_block_alphas` conv_dim / conv_alpha (a 0 dim leaves the block out);
- `down_lr_weight` / `up_lr_weight` (12 values, or a preset sine, cosine, linear, reverse_linear,
  zeros, optionally "+offset"), `mid_lr_weight` (one value) multiply the U-Net learning rate per
  block; weights at or below `block_lr_zero_threshold` (default 0) become 0 and those blocks get
  no LoRA at all.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from library.errors import ConfigError, ModelFileError
from networks.lora_core import (LayerRef, LoRANetwork, LoRAPlusRatios, LoRATarget, apply_reg_lrs, find_layers,
                           hf_clip_path_prefix, load_lora_state_dict, mismatch_message, read_lora_modules,
                           targets_from_weights)
from networks.network_args import (COMMON_LORA_ARGS, ArgSpec, last_match, parse_network_args,
                                   parse_non_negative_float, parse_rank, parse_rank_list)

logger = logging.getLogger(__name__)

FAMILY = "SD 1.x / 2.x"
NETWORK_MODULE = "networks.lora"
UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
UNET_CONTAINERS = ("Transformer2DModel",)
UNET_CONV_CONTAINERS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
CLIP_CONTAINERS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")

NUM_BLOCKS = 12                       # per side (down / up), as sd-scripts counts them
NUM_TOTAL_BLOCKS = 2 * NUM_BLOCKS + 1
BLOCK_NAMES = [f"IN{i:02d}" for i in range(NUM_BLOCKS)] + ["MID"] + [f"OUT{i:02d}" for i in range(NUM_BLOCKS)]
LR_PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")
_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


# ----------------------------------------------------------------------------------------
# network_args values.

def _parse_floats(length: int) -> Callable[[Any], list[float]]:
    def parse(value: Any) -> list[float]:
        items = list(value) if isinstance(value, (list, tuple)) else str(value).strip().strip("[]").split(",")
        if len(items) != length:
            raise ValueError(f"expected {length} comma-separated numbers ({BLOCK_NAMES[0]}..{BLOCK_NAMES[-1]}); got "
                             f"{len(items)}")
        try:
            out = [float(str(i).strip()) for i in items]
        except ValueError:
            raise ValueError(f"expected {length} comma-separated numbers such as 1,1,0.5,...") from None
        if any(not math.isfinite(v) or v < 0 for v in out):
            raise ValueError("values must be finite and >= 0")
        return out

    return parse


def _preset(name: str, offset: float) -> list[float]:
    last = NUM_BLOCKS - 1
    if name == "sine":
        return [math.sin(math.pi * (i / last) / 2) + offset for i in range(NUM_BLOCKS)]
    if name == "cosine":
        return [math.sin(math.pi * (i / last) / 2) + offset for i in reversed(range(NUM_BLOCKS))]
    if name == "linear":
        return [i / last + offset for i in range(NUM_BLOCKS)]
    if name == "reverse_linear":
        return [i / last + offset for i in reversed(range(NUM_BLOCKS))]
    return [offset] * NUM_BLOCKS   # zeros


def parse_lr_weights(value: Any) -> list[float]:
    """12 weights: "w0,w1,...,w11" (an empty item is 0, fewer than 12 are filled with 1.0 as
    sd-scripts does) or a preset "sine" / "cosine" / "linear" / "reverse_linear" / "zeros",
    optionally "+offset" (e.g. "sine+0.5")."""
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        text = str(value).strip()
        name, _, offset = text.partition("+")
        if name.strip() in LR_PRESETS:
            try:
                return _preset(name.strip(), float(offset) if offset.strip() else 0.0)
            except ValueError:
                raise ValueError(f'"{text}": the offset after "+" must be a number, e.g. sine+0.5') from None
        items = text.strip("[]").split(",")
    if len(items) > NUM_BLOCKS:
        raise ValueError(f"expected at most {NUM_BLOCKS} comma-separated weights (one per block), got {len(items)}")
    try:
        weights = [float(i) if i.strip() else 0.0 for i in items]
    except ValueError:
        raise ValueError(f"expected {NUM_BLOCKS} comma-separated numbers or a preset ({', '.join(LR_PRESETS)}, "
                         "optionally +offset)") from None
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError("weights must be finite and >= 0")
    if len(weights) < NUM_BLOCKS:
        logger.warning("%d block lr weights given; the remaining %d blocks get 1.0", len(weights),
                       NUM_BLOCKS - len(weights))
        weights += [1.0] * (NUM_BLOCKS - len(weights))
    return weights


SD_ARGS: tuple[ArgSpec, ...] = COMMON_LORA_ARGS + (
    ArgSpec("conv_dim", parse_rank, "LoRA-C3Lier: rank of the ResNet/down/upsampler 3x3 convolutions"),
    ArgSpec("conv_alpha", parse_non_negative_float, "alpha of the 3x3 convolution LoRAs (default 1)"),
    ArgSpec("block_dims", parse_rank_list(NUM_TOTAL_BLOCKS, BLOCK_NAMES), "25 ranks: IN00-IN11, MID, OUT00-OUT11"),
    ArgSpec("block_alphas", _parse_floats(NUM_TOTAL_BLOCKS), "25 alphas, per block"),
    ArgSpec("conv_block_dims", parse_rank_list(NUM_TOTAL_BLOCKS, BLOCK_NAMES), "25 ranks of the 3x3 convolutions"),
    ArgSpec("conv_block_alphas", _parse_floats(NUM_TOTAL_BLOCKS), "25 alphas of the 3x3 convolutions"),
    ArgSpec("down_lr_weight", parse_lr_weights, "12 lr weights for IN00-IN11, or a preset (sine, cosine, ...)"),
    ArgSpec("mid_lr_weight", parse_non_negative_float, "lr weight of the MID block"),
    ArgSpec("up_lr_weight", parse_lr_weights, "12 lr weights for OUT00-OUT11, or a preset"),
    ArgSpec("block_lr_zero_threshold", parse_non_negative_float,
            "block lr weights at or below this become 0 (the block gets no LoRA); default 0"),
)
# Keys that shape the module set / ranks: meaningless when the file decides them.
RANK_KEYS = {"conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
             "network_reg_dims"}


# ----------------------------------------------------------------------------------------
# Layers.

def unet_root(unet: Any) -> nn.Module:
    """The diffusers UNet2DConditionModel (also inside library.sd.SDUNet)."""
    inner = getattr(unet, "unet", unet)
    if not (isinstance(inner, nn.Module) and hasattr(inner, "down_blocks") and hasattr(inner, "mid_block")):
        raise ConfigError(f"networks.lora needs an SD 1.x/2.x UNet; got {type(unet).__name__}. For the other model "
                          "families use their module (networks.lora_flux, networks.lora_sd3, networks.lora_lumina, "
                          "networks.lora_anima).")
    return inner


def block_index(lora_name: str) -> int:
    """sd-scripts' block number of a U-Net LoRA name: 1-11 down (IN00 has no LoRA), 12 the middle
    block, 13-24 up; -1 for names outside the blocks."""
    m = _UPDOWN.search(lora_name)
    if m:
        side, level, kind, index = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * level + (2 if kind in ("upsamplers", "downsamplers") else index)
        return 1 + idx if side == "down" else NUM_BLOCKS + 1 + idx
    if "mid_block_" in lora_name:
        return NUM_BLOCKS
    return -1


def is_conv3x3(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def unet_layers(unet: Any, *, with_conv_blocks: bool) -> list[LayerRef]:
    """Linear and Conv2d layers of the Transformer2DModels (and with `with_conv_blocks` of the
    ResNet / down / upsampler blocks), in module order."""
    containers = UNET_CONTAINERS + (UNET_CONV_CONTAINERS if with_conv_blocks else ())
    return find_layers(unet_root(unet), UNET_PREFIX, containers=containers, include_conv=True)


def text_encoder_layers(text_encoders: Any) -> list[LayerRef]:
    if text_encoders is None:
        return []
    encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    model = encoders[0] if encoders else None
    if model is None:
        return []
    return find_layers(model, TEXT_ENCODER_PREFIX, containers=CLIP_CONTAINERS, path_prefix=hf_clip_path_prefix(model),
                       text_encoder_index=0)


# ----------------------------------------------------------------------------------------
# Block-wise dims and learning rates.

def block_lr_weights(args: Mapping[str, Any]) -> list[float] | None:
    """25 lr weights (IN00..OUT11) from down/mid/up_lr_weight, zeroed at or below the threshold;
    None when none is given."""
    down, mid, up = args.get("down_lr_weight"), args.get("mid_lr_weight"), args.get("up_lr_weight")
    if down is None and mid is None and up is None:
        return None
    threshold = args.get("block_lr_zero_threshold", 0.0)
    weights = list(down or [1.0] * NUM_BLOCKS) + [1.0 if mid is None else mid] + list(up or [1.0] * NUM_BLOCKS)
    given = [down is not None] * NUM_BLOCKS + [mid is not None] + [up is not None] * NUM_BLOCKS
    return [(w if w > threshold else 0.0) if g else w for w, g in zip(weights, given)]


def block_dims_and_alphas(args: Mapping[str, Any], dim: int, alpha: float, conv_dim: int | None,
                          conv_alpha: float, lr_weights: list[float] | None):
    """(block_dims, block_alphas, conv_block_dims, conv_block_alphas), each 25 long (conv ones
    None without any conv setting), or None when no block-wise option is given."""
    if "block_dims" not in args and lr_weights is None:
        for key in ("block_alphas", "conv_block_dims", "conv_block_alphas"):
            if key in args:
                raise ConfigError(f"--network_args {key} needs block_dims (block-wise ranks); add block_dims=... "
                                  f"with {NUM_TOTAL_BLOCKS} values, or remove {key}")
        return None
    dims = list(args.get("block_dims") or [dim] * NUM_TOTAL_BLOCKS)
    alphas = list(args.get("block_alphas") or [alpha] * NUM_TOTAL_BLOCKS)
    if "conv_block_dims" in args:
        conv_dims = list(args["conv_block_dims"])
        conv_alphas = list(args.get("conv_block_alphas") or [conv_alpha] * NUM_TOTAL_BLOCKS)
    elif "conv_block_alphas" in args:
        raise ConfigError("--network_args conv_block_alphas needs conv_block_dims; add it or remove conv_block_alphas")
    elif conv_dim:
        conv_dims, conv_alphas = [conv_dim] * NUM_TOTAL_BLOCKS, [conv_alpha] * NUM_TOTAL_BLOCKS
    else:
        conv_dims = conv_alphas = None
    if lr_weights is not None:   # a block without learning rate gets no LoRA at all
        for i, w in enumerate(lr_weights):
            if w == 0:
                dims[i] = 0
                if conv_dims is not None:
                    conv_dims[i] = 0
    return dims, alphas, conv_dims, conv_alphas


class SDLoRANetwork(LoRANetwork):
    """LoRANetwork with sd-scripts' block lr weights: a U-Net module of block b trains at
    (unet_lr or learning_rate) x weight[b] unless network_reg_lrs gave it its own lr."""

    def __init__(self, targets: Sequence[LoRATarget], *, lr_weights: Mapping[str, float] | None = None, **kwargs):
        super().__init__(targets, **kwargs)
        self.block_lr_weights = dict(lr_weights or {})
        self._own_lr = {t.lora_name for t in targets if t.lr is not None}

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr, **kwargs):
        base = default_lr if unet_lr is None else float(unet_lr)
        for m in self.unet_loras:
            weight = self.block_lr_weights.get(m.lora_name)
            if weight is not None and m.lora_name not in self._own_lr:
                m.lr = None if weight == 1.0 else base * weight
        return super().prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr, **kwargs)


# ----------------------------------------------------------------------------------------
# Building networks.

def _loraplus(args: Mapping[str, Any]) -> LoRAPlusRatios:
    return LoRAPlusRatios(args.get("loraplus_lr_ratio"), args.get("loraplus_unet_lr_ratio"),
                          args.get("loraplus_text_encoder_lr_ratio"))


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoder: Any, unet: nn.Module, neuron_dropout: float | None = None,
                   **kwargs: Any) -> SDLoRANetwork:
    """A new SD 1.x/2.x LoRA (sd-scripts' signature; kwargs are the --network_args).
    text_encoder: the CLIP text model, or a one-element list of it (None: U-Net only)."""
    args = parse_network_args(kwargs, SD_ARGS, network_module=NETWORK_MODULE)
    dim = 4 if network_dim is None else int(network_dim)
    if dim < 1:
        raise ConfigError(f"--network_dim must be >= 1, got {network_dim}")
    alpha = 1.0 if network_alpha is None else float(network_alpha)
    conv_dim = args.get("conv_dim") or None
    conv_alpha = args.get("conv_alpha", 1.0)
    if "conv_alpha" in args and conv_dim is None and "conv_block_dims" not in args:
        raise ConfigError("--network_args conv_alpha has no effect without conv_dim (LoRA-C3Lier); add conv_dim=N "
                          "or remove conv_alpha")
    lr_weights = block_lr_weights(args)
    blocks = block_dims_and_alphas(args, dim, alpha, conv_dim, conv_alpha, lr_weights)
    with_conv = conv_dim is not None or (blocks is not None and blocks[2] is not None)

    candidates: list[tuple[LayerRef, int, float]] = []
    for layer in unet_layers(unet, with_conv_blocks=with_conv):
        conv3 = is_conv3x3(layer.module)
        if blocks is not None:
            idx = block_index(layer.lora_name)
            dims, alphas, conv_dims, conv_alphas = blocks
            if not conv3:
                rank, a = dims[idx], alphas[idx]
            elif conv_dims is not None:
                rank, a = conv_dims[idx], conv_alphas[idx]
            else:
                rank, a = 0, 0.0
        elif conv3:
            rank, a = (conv_dim, conv_alpha) if conv_dim is not None else (0, 0.0)
        else:
            rank, a = dim, alpha
        candidates.append((layer, rank, a))
    candidates += [(layer, dim, alpha) for layer in text_encoder_layers(text_encoder)]

    reg_dims = args.get("network_reg_dims")
    targets: list[LoRATarget] = []
    skipped: list[str] = []
    for layer, rank, a in candidates:
        rule = last_match(reg_dims, layer.lora_name)   # network_reg_dims wins over everything else
        if rule is not None:
            rank, a = rule.value, alpha if not is_conv3x3(layer.module) else conv_alpha
        if rank == 0:
            skipped.append(layer.lora_name)
        else:
            targets.append(layer.target(rank, a))
    if skipped and args.get("verbose"):
        logger.info("%d layers without LoRA (rank 0): %s", len(skipped), ", ".join(skipped))

    lr_by_name = None
    if lr_weights is not None:
        lr_by_name = {t.lora_name: lr_weights[block_index(t.lora_name)] for t in targets
                      if t.text_encoder_index is None and block_index(t.lora_name) >= 0}
    return SDLoRANetwork(
        apply_reg_lrs(targets, args.get("network_reg_lrs")), lr_weights=lr_by_name, family=FAMILY,
        multiplier=multiplier, dropout=neuron_dropout, rank_dropout=args.get("rank_dropout"),
        module_dropout=args.get("module_dropout"), loraplus=_loraplus(args), verbose=args.get("verbose", False),
    )


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any, text_encoder: Any,
                                unet: nn.Module, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                for_inference: bool = False, *, neuron_dropout: float | None = None,
                                **kwargs: Any) -> tuple[SDLoRANetwork, Mapping[str, torch.Tensor]]:
    """A network shaped like a LoRA file: its modules (LierLa or C3Lier), ranks and alphas (for
    --dim_from_weights). The weights are not loaded here: call `load_weights` or
    `merge_to(weights_sd)`. A file for another model family is refused."""
    args = parse_network_args(kwargs, SD_ARGS, network_module=NETWORK_MODULE)
    shaping = sorted(k for k in args if k in RANK_KEYS)
    if shaping:
        raise ConfigError(f"--network_args {', '.join(shaping)}: the modules and ranks come from the weights file "
                          "here (--dim_from_weights); remove these keys.")
    if weights_sd is None:
        if file is None:
            raise ConfigError("create_network_from_weights needs a file or a state dict")
        weights_sd = load_lora_state_dict(file)
    source = str(file) if file is not None else "the given LoRA weights"
    saved = read_lora_modules(weights_sd, source)

    layers = unet_layers(unet, with_conv_blocks=True) + text_encoder_layers(text_encoder)
    targets, unmatched = targets_from_weights(layers, saved, source)
    if unmatched:
        hint = None
        if any(n.startswith(TEXT_ENCODER_PREFIX + "_") for n in unmatched) and text_encoder is None:
            hint = "It has text-encoder modules (lora_te_) but no text encoder was given."
        raise ModelFileError(mismatch_message(source, FAMILY, unknown=unmatched, total=len(saved), hint=hint))
    lr_weights = block_lr_weights(args)
    lr_by_name = None
    if lr_weights is not None:
        lr_by_name = {t.lora_name: lr_weights[block_index(t.lora_name)] for t in targets
                      if t.text_encoder_index is None and block_index(t.lora_name) >= 0}
    network = SDLoRANetwork(
        apply_reg_lrs(targets, args.get("network_reg_lrs")), lr_weights=lr_by_name, family=FAMILY,
        multiplier=multiplier, dropout=None if for_inference else neuron_dropout,
        rank_dropout=None if for_inference else args.get("rank_dropout"),
        module_dropout=None if for_inference else args.get("module_dropout"),
        loraplus=_loraplus(args), verbose=args.get("verbose", False),
    )
    if for_inference:
        network.requires_grad_(False)
    return network, weights_sd
