"""The steps every family's `create_network` / `create_network_from_weights` share.

A family module (networks/lora_<family>.py) decides which layers are candidates and at what
rank its own --network_args give them; this module turns that into a `LoRANetwork` the same
way for every family:

    create_network:               rank_and_alpha -> [Candidate...] -> targets_from_candidates -> build_network
    create_network_from_weights:  read_saved_lora -> [LayerRef...] -> targets_for_saved -> build_network

For the candidates themselves: `text_encoder_at` (sd-scripts' text_encoders argument),
`clip_t5_layers` (HF CLIP and T5 text encoders, as FLUX and SD3 have) and `rank_for_type`
(per-type rank keys such as img_attn_dim).

Both entry points keep sd-scripts' signatures. `create_network_from_weights` builds a network
shaped like a LoRA file (its modules, ranks and alphas), for --dim_from_weights and for applying
a LoRA at generation time; it does not load the weights (call `load_weights` or
`merge_to(weights_sd)`), and it refuses a file made for another model family.

networks/lora_core.py stays the one LoRA implementation; this module only composes its parts, and it
never looks at a family's layer names.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import torch

from library.errors import ConfigError, ModelFileError
from networks.lora_core import (LayerRef, LoRANetwork, LoRAPlusRatios, LoRATarget, SavedModule, find_layers,
                           hf_clip_path_prefix, load_lora_state_dict, mismatch_message, read_lora_modules,
                           targets_from_weights)
from networks.network_args import RegexRule, last_match

logger = logging.getLogger(__name__)

# sd-scripts' defaults when --network_dim / --network_alpha are not given.
DEFAULT_RANK = 4
DEFAULT_ALPHA = 1.0

# How network_reg_dims / network_reg_lrs find the rule for a layer, given its LoRA name. Every
# family but Anima uses `last_match` (re.search on the LoRA name); Anima matches the original
# dotted module name with re.fullmatch, as sd-scripts' Anima module does.
RuleLookup = Callable[[Sequence[RegexRule] | None, str], RegexRule | None]

# sd-scripts gives a text encoder LoRA only on the Linears inside these transformers modules.
CLIP_CONTAINERS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
T5_CONTAINERS = ("T5Attention", "T5DenseGatedActDense", "T5DenseActDense")


class Candidate(NamedTuple):
    """A layer that may get a LoRA, at the rank the family's own options give it (0: none),
    before network_reg_dims. split_dims: split_qkv's row blocks (see LoRATarget)."""

    layer: LayerRef
    rank: int
    split_dims: tuple[int, ...] | None = None


class SavedLoRA(NamedTuple):
    """A LoRA file as create_network_from_weights sees it."""

    state_dict: Mapping[str, torch.Tensor]
    source: str                       # the file, or a stand-in name, for messages
    modules: dict[str, SavedModule]   # LoRA name -> rank, alpha and shapes, in file order


def text_encoder_at(text_encoders: Any, index: int) -> Any:
    """The model at `index` of sd-scripts' `text_encoders` argument, or None. sd-scripts passes a
    list (with None for an encoder that is not loaded) or, for one encoder, the bare model."""
    if text_encoders is None:
        return None
    encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    return encoders[index] if index < len(encoders) else None


def clip_t5_layers(text_encoders: Any, indices: Iterable[int], prefixes: Mapping[int, str], *,
                   t5_index: int) -> list[LayerRef]:
    """The LoRA candidates of the CLIP and T5 text encoders at `indices` of `text_encoders` (the one
    at t5_index is T5, the others CLIP), named `prefixes[index]` + their checkpoint key path."""
    layers: list[LayerRef] = []
    for index in indices:
        model = text_encoder_at(text_encoders, index)
        if model is None:
            continue
        if index == t5_index:
            layers += find_layers(model, prefixes[index], containers=T5_CONTAINERS, text_encoder_index=index)
        else:
            layers += find_layers(model, prefixes[index], containers=CLIP_CONTAINERS,
                                  path_prefix=hf_clip_path_prefix(model), text_encoder_index=index)
    return layers


def rank_for_type(lora_name: str, args: Mapping[str, Any], type_dims: Sequence[tuple[str, Sequence[str]]],
                  default: int) -> int:
    """A family's per-type rank (img_attn_dim=8 ...): the value of the first (key, name parts) of
    `type_dims`, in the family's order, that the user set and whose parts all occur in the LoRA
    name; else `default`."""
    for key, parts in type_dims:
        if key in args and all(part in lora_name for part in parts):
            return args[key]
    return default


def rank_and_alpha(network_dim: int | None, network_alpha: float | None) -> tuple[int, float]:
    """--network_dim and --network_alpha with sd-scripts' defaults; a rank below 1 is refused."""
    dim = DEFAULT_RANK if network_dim is None else int(network_dim)
    if dim < 1:
        raise ConfigError(f"--network_dim must be >= 1, got {network_dim}")
    alpha = DEFAULT_ALPHA if network_alpha is None else float(network_alpha)
    return dim, alpha


