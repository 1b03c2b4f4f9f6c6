"""LoRA for FLUX.1 (dev / schnell) and Chroma: targets and defaults only (FORMATS 4.2).

Use with `--network_module networks.lora_flux`. The LoRA math, saving, loading and
optimizer groups live in networks/lora_core.py; the steps from candidates to a network in
networks/lora_build.py.

Targets: every Linear in the double and single blocks (304 modules on FLUX.1, 228 on Chroma,
which has no modulation layers), named after the BFL checkpoint keys, e.g.
`lora_unet_double_blocks_0_img_attn_qkv`. `in_dims` adds the input embedders. CLIP-L LoRA
modules (`lora_te1_...`) are created when a CLIP-L model is given, T5-XXL ones (`lora_te3_...`)
with `train_t5xxl=True`; they are only trained and saved when the trainer applies the text
encoder part. `split_qkv=True` gives q, k, v (and the single blocks' MLP input) LoRAs of their
own, saved in the fused layout (see networks/lora_core.py LoRAModule). `ggpo_sigma`/`ggpo_beta`
turn on LoRA-GGPO.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from library.errors import ConfigError
from networks.lora_core import LayerRef, LoRANetwork, find_layers, layer_at
from networks.lora_build import (Candidate, build_network, clip_t5_layers, rank_and_alpha, rank_for_type,
                                 read_saved_lora, targets_for_saved, targets_from_candidates)
from networks.network_args import (COMMON_LORA_ARGS, ArgSpec, parse_block_selection, parse_bool, parse_choice,
                                   parse_network_args, parse_non_negative_float, parse_rank, parse_rank_list, refused)

FAMILY = "FLUX.1 / Chroma"
UNET_PREFIX = "lora_unet"
# Position in `text_encoders` -> LoRA prefix (sd-scripts: CLIP-L is te1, T5-XXL is te3).
CLIP_L_INDEX, T5_INDEX = 0, 1
TEXT_ENCODER_PREFIXES = {CLIP_L_INDEX: "lora_te1", T5_INDEX: "lora_te3"}

# Per-type ranks: the first key whose substrings all occur in the LoRA name (and that the
# user set) gives the rank. Order matters: "single_blocks"+"linear" before "modulation".
TYPE_DIMS = (
    ("img_attn_dim", ("img_attn",)),
    ("txt_attn_dim", ("txt_attn",)),
    ("img_mlp_dim", ("img_mlp",)),
    ("txt_mlp_dim", ("txt_mlp",)),
    ("img_mod_dim", ("img_mod",)),
    ("txt_mod_dim", ("txt_mod",)),
    ("single_dim", ("single_blocks", "linear")),
    ("single_mod_dim", ("modulation",)),
)
# in_dims=[img, time, vector, guidance, txt]: module paths per entry.
IN_LAYERS = (
    ("img_in", ("img_in",)),
    ("time_in", ("time_in.in_layer", "time_in.out_layer")),
    ("vector_in", ("vector_in.in_layer", "vector_in.out_layer")),
    ("guidance_in", ("guidance_in.in_layer", "guidance_in.out_layer")),
    ("txt_in", ("txt_in",)),
)

FLUX_ARGS: tuple[ArgSpec, ...] = COMMON_LORA_ARGS + (
    ArgSpec("train_blocks", parse_choice("all", "single", "double"), "which block kind gets LoRA"),
    *(ArgSpec(key, parse_rank, f"rank for layers matching {'+'.join(subs)} (0 = none)") for key, subs in TYPE_DIMS),
    ArgSpec("in_dims", parse_rank_list(5, [name for name, _ in IN_LAYERS]), "ranks for the input embedders"),
    ArgSpec("train_double_block_indices", parse_block_selection, '"all", "none" or e.g. 0,2,5-8'),
    ArgSpec("train_single_block_indices", parse_block_selection, '"all", "none" or e.g. 0,2,5-8'),
    ArgSpec("conv_dim", refused("FLUX and Chroma have no convolution layers; remove conv_dim"), "refused"),
    ArgSpec("conv_alpha", refused("FLUX and Chroma have no convolution layers; remove conv_alpha"), "refused"),
    ArgSpec("split_qkv", parse_bool, "separate LoRAs for q, k, v (and the single blocks' MLP input)"),
    ArgSpec("train_t5xxl", parse_bool, "also create T5-XXL LoRA modules (lora_te3_)"),
    ArgSpec("ggpo_sigma", parse_non_negative_float, "LoRA-GGPO weight-norm factor (with ggpo_beta)"),
    ArgSpec("ggpo_beta", parse_non_negative_float, "LoRA-GGPO gradient-norm factor (with ggpo_sigma)"),
)
# Keys that shape the module set / ranks: meaningless when the file decides them.
RANK_KEYS = {"train_blocks", "in_dims", "split_qkv", "train_double_block_indices", "train_single_block_indices",
             "network_reg_dims", *(key for key, _ in TYPE_DIMS)}


def _block_layers(flux: nn.Module) -> tuple[list[tuple[str, int, LayerRef]], dict[str, int]]:
    """(kind, block index, layer) for every Linear of every block, and the block counts."""
    for attr in ("double_blocks", "single_blocks"):
        if not isinstance(getattr(flux, attr, None), nn.ModuleList):
            raise ConfigError(f"networks.lora_flux needs a FLUX.1 or Chroma model (with {attr}); got "
                              f"{type(flux).__name__}. Use the network module of your model family.")
    layers, counts = [], {}
    for kind in ("double", "single"):
        blocks = getattr(flux, f"{kind}_blocks")
        counts[kind] = len(blocks)
        for index, block in enumerate(blocks):
            for layer in find_layers(block, UNET_PREFIX, path_prefix=f"{kind}_blocks.{index}."):
                layers.append((kind, index, layer))
    return layers, counts


def _in_layers(flux: nn.Module, name: str) -> list[LayerRef]:
    paths = dict(IN_LAYERS)[name]
    return [ref for ref in (layer_at(flux, p, UNET_PREFIX) for p in paths) if ref is not None]


def _split_dims(kind: str, layer: LayerRef) -> tuple[int, ...] | None:
    """Row blocks of the fused projections (from the layer sizes, so tiny models split too):
    double-block qkv = q, k, v; single-block linear1 = q, k, v, MLP input."""
    module = layer.module
    if kind == "double" and layer.lora_name.endswith("_attn_qkv"):
        return (module.out_features // 3,) * 3
    if kind == "single" and layer.lora_name.endswith("_linear1"):
        hidden = module.in_features
        return (hidden, hidden, hidden, module.out_features - 3 * hidden)
    return None


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoders: Any, flux: nn.Module, neuron_dropout: float | None = None,
                   **kwargs: Any) -> LoRANetwork:
    """A new FLUX/Chroma LoRA (sd-scripts' signature; kwargs are the --network_args)."""
    args = parse_network_args(kwargs, FLUX_ARGS, network_module=__name__)
    dim, alpha = rank_and_alpha(network_dim, network_alpha)

    block_layers, counts = _block_layers(flux)
    selected = {
        kind: (args[key].resolve(counts[kind], key) if key in args else frozenset(range(counts[kind])))
        for kind, key in (("double", "train_double_block_indices"), ("single", "train_single_block_indices"))
    }
    train_blocks = args.get("train_blocks", "all")

    split_qkv = args.get("split_qkv", False)
    candidates: list[Candidate] = []
    for kind, index, layer in block_layers:
        if train_blocks not in ("all", kind):
            continue
        rank = rank_for_type(layer.lora_name, args, TYPE_DIMS, dim) if index in selected[kind] else 0
        candidates.append(Candidate(layer, rank, _split_dims(kind, layer) if split_qkv else None))
    if "in_dims" in args:
        for (name, _), rank in zip(IN_LAYERS, args["in_dims"]):
            candidates += [Candidate(layer, rank) for layer in _in_layers(flux, name)]
    te_indices = [CLIP_L_INDEX, T5_INDEX] if args.get("train_t5xxl", False) else [CLIP_L_INDEX]
    te_layers = clip_t5_layers(text_encoders, te_indices, TEXT_ENCODER_PREFIXES, t5_index=T5_INDEX)
    candidates += [Candidate(layer, dim) for layer in te_layers]

    return build_network(targets_from_candidates(candidates, alpha, args), args, family=FAMILY,
                         multiplier=multiplier, neuron_dropout=neuron_dropout)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any, text_encoders: Any,
                                flux: nn.Module, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                for_inference: bool = False, *, neuron_dropout: float | None = None,
                                **kwargs: Any) -> tuple[LoRANetwork, Mapping[str, torch.Tensor]]:
    """A network shaped like a LoRA file, for --dim_from_weights and --lora "path;mult" (see
    networks/lora_build.py). A FLUX.1 file on Chroma is refused with that reason."""
    args = parse_network_args(kwargs, FLUX_ARGS, network_module=__name__)
    saved = read_saved_lora(file, weights_sd, args, rank_keys=RANK_KEYS, options="--dim_from_weights / --lora")

    block_layers, _ = _block_layers(flux)
    layers = [layer for _, _, layer in block_layers]
    layers += [layer for name, _ in IN_LAYERS for layer in _in_layers(flux, name)]
    layers += clip_t5_layers(text_encoders, [CLIP_L_INDEX, T5_INDEX], TEXT_ENCODER_PREFIXES, t5_index=T5_INDEX)
    targets = targets_for_saved(layers, saved, family=FAMILY, hint=_unmatched_hint)
    network = build_network(targets, args, family=FAMILY, multiplier=multiplier, neuron_dropout=neuron_dropout,
                            for_inference=for_inference)
    return network, saved.state_dict


def _unmatched_hint(unmatched: Sequence[str]) -> str | None:
    if any(n.endswith(("_img_mod_lin", "_txt_mod_lin", "_modulation_lin")) for n in unmatched):
        return ("It has modulation-layer modules, which FLUX.1 has and Chroma does not: it was trained on "
                "FLUX.1; use it with a FLUX.1 model.")
    te = [prefix for prefix in TEXT_ENCODER_PREFIXES.values() if any(n.startswith(prefix + "_") for n in unmatched)]
    if te:
        return (f"It has text-encoder modules ({', '.join(p + '_' for p in te)}) for a text encoder that was not "
                "given (CLIP-L is te1, T5-XXL is te3).")
    return None
