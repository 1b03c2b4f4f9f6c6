"""LoRA for SD3 / SD3.5 (Medium, 3.5 Medium, 3.5 Large): targets and defaults only (FORMATS 4.3).

Use with `--network_module networks.lora_sd3`. The LoRA math, saving, loading, merging and
optimizer groups live in networks/lora.py.

Targets: every Linear inside the joint blocks' `SingleDiTBlock`s, named after the SAI
checkpoint keys, e.g. `lora_unet_joint_blocks_0_context_block_attn_qkv`,
`lora_unet_joint_blocks_0_x_block_adaLN_modulation_1`, and `..._x_block_attn2_qkv` /
`_attn2_proj` on SD3.5 Medium (237 modules on SD3 M, 263 on SD3.5 M, 377 on SD3.5 L).
`emb_dims` adds the embedders and the final layer (the x_embedder is a 2x2 Conv2d).

Text encoders come as [CLIP-L, CLIP-G, T5-XXL]: CLIP-L (`lora_te1_`) and CLIP-G (`lora_te2_`)
modules are created when those models are given, T5 (`lora_te3_`) ones with
`train_t5xxl=True`; they are only trained and saved when the trainer applies the text encoder
part. `split_qkv=True` gives q, k and v of every qkv projection LoRAs of their own, saved in
the fused layout at the trained strength (see networks/lora.py LoRAModule).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from library.errors import ConfigError, ModelFileError
from networks.lora import (LayerRef, LoRANetwork, LoRAPlusRatios, LoRATarget, apply_reg_lrs, find_layers,
                           hf_clip_path_prefix, layer_at, load_lora_state_dict, mismatch_message,
                           read_lora_modules, targets_from_weights)
from networks.network_args import (COMMON_LORA_ARGS, ArgSpec, last_match, parse_block_selection, parse_bool,
                                   parse_network_args, parse_rank, parse_rank_list, refused)

logger = logging.getLogger(__name__)

FAMILY = "SD3 / SD3.5"
UNET_PREFIX = "lora_unet"
# Position in `text_encoders` -> LoRA prefix (sd-scripts: CLIP-L te1, CLIP-G te2, T5-XXL te3).
CLIP_L_INDEX, CLIP_G_INDEX, T5_INDEX = 0, 1, 2
TEXT_ENCODER_PREFIXES = {CLIP_L_INDEX: "lora_te1", CLIP_G_INDEX: "lora_te2", T5_INDEX: "lora_te3"}
TEXT_ENCODER_NAMES = {CLIP_L_INDEX: "CLIP-L", CLIP_G_INDEX: "CLIP-G", T5_INDEX: "T5-XXL"}
CLIP_CONTAINERS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
T5_CONTAINERS = ("T5Attention", "T5DenseGatedActDense", "T5DenseActDense")
BLOCK_CONTAINERS = ("SingleDiTBlock",)

# Per-type ranks: the first key whose substrings all occur in the LoRA name (and that the
# user set) gives the rank ("attn" also matches the x_block's attn2).
TYPE_DIMS = (
    ("context_attn_dim", ("context_block", "attn")),
    ("context_mlp_dim", ("context_block", "mlp")),
    ("context_mod_dim", ("context_block", "adaLN_modulation")),
    ("x_attn_dim", ("x_block", "attn")),
    ("x_mlp_dim", ("x_block", "mlp")),
    ("x_mod_dim", ("x_block", "adaLN_modulation")),
)
# emb_dims=[context_embedder, t_embedder, x_embedder, y_embedder, final_mod, final_linear]: module paths.
EMB_LAYERS = (
    ("context_embedder", ("context_embedder",)),
    ("t_embedder", ("t_embedder.mlp.0", "t_embedder.mlp.2")),
    ("x_embedder", ("x_embedder.proj",)),
    ("y_embedder", ("y_embedder.mlp.0", "y_embedder.mlp.2")),
    ("final_mod", ("final_layer.adaLN_modulation.1",)),
    ("final_linear", ("final_layer.linear",)),
)

_NO_CONV = "SD3's only convolution is the x_embedder; give its rank in emb_dims (third value) instead of"
SD3_ARGS: tuple[ArgSpec, ...] = COMMON_LORA_ARGS + (
    *(ArgSpec(key, parse_rank, f"rank for layers matching {'+'.join(subs)} (0 = none)") for key, subs in TYPE_DIMS),
    ArgSpec("emb_dims", parse_rank_list(6, [name for name, _ in EMB_LAYERS]),
            "ranks for the embedders and the final layer"),
    ArgSpec("train_block_indices", parse_block_selection, '"all", "none" or e.g. 0,2,5-8'),
    ArgSpec("split_qkv", parse_bool, "separate LoRAs for q, k and v of every qkv projection"),
    ArgSpec("train_t5xxl", parse_bool, "also create T5-XXL LoRA modules (lora_te3_)"),
    ArgSpec("conv_dim", refused(f"{_NO_CONV} conv_dim"), "refused"),
    ArgSpec("conv_alpha", refused(f"{_NO_CONV} conv_alpha"), "refused"),
)
# Keys that shape the module set / ranks: meaningless when the file decides them.
RANK_KEYS = {"emb_dims", "split_qkv", "train_block_indices", "network_reg_dims", *(key for key, _ in TYPE_DIMS)}


def _block_layers(mmdit: nn.Module) -> list[tuple[int, LayerRef]]:
    """(block index, layer) for every Linear inside the SingleDiTBlocks of every joint block."""
    if not isinstance(getattr(mmdit, "joint_blocks", None), nn.ModuleList):
        raise ConfigError(f"networks.lora_sd3 needs an SD3 / SD3.5 MMDiT (with joint_blocks); got "
                          f"{type(mmdit).__name__}. Use the network module of your model family.")
    layers = []
    for index, block in enumerate(mmdit.joint_blocks):
        for layer in find_layers(block, UNET_PREFIX, containers=BLOCK_CONTAINERS, path_prefix=f"joint_blocks.{index}."):
            layers.append((index, layer))
    return layers


def _emb_layers(mmdit: nn.Module, name: str) -> list[LayerRef]:
    if name == "x_embedder":  # a Conv2d, which layer_at does not take
        return find_layers(mmdit.x_embedder, UNET_PREFIX, path_prefix="x_embedder.", include_conv=True)
    refs = (layer_at(mmdit, path, UNET_PREFIX) for path in dict(EMB_LAYERS)[name])
    return [ref for ref in refs if ref is not None]


def _text_encoder_layers(text_encoders: Any, indices: Sequence[int]) -> list[LayerRef]:
    if text_encoders is None:
        return []
    encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    layers = []
    for index in indices:
        model = encoders[index] if index < len(encoders) else None
        if model is None:
            continue
        if index == T5_INDEX:
            layers += find_layers(model, TEXT_ENCODER_PREFIXES[index], containers=T5_CONTAINERS,
                                  text_encoder_index=index)
        else:
            layers += find_layers(model, TEXT_ENCODER_PREFIXES[index], containers=CLIP_CONTAINERS,
                                  path_prefix=hf_clip_path_prefix(model), text_encoder_index=index)
    return layers


def _split_dims(layer: LayerRef) -> tuple[int, ...] | None:
    """q, k, v row blocks of a joint block's qkv projection (attn and attn2)."""
    if layer.lora_name.endswith("_qkv"):
        return (layer.module.out_features // 3,) * 3
    return None


def _type_rank(lora_name: str, args: Mapping[str, Any], default: int) -> int:
    for key, substrings in TYPE_DIMS:
        if key in args and all(s in lora_name for s in substrings):
            return args[key]
    return default


def _loraplus(args: Mapping[str, Any]) -> LoRAPlusRatios:
    return LoRAPlusRatios(args.get("loraplus_lr_ratio"), args.get("loraplus_unet_lr_ratio"),
                          args.get("loraplus_text_encoder_lr_ratio"))


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoders: Any, mmdit: nn.Module, neuron_dropout: float | None = None,
                   **kwargs: Any) -> LoRANetwork:
    """A new SD3 LoRA (sd-scripts' signature; kwargs are the --network_args).
    text_encoders: [CLIP-L, CLIP-G, T5-XXL] (any may be None)."""
    args = parse_network_args(kwargs, SD3_ARGS, network_module=__name__)
    dim = 4 if network_dim is None else int(network_dim)
    if dim < 1:
        raise ConfigError(f"--network_dim must be >= 1, got {network_dim}")
    alpha = 1.0 if network_alpha is None else float(network_alpha)
    reg_dims = args.get("network_reg_dims")
    split_qkv = args.get("split_qkv", False)

    block_layers = _block_layers(mmdit)
    n_blocks = len(mmdit.joint_blocks)
    selected = (args["train_block_indices"].resolve(n_blocks, "train_block_indices")
                if "train_block_indices" in args else frozenset(range(n_blocks)))

    candidates: list[tuple[LayerRef, int, tuple[int, ...] | None]] = []  # (layer, rank before reg dims, split)
    for index, layer in block_layers:
        rank = _type_rank(layer.lora_name, args, dim) if index in selected else 0
        candidates.append((layer, rank, _split_dims(layer) if split_qkv else None))
    if "emb_dims" in args:
        for (name, _), rank in zip(EMB_LAYERS, args["emb_dims"]):
            candidates += [(layer, rank, None) for layer in _emb_layers(mmdit, name)]
    te_indices = [CLIP_L_INDEX, CLIP_G_INDEX] + ([T5_INDEX] if args.get("train_t5xxl", False) else [])
    candidates += [(layer, dim, None) for layer in _text_encoder_layers(text_encoders, te_indices)]

    targets: list[LoRATarget] = []
    skipped: list[str] = []
    for layer, rank, split in candidates:
        # network_reg_dims comes last and wins over per-type ranks and block selection.
        rule = last_match(reg_dims, layer.lora_name)
        rank = rule.value if rule is not None else rank
        if rank == 0:
            skipped.append(layer.lora_name)
        else:
            targets.append(layer.target(rank, alpha, split_dims=split))
    if skipped and args.get("verbose"):
        logger.info("%d layers skipped (rank 0): %s", len(skipped), ", ".join(skipped))

    return LoRANetwork(
        apply_reg_lrs(targets, args.get("network_reg_lrs")), family=FAMILY, multiplier=multiplier,
        dropout=neuron_dropout, rank_dropout=args.get("rank_dropout"), module_dropout=args.get("module_dropout"),
        loraplus=_loraplus(args), verbose=args.get("verbose", False),
    )


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any, text_encoders: Any,
                                mmdit: nn.Module, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                for_inference: bool = False, *, neuron_dropout: float | None = None,
                                **kwargs: Any) -> tuple[LoRANetwork, Mapping[str, torch.Tensor]]:
    """A network shaped like a LoRA file: its modules, ranks and alphas (for --dim_from_weights
    and --lora "path;mult"). The weights are not loaded here: call `load_weights` or
    `merge_to(weights_sd)`. A file for another model family or another SD3 variant is refused."""
    args = parse_network_args(kwargs, SD3_ARGS, network_module=__name__)
    shaping = sorted(k for k in args if k in RANK_KEYS)
    if shaping:
        raise ConfigError(f"--network_args {', '.join(shaping)}: the modules and ranks come from the weights file "
                          "here (--dim_from_weights / --lora); remove these keys.")
    if weights_sd is None:
        if file is None:
            raise ConfigError("create_network_from_weights needs a file or a state dict")
        weights_sd = load_lora_state_dict(file)
    source = str(file) if file is not None else "the given LoRA weights"
    saved = read_lora_modules(weights_sd, source)

    layers = [layer for _, layer in _block_layers(mmdit)]
    layers += [layer for name, _ in EMB_LAYERS for layer in _emb_layers(mmdit, name)]
    layers += _text_encoder_layers(text_encoders, [CLIP_L_INDEX, CLIP_G_INDEX, T5_INDEX])
    # Unknown names first: a file of another variant also has layers of other sizes (SD3.5 M's
    # 9-chunk modulation), and its names tell the user more than its shapes.
    known = {layer.lora_name for layer in layers}
    unmatched = [name for name in saved if name not in known]
    if unmatched:
        raise ModelFileError(mismatch_message(source, FAMILY, unknown=unmatched, total=len(saved),
                                              hint=_unmatched_hint(unmatched, len(mmdit.joint_blocks))))
    targets, _ = targets_from_weights(layers, saved, source)

    network = LoRANetwork(
        apply_reg_lrs(targets, args.get("network_reg_lrs")), family=FAMILY, multiplier=multiplier,
        dropout=None if for_inference else neuron_dropout,
        rank_dropout=None if for_inference else args.get("rank_dropout"),
        module_dropout=None if for_inference else args.get("module_dropout"),
        loraplus=_loraplus(args), verbose=args.get("verbose", False),
    )
    if for_inference:
        network.requires_grad_(False)
    return network, weights_sd


