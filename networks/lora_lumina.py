"""LoRA for Lumina Image 2.0: targets and defaults only (FORMATS 4.4).

Use with `--network_module networks.lora_lumina`. The LoRA math, saving, loading and optimizer
groups live in networks/lora_core.py; the steps from candidates to a network in networks/lora_build.py.

Targets: every Linear inside JointTransformerBlock and FinalLayer (180 modules on the 2B
model), named after the checkpoint keys: `lora_unet_layers_0_attention_qkv`,
`lora_unet_noise_refiner_1_adaLN_modulation_1`, `lora_unet_context_refiner_0_feed_forward_w2`,
`lora_unet_final_layer_linear`... `embedder_dims` adds the input embedders. Gemma2 LoRA
modules (`lora_te_layers_0_self_attn_q_proj`, `lora_te_layers_0_mlp_gate_proj`...) are created
when a Gemma2 model is given; they are only trained and saved when the trainer applies the
text-encoder part (not with --network_train_unet_only).

Per-type ranks (network_args attn_dim, mod_dim, refiner_dim, mlp_dim) go to the first type,
in that order, whose name part occurs in the LoRA name: "attention", "modulation", "refiner",
"feed_forward". sd-scripts checks attention, mlp, modulation, refiner, but looks for "mlp",
which no Lumina layer has: its mlp_dim does nothing, and refiner_dim sets the refiners'
feed-forward layers. Here mlp_dim sets the main layers' feed-forward as the guide documents,
and it is checked after refiner_dim so the refiners get exactly sd-scripts' ranks (with all four
keys given, each of them has an effect). network_reg_dims (the last matching pattern,
re.search on the LoRA name) comes last and wins over everything.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from library.errors import ConfigError
from networks.lora_core import LayerRef, LoRANetwork, find_layers, layer_at
from networks.lora_build import (Candidate, build_network, rank_and_alpha, rank_for_type, read_saved_lora,
                                 targets_for_saved, targets_from_candidates, text_encoder_at)
from networks.network_args import (COMMON_LORA_ARGS, ArgSpec, parse_bool, parse_choice, parse_network_args,
                                   parse_rank, parse_rank_list, refused)

FAMILY = "Lumina Image 2.0"
UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"    # Gemma2, the only text encoder (index 0)
GEMMA2_INDEX = 0
DIT_CONTAINERS = ("JointTransformerBlock", "FinalLayer")
GEMMA2_CONTAINERS = ("Gemma2Attention", "Gemma2SdpaAttention", "Gemma2FlashAttention2", "Gemma2MLP")

# (network_args key, (name part,)), in the order they are checked (see the module docstring).
TYPE_DIMS = (
    ("attn_dim", ("attention",)),
    ("mod_dim", ("modulation",)),
    ("refiner_dim", ("refiner",)),
    ("mlp_dim", ("feed_forward",)),
)
# embedder_dims=[x, t, caption]: module paths per entry.
EMBEDDERS = (
    ("x_embedder", ("x_embedder",)),
    ("t_embedder", ("t_embedder.mlp.0", "t_embedder.mlp.2")),
    ("cap_embedder", ("cap_embedder.1",)),
)
# train_blocks -> LoRA-name prefixes of the blocks kept (None: every block and the final layer).
TRAIN_BLOCKS = {
    "all": None,
    "transformer": ("lora_unet_layers_",),
    "refiners": ("lora_unet_noise_refiner_", "lora_unet_context_refiner_"),
    "noise_refiner": ("lora_unet_noise_refiner_",),
    "context_refiner": ("lora_unet_context_refiner_",),
}

_NO_CONV = "Lumina Image 2.0 has no convolution layers; remove {}"
LUMINA_ARGS: tuple[ArgSpec, ...] = COMMON_LORA_ARGS + (
    ArgSpec("train_blocks", parse_choice(*TRAIN_BLOCKS), "which blocks get LoRA: " + ", ".join(TRAIN_BLOCKS)),
    *(ArgSpec(key, parse_rank, f"rank for the layers named *{part}* (0 = none)") for key, (part,) in TYPE_DIMS),
    ArgSpec("embedder_dims", parse_rank_list(3, [name for name, _ in EMBEDDERS]),
            "ranks for [x_embedder, t_embedder, cap_embedder] (0 = none)"),
    ArgSpec("split_qkv", parse_bool, "True: separate LoRAs for q, k and v inside each fused qkv layer"),
    ArgSpec("conv_dim", refused(_NO_CONV.format("conv_dim")), "refused"),
    ArgSpec("conv_alpha", refused(_NO_CONV.format("conv_alpha")), "refused"),
)
# Keys that shape the module set / ranks: meaningless when the file decides them.
RANK_KEYS = {"train_blocks", "embedder_dims", "split_qkv", "network_reg_dims", *(key for key, _ in TYPE_DIMS)}


def _check_dit(dit: nn.Module) -> None:
    for attr in ("layers", "noise_refiner", "context_refiner"):
        if not isinstance(getattr(dit, attr, None), nn.ModuleList):
            raise ConfigError(f"networks.lora_lumina needs a Lumina Image 2.0 Next-DiT (with {attr}); got "
                              f"{type(dit).__name__}. Use the network module of your model family.")


def _block_layers(dit: nn.Module) -> list[LayerRef]:
    _check_dit(dit)
    return find_layers(dit, UNET_PREFIX, containers=DIT_CONTAINERS)


def _embedder_layers(dit: nn.Module, name: str) -> list[LayerRef]:
    paths = dict(EMBEDDERS)[name]
    return [ref for ref in (layer_at(dit, p, UNET_PREFIX) for p in paths) if ref is not None]


def _gemma2_layers(text_encoders: Any) -> list[LayerRef]:
    gemma2 = text_encoder_at(text_encoders, GEMMA2_INDEX)
    if gemma2 is None:
        return []
    return find_layers(gemma2, TEXT_ENCODER_PREFIX, containers=GEMMA2_CONTAINERS, text_encoder_index=GEMMA2_INDEX)


def _qkv_split(dit: nn.Module, layer: LayerRef) -> tuple[int, int, int]:
    """(q, k, v) output widths of a fused qkv layer (grouped-query: k and v are narrower)."""
    p = dit.params
    kv = p.n_kv_heads * p.head_dim
    return (layer.module.out_features - 2 * kv, kv, kv)


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoders: Any, lumina: nn.Module, neuron_dropout: float | None = None,
                   **kwargs: Any) -> LoRANetwork:
    """A new Lumina LoRA (sd-scripts' signature; kwargs are the --network_args)."""
    args = parse_network_args(kwargs, LUMINA_ARGS, network_module=__name__)
    dim, alpha = rank_and_alpha(network_dim, network_alpha)
    kept_blocks = TRAIN_BLOCKS[args.get("train_blocks", "all")]
    split_qkv = args.get("split_qkv", False)

    candidates: list[Candidate] = []
    for layer in _block_layers(lumina):
        if kept_blocks is None or layer.lora_name.startswith(kept_blocks):
            split = _qkv_split(lumina, layer) if split_qkv and layer.lora_name.endswith("_attention_qkv") else None
            candidates.append(Candidate(layer, rank_for_type(layer.lora_name, args, TYPE_DIMS, dim), split))
    if "embedder_dims" in args:
        for (name, _), rank in zip(EMBEDDERS, args["embedder_dims"]):
            candidates += [Candidate(layer, rank) for layer in _embedder_layers(lumina, name)]
    candidates += [Candidate(layer, dim) for layer in _gemma2_layers(text_encoders)]

    return build_network(targets_from_candidates(candidates, alpha, args), args, family=FAMILY,
                         multiplier=multiplier, neuron_dropout=neuron_dropout)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any, text_encoders: Any,
                                lumina: nn.Module, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                for_inference: bool = False, *, neuron_dropout: float | None = None,
                                **kwargs: Any) -> tuple[LoRANetwork, Mapping[str, torch.Tensor]]:
    """A network shaped like a LoRA file, for --dim_from_weights and --lora_weights "path;mult"
    (see networks/lora_build.py)."""
    args = parse_network_args(kwargs, LUMINA_ARGS, network_module=__name__)
    saved = read_saved_lora(file, weights_sd, args, rank_keys=RANK_KEYS,
                            options="--dim_from_weights / --lora_weights")

    layers = _block_layers(lumina)
    layers += [layer for name, _ in EMBEDDERS for layer in _embedder_layers(lumina, name)]
    layers += _gemma2_layers(text_encoders)
    targets = targets_for_saved(layers, saved, family=FAMILY, hint=_unmatched_hint)
    network = build_network(targets, args, family=FAMILY, multiplier=multiplier, neuron_dropout=neuron_dropout,
                            for_inference=for_inference)
    return network, saved.state_dict


def _unmatched_hint(unmatched: Sequence[str]) -> str | None:
    if any(n.startswith(TEXT_ENCODER_PREFIX + "_") for n in unmatched):
        return "It has Gemma2 text-encoder modules (lora_te_), but no Gemma2 model was given."
    return None