def targets_from_candidates(candidates: Iterable[Candidate], alpha: float, args: Mapping[str, Any], *,
                            find_rule: RuleLookup = last_match, verbose: bool | None = None) -> list[LoRATarget]:
    """The LoRA targets among `candidates`, in their order. network_reg_dims comes last and wins
    over the family's per-type ranks and block selection; a layer whose rank ends at 0 gets no
    LoRA. With `verbose` (default: the verbose network arg) the skipped layers are logged."""
    reg_dims = args.get("network_reg_dims")
    targets: list[LoRATarget] = []
    skipped: list[str] = []
    for layer, rank, split_dims in candidates:
        rule = find_rule(reg_dims, layer.lora_name)
        rank = rule.value if rule is not None else rank
        if rank == 0:
            skipped.append(layer.lora_name)
        else:
            targets.append(layer.target(rank, alpha, split_dims=split_dims))
    if skipped and (args.get("verbose", False) if verbose is None else verbose):
        logger.info("%d layers skipped (rank 0): %s", len(skipped), ", ".join(skipped))
    return targets


def build_network(targets: Sequence[LoRATarget], args: Mapping[str, Any], *, family: str, multiplier: float,
                  neuron_dropout: float | None, for_inference: bool = False,
                  find_rule: RuleLookup = last_match) -> LoRANetwork:
    """The family's LoRANetwork with the options every family takes from --network_args:
    network_reg_lrs, rank/module dropout, LoRA+, verbose, and LoRA-GGPO (a family that does not
    declare ggpo_* never has them in `args`). for_inference (--lora at generation time): no
    dropout and no GGPO noise, and the LoRA weights frozen."""
    training = not for_inference
    reg_lrs = args.get("network_reg_lrs")
    # Like lora.apply_reg_lrs, but with the family's rule lookup.
    targets = [t if (rule := find_rule(reg_lrs, t.lora_name)) is None else replace(t, lr=rule.value)
               for t in targets]
    network = LoRANetwork(
        targets, family=family, multiplier=multiplier,
        dropout=neuron_dropout if training else None,
        rank_dropout=args.get("rank_dropout") if training else None,
        module_dropout=args.get("module_dropout") if training else None,
        loraplus=LoRAPlusRatios(args.get("loraplus_lr_ratio"), args.get("loraplus_unet_lr_ratio"),
                                args.get("loraplus_text_encoder_lr_ratio")),
        verbose=args.get("verbose", False),
        ggpo_sigma=args.get("ggpo_sigma") if training else None,
        ggpo_beta=args.get("ggpo_beta") if training else None,
    )
    if for_inference:
        network.requires_grad_(False)
    return network


def read_saved_lora(file: str | os.PathLike | None, weights_sd: Mapping[str, torch.Tensor] | None,
                    args: Mapping[str, Any], *, rank_keys: Iterable[str], options: str) -> SavedLoRA:
    """The LoRA a network is to be shaped like: `weights_sd`, else read from `file`. The file
    decides the modules and ranks, so the family's `rank_keys` in --network_args are refused;
    `options` names the command-line options that load a LoRA this way, for that message."""
    rank_keys = set(rank_keys)
    shaping = sorted(k for k in args if k in rank_keys)
    if shaping:
        raise ConfigError(f"--network_args {', '.join(shaping)}: the modules and ranks come from the weights file "
                          f"here ({options}); remove these keys.")
    if weights_sd is None:
        if file is None:
            raise ConfigError("create_network_from_weights needs a file or a state dict")
        weights_sd = load_lora_state_dict(file)
    source = str(file) if file is not None else "the given LoRA weights"
    return SavedLoRA(weights_sd, source, read_lora_modules(weights_sd, source))


def targets_for_saved(layers: Sequence[LayerRef], saved: SavedLoRA, *, family: str,
                      hint: Callable[[list[str]], str | None], names_before_sizes: bool = False) -> list[LoRATarget]:
    """Targets with the file's ranks and alphas on the model's `layers`. A file module that no
    layer has is refused, with the family's `hint(unmatched names)` on the likely reason; so is a
    module whose layer has other sizes. names_before_sizes: look for unknown names first (for a
    family whose variants differ in both names and sizes, where the names tell the user more)."""

    def refuse(unmatched: list[str]) -> ModelFileError:
        return ModelFileError(mismatch_message(saved.source, family, unknown=unmatched, total=len(saved.modules),
                                               hint=hint(unmatched)))

    if names_before_sizes:
        known = {layer.lora_name for layer in layers}
        unmatched = [name for name in saved.modules if name not in known]
        if unmatched:
            raise refuse(unmatched)
    targets, unmatched = targets_from_weights(layers, saved.modules, saved.source)
    if unmatched:
        raise refuse(unmatched)
    return targets
