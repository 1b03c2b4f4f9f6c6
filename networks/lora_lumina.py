"""LoRA for Lumina Image 2.0: targets and defaults only (FORMATS 4.4).

Use with `--network_module networks.lora_lumina`. The LoRA math, saving, loading and optimizer
groups live in networks/lora.py.

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

import logging
import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from library.errors import ConfigError, ModelFileError
from networks.lora import (LayerRef, LoRANetwork, LoRAPlusRatios, LoRATarget, apply_reg_lrs, find_layers, layer_at,
                           load_lora_state_dict, mismatch_message, read_lora_modules, targets_from_weights)
from networks.network_args import (COMMON_LORA_ARGS, ArgSpec, last_match, parse_bool, parse_choice,
                                   parse_network_args, parse_rank, parse_rank_list, refused)

logger = logging.getLogger(__name__)

FAMILY = "Lumina Image 2.0"
UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"    # Gemma2, the only text encoder (index 0)
GEMMA2_INDEX = 0
DIT_CONTAINERS = ("JointTransformerBlock", "FinalLayer")
GEMMA2_CONTAINERS = ("Gemma2Attention", "Gemma2SdpaAttention", "Gemma2FlashAttention2", "Gemma2MLP")

# (network_args key, name part), in the order they are checked (see the module docstring).
TYPE_DIMS = (
    ("attn_dim", "attention"),
    ("mod_dim", "modulation"),
    ("refiner_dim", "refiner"),
    ("mlp_dim", "feed_forward"),
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
    *(ArgSpec(key, parse_rank, f"rank for the layers named *{part}* (0 = none)") for key, part in TYPE_DIMS),
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
    if text_encoders is None:
        return []
    encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    gemma2 = encoders[GEMMA2_INDEX] if encoders else None
    if gemma2 is None:
        return []
    return find_layers(gemma2, TEXT_ENCODER_PREFIX, containers=GEMMA2_CONTAINERS, text_encoder_index=GEMMA2_INDEX)


def _type_rank(lora_name: str, args: Mapping[str, Any], default: int) -> int:
    for key, part in TYPE_DIMS:
        if key in args and part in lora_name:
            return args[key]
    return default


def _qkv_split(dit: nn.Module, layer: LayerRef) -> tuple[int, int, int]:
    """(q, k, v) output widths of a fused qkv layer (grouped-query: k and v are narrower)."""
    p = dit.params
    kv = p.n_kv_heads * p.head_dim
    return (layer.module.out_features - 2 * kv, kv, kv)


def _loraplus(args: Mapping[str, Any]) -> LoRAPlusRatios:
    return LoRAPlusRatios(args.get("loraplus_lr_ratio"), args.get("loraplus_unet_lr_ratio"),
                          args.get("loraplus_text_encoder_lr_ratio"))


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoders: Any, lumina: nn.Module, neuron_dropout: float | None = None,
                   **kwargs: Any) -> LoRANetwork:
    """A new Lumina LoRA (sd-scripts' signature; kwargs are the --network_args)."""
    args = parse_network_args(kwargs, LUMINA_ARGS, network_module=__name__)
    dim = 4 if network_dim is None else int(network_dim)
    if dim < 1:
        raise ConfigError(f"--network_dim must be >= 1, got {network_dim}")
    alpha = 1.0 if network_alpha is None else float(network_alpha)
    kept_blocks = TRAIN_BLOCKS[args.get("train_blocks", "all")]
    split_qkv = args.get("split_qkv", False)

    candidates: list[tuple[LayerRef, int]] = []  # (layer, rank before network_reg_dims)
    for layer in _block_layers(lumina):
        if kept_blocks is None or layer.lora_name.startswith(kept_blocks):
            candidates.append((layer, _type_rank(layer.lora_name, args, dim)))
    if "embedder_dims" in args:
        for (name, _), rank in zip(EMBEDDERS, args["embedder_dims"]):
            candidates += [(layer, rank) for layer in _embedder_layers(lumina, name)]
    candidates += [(layer, dim) for layer in _gemma2_layers(text_encoders)]

    targets: list[LoRATarget] = []
    skipped: list[str] = []
    for layer, rank in candidates:
        rule = last_match(args.get("network_reg_dims"), layer.lora_name)
        rank = rule.value if rule is not None else rank
        if rank == 0:
            skipped.append(layer.lora_name)
            continue
        split = _qkv_split(lumina, layer) if split_qkv and layer.lora_name.endswith("_attention_qkv") else None
        targets.append(layer.target(rank, alpha, split_dims=split))
    if skipped and args.get("verbose"):
        logger.info("%d layers skipped (rank 0): %s", len(skipped), ", ".join(skipped))

    return LoRANetwork(
        apply_reg_lrs(targets, args.get("network_reg_lrs")), family=FAMILY, multiplier=multiplier,
        dropout=neuron_dropout, rank_dropout=args.get("rank_dropout"), module_dropout=args.get("module_dropout"),
        loraplus=_loraplus(args), verbose=args.get("verbose", False),
    )


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any, text_encoders: Any,
                                lumina: nn.Module, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                for_inference: bool = False, *, neuron_dropout: float | None = None,
                                **kwargs: Any) -> tuple[LoRANetwork, Mapping[str, torch.Tensor]]:
    """A network shaped like a LoRA file: its modules, ranks and alphas (for --dim_from_weights
    and --lora_weights "path;mult"). The weights are not loaded here: call `load_weights` or
    `merge_to(weights_sd)`. A file for another model family is refused."""
    args = parse_network_args(kwargs, LUMINA_ARGS, network_module=__name__)
    shaping = sorted(k for k in args if k in RANK_KEYS)
    if shaping:
        raise ConfigError(f"--network_args {', '.join(shaping)}: the modules and ranks come from the weights file "
                          "here (--dim_from_weights / --lora_weights); remove these keys.")
    if weights_sd is None:
        if file is None:
            raise ConfigError("create_network_from_weights needs a file or a state dict")
        weights_sd = load_lora_state_dict(file)
    source = str(file) if file is not None else "the given LoRA weights"
    saved = read_lora_modules(weights_sd, source)

    layers = _block_layers(lumina)
    layers += [layer for name, _ in EMBEDDERS for layer in _embedder_layers(lumina, name)]
    layers += _gemma2_layers(text_encoders)
    targets, unmatched = targets_from_weights(layers, saved, source)
    if unmatched:
        raise ModelFileError(mismatch_message(source, FAMILY, unknown=unmatched, total=len(saved),
                                              hint=_unmatched_hint(unmatched)))

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


def _unmatched_hint(unmatched: Sequence[str]) -> str | None:
    if any(n.startswith(TEXT_ENCODER_PREFIX + "_") for n in unmatched):
        return "It has Gemma2 text-encoder modules (lora_te_), but no Gemma2 model was given."
    return None
