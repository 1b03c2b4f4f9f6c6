"""LoRA for Anima: targets and defaults only (FORMATS 4.5).

Use with `--network_module networks.lora_anima`. The LoRA math, saving, loading and optimizer
groups live in networks/lora_core.py; the steps from candidates to a network in networks/lora_build.py.

Candidates: every Linear inside the DiT's `Block`, `PatchEmbed`, `TimestepEmbedding` and
`FinalLayer` modules (plus `LLMAdapterTransformerBlock` with `train_llm_adapter=True`), and in
Qwen3's attention and MLP modules when a Qwen3 model is given (`lora_te_...`; they are trained and
saved only when the trainer applies the text-encoder part). Each candidate is known by its
dotted original name (`blocks.0.self_attn.q_proj`, `llm_adapter.blocks.0.mlp.0`,
`layers.0.mlp.gate_proj` for Qwen3); the built-in exclude pattern
`.*(_modulation|_norm|_embedder|final_layer).*` plus `exclude_patterns` drop candidates whose
name they fully match (`re.fullmatch`) unless an `include_patterns` entry matches too. The
default is 280 modules on a 28-block model, e.g. `lora_unet_blocks_0_self_attn_q_proj`; the
adapter adds 6 x 10. `network_reg_dims` / `network_reg_lrs` also fullmatch the original name;
the last matching pattern wins (as for every family here; sd-scripts' code takes the first).
"""

from __future__ import annotations

import ast
import logging
import os
import re
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from library.errors import ConfigError
from networks.lora_core import LayerRef, LoRANetwork, to_lora_name
from networks.lora_build import (DEFAULT_ALPHA, DEFAULT_RANK, Candidate, RuleLookup, build_network, rank_and_alpha,
                                 read_saved_lora, targets_for_saved, targets_from_candidates, text_encoder_at)
from networks.network_args import COMMON_LORA_ARGS, ArgSpec, RegexRule, parse_bool, parse_network_args

logger = logging.getLogger(__name__)

FAMILY = "Anima"
UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"  # Qwen3, the only text encoder (index 0)
QWEN3_INDEX = 0
DIT_CONTAINERS = ("Block", "PatchEmbed", "TimestepEmbedding", "FinalLayer")
ADAPTER_CONTAINERS = ("LLMAdapterTransformerBlock",)
QWEN3_CONTAINERS = ("Qwen3Attention", "Qwen3MLP", "Qwen3SdpaAttention", "Qwen3FlashAttention2")
DEFAULT_EXCLUDE = r".*(_modulation|_norm|_embedder|final_layer).*"


def parse_pattern_list(value: Any) -> list[re.Pattern]:
    """A Python-literal list of regular expressions ("['.*mlp.*', '.*final_layer.*']"); a single
    string is one pattern."""
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        text = str(value).strip()
        try:
            items = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError("expected a Python list of quoted patterns, e.g. \"['.*mlp.*']\"") from None
        if isinstance(items, str):
            items = [items]
    if not isinstance(items, list) or not all(isinstance(p, str) for p in items):
        raise ValueError("expected a Python list of quoted patterns, e.g. \"['.*mlp.*']\"")
    patterns = []
    for p in items:
        try:
            patterns.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"'{p}' is not a valid regular expression ({e})") from None
    return patterns


ANIMA_ARGS: tuple[ArgSpec, ...] = COMMON_LORA_ARGS + (
    ArgSpec("train_llm_adapter", parse_bool, "True to add LoRA to the LLM adapter's transformer blocks"),
    ArgSpec("exclude_patterns", parse_pattern_list, "regexes (fullmatch on original names) of modules to leave out"),
    ArgSpec("include_patterns", parse_pattern_list, "regexes of modules to keep even when an exclude matches"),
)
# Keys that shape the module set / ranks: meaningless when the file decides them.
RANK_KEYS = {"train_llm_adapter", "exclude_patterns", "include_patterns", "network_reg_dims"}


# ---------------------------------------------------------------------------------------------
# Candidates.

def _layers_in(root: nn.Module, containers: Sequence[str], prefix: str, text_encoder_index: int | None,
               path_prefix: str = "") -> list[tuple[str, LayerRef]]:
    """(original dotted name, layer) for every Linear inside modules of the given class names."""
    found, seen = [], set()
    for scope_name, scope in root.named_modules():
        if type(scope).__name__ not in containers:
            continue
        for child_name, child in scope.named_modules():
            if not isinstance(child, nn.Linear) or id(child) in seen:
                continue
            seen.add(id(child))
            original = path_prefix + ".".join(p for p in (scope_name, child_name) if p)
            found.append((original, LayerRef(to_lora_name(prefix, original), child, text_encoder_index)))
    return found


def _dit_layers(dit: nn.Module, with_adapter: bool) -> list[tuple[str, LayerRef]]:
    if not isinstance(getattr(dit, "blocks", None), nn.ModuleList) or not hasattr(dit, "final_layer"):
        raise ConfigError(f"networks.lora_anima needs an Anima DiT (with blocks and final_layer); got "
                          f"{type(dit).__name__}. Use the network module of your model family.")
    layers = _layers_in(dit, DIT_CONTAINERS, UNET_PREFIX, None)
    if with_adapter:
        adapter = getattr(dit, "llm_adapter", None)
        if adapter is None:
            raise ConfigError("train_llm_adapter=True, but this DiT has no LLM adapter.")
        layers += _layers_in(adapter, ADAPTER_CONTAINERS, UNET_PREFIX, None, path_prefix="llm_adapter.")
    return layers


