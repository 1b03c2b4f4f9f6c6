"""LoRA for Anima: targets and defaults only (FORMATS 4.5).

Use with `--network_module networks.lora_anima`. The LoRA math, saving, loading and optimizer
groups live in networks/lora.py.

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

from library.errors import ConfigError, ModelFileError
from networks.lora import (LayerRef, LoRANetwork, LoRAPlusRatios, LoRATarget, load_lora_state_dict,
                           mismatch_message, read_lora_modules, targets_from_weights, to_lora_name)
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
    if text_encoders is None:
        return []
    encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    qwen3 = encoders[QWEN3_INDEX] if encoders else None
    if qwen3 is None:
        return []
    return _layers_in(qwen3, QWEN3_CONTAINERS, TEXT_ENCODER_PREFIX, QWEN3_INDEX)


def _last_fullmatch(rules: Sequence[RegexRule] | None, name: str) -> RegexRule | None:
    found = None
    for rule in rules or ():
        if rule.pattern.fullmatch(name):
            found = rule
    return found


def _loraplus(args: Mapping[str, Any]) -> LoRAPlusRatios:
    return LoRAPlusRatios(args.get("loraplus_lr_ratio"), args.get("loraplus_unet_lr_ratio"),
                          args.get("loraplus_text_encoder_lr_ratio"))


def _with_reg_lr(target: LoRATarget, original: str, rules) -> LoRATarget:
    rule = _last_fullmatch(rules, original)
    return target if rule is None else LoRATarget(target.lora_name, target.module, target.rank, target.alpha,
                                                   rule.value, target.text_encoder_index)


# ---------------------------------------------------------------------------------------------
# sd-scripts' entry points.

def _select(args: Mapping[str, Any], dim: int, unet: nn.Module, text_encoders: Any
            ) -> tuple[list[tuple[str, LayerRef, int]], list[str], list[str]]:
    """The selection rules: (original name, layer, rank) of every chosen layer, the names left out by
    a pattern, and the LoRA names skipped for rank 0."""
    exclude = [re.compile(DEFAULT_EXCLUDE), *args.get("exclude_patterns", [])]
    include = args.get("include_patterns", [])
    candidates = _dit_layers(unet, args.get("train_llm_adapter", False)) + _qwen3_layers(text_encoders)
    chosen, excluded, skipped = [], [], []
    for original, layer in candidates:
        if any(p.fullmatch(original) for p in exclude) and not any(p.fullmatch(original) for p in include):
            excluded.append(original)
            continue
        rule = _last_fullmatch(args.get("network_reg_dims"), original)
        rank = rule.value if rule is not None else dim
        if rank == 0:
            skipped.append(layer.lora_name)
            continue
        chosen.append((original, layer, rank))
    return chosen, excluded, skipped


def target_names(unet: nn.Module, text_encoders: Any = None, network_dim: int | None = None,
                 **kwargs: Any) -> list[str]:
    """The dotted original names of the layers `create_network` would give a LoRA with these
    --network_args, without creating anything (lets a trainer check options against them early)."""
    args = parse_network_args(kwargs, ANIMA_ARGS, network_module=__name__)
    return [original for original, _, _ in _select(args, 4 if network_dim is None else int(network_dim), unet,
                                                   text_encoders)[0]]


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoders: Any, unet: nn.Module, neuron_dropout: float | None = None,
                   **kwargs: Any) -> LoRANetwork:
    """A new Anima LoRA (sd-scripts' signature; kwargs are the --network_args)."""
    args = parse_network_args(kwargs, ANIMA_ARGS, network_module=__name__)
    dim = 4 if network_dim is None else int(network_dim)
    if dim < 1:
        raise ConfigError(f"--network_dim must be >= 1, got {network_dim}")
    alpha = 1.0 if network_alpha is None else float(network_alpha)
    verbose = args.get("verbose", False)

    chosen, excluded, skipped = _select(args, dim, unet, text_encoders)
    targets: list[LoRATarget] = [_with_reg_lr(layer.target(rank, alpha), original, args.get("network_reg_lrs"))
                                 for original, layer, rank in chosen]
    if verbose:
        logger.info("%d layers excluded by pattern: %s", len(excluded), ", ".join(excluded))
        if skipped:
            logger.info("%d layers skipped (rank 0): %s", len(skipped), ", ".join(skipped))

    return LoRANetwork(
        targets, family=FAMILY, multiplier=multiplier, dropout=neuron_dropout,
        rank_dropout=args.get("rank_dropout"), module_dropout=args.get("module_dropout"), loraplus=_loraplus(args),
        verbose=verbose,
    )


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any, text_encoders: Any,
                                unet: nn.Module, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                for_inference: bool = False, *, neuron_dropout: float | None = None,
                                **kwargs: Any) -> tuple[LoRANetwork, Mapping[str, torch.Tensor]]:
    """A network shaped like a LoRA file: its modules, ranks and alphas (for --dim_from_weights
    and --lora_weights "path;mult"). The weights are not loaded here: call `load_weights` or
    `merge_to(weights_sd)`. A file for another model family is refused."""
    args = parse_network_args(kwargs, ANIMA_ARGS, network_module=__name__)
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

    with_adapter = any(n.startswith(f"{UNET_PREFIX}_llm_adapter_") for n in saved) and \
        getattr(unet, "llm_adapter", None) is not None
    candidates = _dit_layers(unet, with_adapter) + _qwen3_layers(text_encoders)
    targets, unmatched = targets_from_weights([layer for _, layer in candidates], saved, source)
    if unmatched:
        raise ModelFileError(mismatch_message(source, FAMILY, unknown=unmatched, total=len(saved),
                                              hint=_unmatched_hint(unmatched)))
    originals = {layer.lora_name: original for original, layer in candidates}
    rules = args.get("network_reg_lrs")
    targets = [_with_reg_lr(t, originals[t.lora_name], rules) for t in targets]

    network = LoRANetwork(
        targets, family=FAMILY, multiplier=multiplier, dropout=None if for_inference else neuron_dropout,
        rank_dropout=None if for_inference else args.get("rank_dropout"),
        module_dropout=None if for_inference else args.get("module_dropout"),
        loraplus=_loraplus(args), verbose=args.get("verbose", False),
    )
    if for_inference:
        network.requires_grad_(False)
    return network, weights_sd


def _unmatched_hint(unmatched: Sequence[str]) -> str | None:
    if any(n.startswith(f"{UNET_PREFIX}_llm_adapter_") for n in unmatched):
        return "It has LLM-adapter modules, but the DiT given has no LLM adapter."
    if any(n.startswith(f"{TEXT_ENCODER_PREFIX}_") for n in unmatched):
        return "It has Qwen3 text-encoder modules (lora_te_), but no Qwen3 model was given."
    return None
