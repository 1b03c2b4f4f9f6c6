"""LoRA for SD3 / SD3.5 (Medium, 3.5 Medium, 3.5 Large): targets and defaults only (FORMATS 4.3).

Use with `--network_module networks.lora_sd3`. The LoRA math, saving, loading, merging and
optimizer groups live in networks/lora_core.py; the steps from candidates to a network in
networks/lora_build.py.

Targets: every Linear inside the joint blocks' `SingleDiTBlock`s, named after the SAI
checkpoint keys, e.g. `lora_unet_joint_blocks_0_context_block_attn_qkv`,
`lora_unet_joint_blocks_0_x_block_adaLN_modulation_1`, and `..._x_block_attn2_qkv` /
`_attn2_proj` on SD3.5 Medium (237 modules on SD3 M, 263 on SD3.5 M, 377 on SD3.5 L).
`emb_dims` adds the embedders and the final layer (the x_embedder is a 2x2 Conv2d).

Text encoders come as [CLIP-L, CLIP-G, T5-XXL]: CLIP-L (`lora_te1_`) and CLIP-G (`lora_te2_`)
modules are created when those models are given, T5 (`lora_te3_`) ones with
`train_t5xxl=True`; they are only trained and saved when the trainer applies the text encoder
part. `split_qkv=True` gives q, k and v of every qkv projection LoRAs of their own, saved in
the fused layout at the trained strength (see networks/lora_core.py LoRAModule).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from library.errors import ConfigError
from networks.lora_core import LayerRef, LoRANetwork, find_layers, layer_at
from networks.lora_build import (Candidate, build_network, clip_t5_layers, rank_and_alpha, rank_for_type,
                                 read_saved_lora, targets_for_saved, targets_from_candidates)
from networks.network_args import (COMMON_LORA_ARGS, ArgSpec, parse_block_selection, parse_bool, parse_network_args,
                                   parse_rank, parse_rank_list, refused)

FAMILY = "SD3 / SD3.5"
UNET_PREFIX = "lora_unet"
# Position in `text_encoders` -> LoRA prefix (sd-scripts: CLIP-L te1, CLIP-G te2, T5-XXL te3).
CLIP_L_INDEX, CLIP_G_INDEX, T5_INDEX = 0, 1, 2
TEXT_ENCODER_PREFIXES = {CLIP_L_INDEX: "lora_te1", CLIP_G_INDEX: "lora_te2", T5_INDEX: "lora_te3"}
TEXT_ENCODER_NAMES = {CLIP_L_INDEX: "CLIP-L", CLIP_G_INDEX: "CLIP-G", T5_INDEX: "T5-XXL"}
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


def _split_dims(layer: LayerRef) -> tuple[int, ...] | None:
    """q, k, v row blocks of a joint block's qkv projection (attn and attn2)."""
    if layer.lora_name.endswith("_qkv"):
        return (layer.module.out_features // 3,) * 3
    return None


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoders: Any, mmdit: nn.Module, neuron_dropout: float | None = None,
                   **kwargs: Any) -> LoRANetwork:
    """A new SD3 LoRA (sd-scripts' signature; kwargs are the --network_args).
    text_encoders: [CLIP-L, CLIP-G, T5-XXL] (any may be None)."""
    args = parse_network_args(kwargs, SD3_ARGS, network_module=__name__)
    dim, alpha = rank_and_alpha(network_dim, network_alpha)
    split_qkv = args.get("split_qkv", False)

    block_layers = _block_layers(mmdit)
    n_blocks = len(mmdit.joint_blocks)
    selected = (args["train_block_indices"].resolve(n_blocks, "train_block_indices")
                if "train_block_indices" in args else frozenset(range(n_blocks)))

    candidates: list[Candidate] = []
    for index, layer in block_layers:
        rank = rank_for_type(layer.lora_name, args, TYPE_DIMS, dim) if index in selected else 0
        candidates.append(Candidate(layer, rank, _split_dims(layer) if split_qkv else None))
    if "emb_dims" in args:
        for (name, _), rank in zip(EMB_LAYERS, args["emb_dims"]):
            candidates += [Candidate(layer, rank) for layer in _emb_layers(mmdit, name)]
    te_indices = [CLIP_L_INDEX, CLIP_G_INDEX] + ([T5_INDEX] if args.get("train_t5xxl", False) else [])
    te_layers = clip_t5_layers(text_encoders, te_indices, TEXT_ENCODER_PREFIXES, t5_index=T5_INDEX)
    candidates += [Candidate(layer, dim) for layer in te_layers]

    return build_network(targets_from_candidates(candidates, alpha, args), args, family=FAMILY,
                         multiplier=multiplier, neuron_dropout=neuron_dropout)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any, text_encoders: Any,
                                mmdit: nn.Module, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                for_inference: bool = False, *, neuron_dropout: float | None = None,
                                **kwargs: Any) -> tuple[LoRANetwork, Mapping[str, torch.Tensor]]:
    """A network shaped like a LoRA file, for --dim_from_weights and --lora "path;mult" (see
    networks/lora_build.py). A file for another SD3 variant is refused too."""
    args = parse_network_args(kwargs, SD3_ARGS, network_module=__name__)
    saved = read_saved_lora(file, weights_sd, args, rank_keys=RANK_KEYS, options="--dim_from_weights / --lora")

    layers = [layer for _, layer in _block_layers(mmdit)]
    layers += [layer for name, _ in EMB_LAYERS for layer in _emb_layers(mmdit, name)]
    layers += clip_t5_layers(text_encoders, [CLIP_L_INDEX, CLIP_G_INDEX, T5_INDEX], TEXT_ENCODER_PREFIXES,
                             t5_index=T5_INDEX)
    # Unknown names first: a file of another variant also has layers of other sizes (SD3.5 M's
    # 9-chunk modulation), and its names tell the user more than its shapes.
    targets = targets_for_saved(layers, saved, family=FAMILY, names_before_sizes=True,
                                hint=lambda unmatched: _unmatched_hint(unmatched, len(mmdit.joint_blocks)))
    network = build_network(targets, args, family=FAMILY, multiplier=multiplier, neuron_dropout=neuron_dropout,
                            for_inference=for_inference)
    return network, saved.state_dict


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