def expand_text_encoder_lrs(text_encoder_lr: float | Sequence[float] | None) -> list[float] | None:
    """--text_encoder_lr for [CLIP-L, CLIP-G, T5] as the SD3 guide says: one value for all
    three; two values are CLIP-L and CLIP-G, and T5 takes the second; three are one each."""
    if text_encoder_lr is None:
        return None
    values = [float(text_encoder_lr)] if isinstance(text_encoder_lr, (int, float)) else \
        [float(v) for v in text_encoder_lr]
    if not values:
        return None
    if len(values) > 3:
        raise ConfigError(f"--text_encoder_lr takes 1 to 3 values for SD3 (CLIP-L, CLIP-G, T5-XXL); got "
                          f"{len(values)}.")
    if len(values) == 1:
        return values * 3
    return values if len(values) == 3 else [values[0], values[1], values[1]]


def _unmatched_hint(unmatched: Sequence[str], n_blocks: int) -> str | None:
    if any("_x_block_attn2_" in n for n in unmatched):
        return ("It has x_block attn2 modules, which only SD3.5 Medium has: it was trained on SD3.5 Medium; use "
                "it with that model.")
    indices = [int(m.group(1)) for n in unmatched if (m := re.match(r"lora_unet_joint_blocks_(\d+)_", n))]
    if indices and max(indices) >= n_blocks:
        return (f"It has joint_blocks up to {max(indices)}, but this model has {n_blocks} (SD3 M and SD3.5 M have "
                "24, SD3.5 L 38): it was trained on another SD3 variant.")
    te = [i for i, prefix in TEXT_ENCODER_PREFIXES.items() if any(n.startswith(prefix + "_") for n in unmatched)]
    if te:
        names = ", ".join(f"{TEXT_ENCODER_PREFIXES[i]}_ ({TEXT_ENCODER_NAMES[i]})" for i in te)
        return f"It has text-encoder modules {names} for a text encoder that was not given."
    return None