def _qwen3_layers(text_encoders: Any) -> list[tuple[str, LayerRef]]:
    qwen3 = text_encoder_at(text_encoders, QWEN3_INDEX)
    if qwen3 is None:
        return []
    return _layers_in(qwen3, QWEN3_CONTAINERS, TEXT_ENCODER_PREFIX, QWEN3_INDEX)


def _on_original_names(candidates: Sequence[tuple[str, LayerRef]]) -> RuleLookup:
    """network_reg_dims / network_reg_lrs for Anima: the last rule whose pattern fullmatches the
    layer's original dotted name (not its LoRA name, as in the other families)."""
    originals = {layer.lora_name: original for original, layer in candidates}

    def find_rule(rules: Sequence[RegexRule] | None, lora_name: str) -> RegexRule | None:
        found = None
        for rule in rules or ():
            if rule.pattern.fullmatch(originals[lora_name]):
                found = rule
        return found

    return find_rule


# ---------------------------------------------------------------------------------------------
# sd-scripts' entry points.

def _select(args: Mapping[str, Any], unet: nn.Module, text_encoders: Any
            ) -> tuple[list[tuple[str, LayerRef]], list[str]]:
    """The pattern rules: (original name, layer) of every candidate they keep, and the original
    names they leave out."""
    exclude = [re.compile(DEFAULT_EXCLUDE), *args.get("exclude_patterns", [])]
    include = args.get("include_patterns", [])
    kept, excluded = [], []
    for original, layer in _dit_layers(unet, args.get("train_llm_adapter", False)) + _qwen3_layers(text_encoders):
        if any(p.fullmatch(original) for p in exclude) and not any(p.fullmatch(original) for p in include):
            excluded.append(original)
        else:
            kept.append((original, layer))
    return kept, excluded


def target_names(unet: nn.Module, text_encoders: Any = None, network_dim: int | None = None,
                 **kwargs: Any) -> list[str]:
    """The dotted original names of the layers `create_network` would give a LoRA with these
    --network_args, without creating anything (lets a trainer check options against them early)."""
    args = parse_network_args(kwargs, ANIMA_ARGS, network_module=__name__)
    dim = DEFAULT_RANK if network_dim is None else int(network_dim)
    kept, _ = _select(args, unet, text_encoders)
    originals = {layer.lora_name: original for original, layer in kept}
    # The alpha does not change which layers are chosen.
    targets = targets_from_candidates([Candidate(layer, dim) for _, layer in kept], DEFAULT_ALPHA, args,
                                      find_rule=_on_original_names(kept), verbose=False)
    return [originals[t.lora_name] for t in targets]


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoders: Any, unet: nn.Module, neuron_dropout: float | None = None,
                   **kwargs: Any) -> LoRANetwork:
    """A new Anima LoRA (sd-scripts' signature; kwargs are the --network_args)."""
    args = parse_network_args(kwargs, ANIMA_ARGS, network_module=__name__)
    dim, alpha = rank_and_alpha(network_dim, network_alpha)

    kept, excluded = _select(args, unet, text_encoders)
    if args.get("verbose", False):
        logger.info("%d layers excluded by pattern: %s", len(excluded), ", ".join(excluded))
    find_rule = _on_original_names(kept)
    targets = targets_from_candidates([Candidate(layer, dim) for _, layer in kept], alpha, args, find_rule=find_rule)
    return build_network(targets, args, family=FAMILY, multiplier=multiplier, neuron_dropout=neuron_dropout,
                         find_rule=find_rule)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any, text_encoders: Any,
                                unet: nn.Module, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                for_inference: bool = False, *, neuron_dropout: float | None = None,
                                **kwargs: Any) -> tuple[LoRANetwork, Mapping[str, torch.Tensor]]:
    """A network shaped like a LoRA file, for --dim_from_weights and --lora_weights "path;mult"
    (see networks/lora_build.py). The file also decides whether the LLM adapter gets modules."""
    args = parse_network_args(kwargs, ANIMA_ARGS, network_module=__name__)
    saved = read_saved_lora(file, weights_sd, args, rank_keys=RANK_KEYS,
                            options="--dim_from_weights / --lora_weights")

    with_adapter = any(n.startswith(f"{UNET_PREFIX}_llm_adapter_") for n in saved.modules) and \
        getattr(unet, "llm_adapter", None) is not None
    candidates = _dit_layers(unet, with_adapter) + _qwen3_layers(text_encoders)
    targets = targets_for_saved([layer for _, layer in candidates], saved, family=FAMILY, hint=_unmatched_hint)
    network = build_network(targets, args, family=FAMILY, multiplier=multiplier, neuron_dropout=neuron_dropout,
                            for_inference=for_inference, find_rule=_on_original_names(candidates))
    return network, saved.state_dict


def _unmatched_hint(unmatched: Sequence[str]) -> str | None:
    if any(n.startswith(f"{UNET_PREFIX}_llm_adapter_") for n in unmatched):
        return "It has LLM-adapter modules, but the DiT given has no LLM adapter."
    if any(n.startswith(f"{TEXT_ENCODER_PREFIX}_") for n in unmatched):
        return "It has Qwen3 text-encoder modules (lora_te_), but no Qwen3 model was given."
    return None
