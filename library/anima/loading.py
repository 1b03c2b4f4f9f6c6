"""Detect and load Anima DiT files (with their LLM adapter).

`inspect_anima_checkpoint` reads only the safetensors headers: the ComfyUI `net.` prefix (stripped
when present), every size (width, depth 20/28/36 or any other, head size from the q-norm width,
MLP width, AdaLN-LoRA width, text width, patch sizes) and the LLM adapter's sizes when the file
holds one. Files of other kinds are refused with a message saying what they look like.

`load_anima_dit` builds the model on the meta device and assigns the tensors read memory-mapped
(to a GPU: read straight into GPU memory), so the weights exist once. The adapter comes from
`--llm_adapter_path` when given (its keys with or without the `llm_adapter.` prefix), else from
the DiT file when `llm_adapter.out_proj.weight` is there; a DiT without either is refused.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from library.anima.llm_adapter import LLMAdapterParams
from library.anima.model import ANIMA_PARAMS, Anima, AnimaParams
from library.autoencoders import describe_checkpoint
from library.errors import ModelFileError
from library.flux.loading import _torch_dtype
from library.safetensors_io import read_to_gpu, tensor_shapes

logger = logging.getLogger(__name__)

COMFY_PREFIX = "net."
ADAPTER_PREFIX = "llm_adapter."
ADAPTER_ANCHOR = "llm_adapter.out_proj.weight"
_DIT_ANCHORS = ("x_embedder.proj.1.weight", "blocks.0.self_attn.q_proj.weight", "t_embedder.1.linear_1.weight",
                "final_layer.linear.weight")
# Buffers and training counters some files carry; the model recomputes or does not need them.
_IGNORED = re.compile(r"^(pos_embedder\.|accum_|.*_extra_state$|llm_adapter\.rotary_emb\.)")
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass
class AnimaCheckpointInfo:
    params: AnimaParams
    dtype: torch.dtype                 # dtype of the block matrices in the file
    prefix: str                        # "net." (ComfyUI) or ""
    path: Path
    adapter_path: Path | None          # where the LLM adapter is read from (the DiT file or --llm_adapter_path)
    adapter_prefix: str                # prefix of the adapter keys in that file


def _max_index(keys, pattern: str) -> int | None:
    rx = re.compile(pattern)
    found = [int(m.group(1)) for k in keys if (m := rx.match(k))]
    return max(found) if found else None


def _strip(shapes: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------
# Sizes from shapes.

def adapter_params_from_shapes(path, s: dict[str, tuple[int, ...]]) -> LLMAdapterParams:
    """LLM adapter sizes from its unprefixed key shapes (head size from the q-norm width)."""
    try:
        vocab, target = s["embed.weight"]
        model_dim = s["out_proj.weight"][1]
        head_dim = s["blocks.0.cross_attn.q_norm.weight"][0]
        source = s["blocks.0.cross_attn.k_proj.weight"][1]
        mlp_hidden = s["blocks.0.mlp.0.weight"][0]
    except KeyError as e:
        raise ModelFileError(f"{path}: the LLM adapter is incomplete (no {e.args[0]}). Re-download the file.") from None
    return LLMAdapterParams(
        source_dim=source, target_dim=target, model_dim=model_dim, num_layers=1 + _max_index(s, r"blocks\.(\d+)\."),
        num_heads=model_dim // head_dim, mlp_hidden=mlp_hidden, vocab_size=vocab,
        self_attention="blocks.0.self_attn.q_proj.weight" in s,
    )


def dit_params_from_shapes(path, s: dict[str, tuple[int, ...]], adapter: LLMAdapterParams | None) -> AnimaParams:
    missing = [k for k in _DIT_ANCHORS if k not in s]
    if missing:
        what = describe_checkpoint(s) or "an unknown model"
        raise ModelFileError(f"{path}: expected an Anima DiT (e.g. anima-preview.safetensors), but this file looks "
                             f"like {what} (no {missing[0]}). Pass the DiT file to --pretrained_model_name_or_path.")
    if "blocks.0.adaln_modulation_self_attn.2.weight" not in s:
        raise ModelFileError(f"{path}: this Cosmos-style DiT has no AdaLN-LoRA modulation "
                             "(blocks.0.adaln_modulation_self_attn.2); it is not an Anima / Cosmos-Predict2 model.")
    dim, patch_in = s["x_embedder.proj.1.weight"]
    head_dim = s["blocks.0.self_attn.q_norm.weight"][0]
    patch_spatial, patch_temporal = ANIMA_PARAMS.patch_spatial, ANIMA_PARAMS.patch_temporal
    per_patch = patch_spatial * patch_spatial * patch_temporal
    out_channels = s["final_layer.linear.weight"][0] // per_patch
    in_channels = patch_in // per_patch - 1  # Anima concatenates the padding mask as one extra channel
    if dim % head_dim or patch_in % per_patch:
        raise ModelFileError(f"{path}: inconsistent sizes (width {dim}, head size {head_dim}, patch input {patch_in}); "
                             "this is not an Anima DiT layout we can load.")
    return replace(
        ANIMA_PARAMS,
        in_channels=in_channels, out_channels=out_channels, model_channels=dim,
        num_blocks=1 + _max_index(s, r"blocks\.(\d+)\."), num_heads=dim // head_dim,
        mlp_ratio=s["blocks.0.mlp.layer1.weight"][0] / dim,
        crossattn_emb_channels=s["blocks.0.cross_attn.k_proj.weight"][1],
        adaln_lora_dim=s["blocks.0.adaln_modulation_self_attn.1.weight"][0],
        llm_adapter=adapter,
    )


# ---------------------------------------------------------------------------------------------
# Inspection.

def _adapter_prefix(keys) -> str | None:
    for prefix in (ADAPTER_PREFIX, COMFY_PREFIX + ADAPTER_PREFIX, ""):
        if prefix + "out_proj.weight" in keys and prefix + "embed.weight" in keys:
            return prefix
    return None


def inspect_anima_checkpoint(path: str | os.PathLike, llm_adapter_path: str | os.PathLike | None = None
                             ) -> AnimaCheckpointInfo:
    """What an Anima DiT file is (and where its adapter comes from), from the headers alone."""
    path = Path(path)
    raw = tensor_shapes(path)
    prefix = COMFY_PREFIX if any(k.startswith(COMFY_PREFIX) for k in raw) else ""
    own = _strip(raw, prefix)
    shapes = {k: v[0] for k, v in own.items()}

    if llm_adapter_path is not None:
        adapter_path = Path(llm_adapter_path)
        adapter_raw = tensor_shapes(adapter_path)
        adapter_prefix = _adapter_prefix(adapter_raw)
        if adapter_prefix is None:
            what = describe_checkpoint(adapter_raw) or "an unknown kind of file"
            raise ModelFileError(f"{adapter_path}: expected an Anima LLM adapter (embed, blocks.N.*, out_proj, norm), "
                                 f"but this file looks like {what}. Check --llm_adapter_path.")
        adapter_shapes = {k: v[0] for k, v in _strip(adapter_raw, adapter_prefix).items()}
    elif ADAPTER_ANCHOR in shapes:
        adapter_path, adapter_prefix = path, prefix + ADAPTER_PREFIX
        adapter_shapes = {k: v for k, v in _strip(shapes, ADAPTER_PREFIX).items()}
    else:
        adapter_path = adapter_prefix = adapter_shapes = None

    adapter = adapter_params_from_shapes(adapter_path, adapter_shapes) if adapter_shapes is not None else None
    params = dit_params_from_shapes(path, shapes, adapter)
    if adapter is None:
        raise ModelFileError(f"{path}: this DiT has no LLM adapter (no {ADAPTER_ANCHOR}); it looks like a plain "
                             "Cosmos-Predict2 model. Pass the adapter weights with --llm_adapter_path.")
    if adapter.target_dim != params.crossattn_emb_channels:
        raise ModelFileError(f"{adapter_path}: the LLM adapter outputs {adapter.target_dim} channels but the DiT's "
                             f"cross-attention takes {params.crossattn_emb_channels}; they belong to different models.")
    return AnimaCheckpointInfo(
        params=params, dtype=_torch_dtype(own["blocks.0.self_attn.q_proj.weight"][1], path), prefix=prefix, path=path,
        adapter_path=adapter_path, adapter_prefix=adapter_prefix,
    )


# ---------------------------------------------------------------------------------------------
# Loading.

def _target_dtype(t: Tensor, requested: torch.dtype | None) -> torch.dtype:
    if requested is not None:
        return requested
    return torch.bfloat16 if t.dtype in _FP8 else t.dtype


def load_anima_dit(path: str | os.PathLike, *, llm_adapter_path: str | os.PathLike | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                   ) -> tuple[Anima, AnimaCheckpointInfo]:
    """Load the Anima DiT with its LLM adapter. dtype None keeps the file's (fp8 is widened to
    bf16). The model comes back in eval mode with requires_grad off."""
    info = inspect_anima_checkpoint(path, llm_adapter_path)
    with torch.device("meta"):
        model = Anima(info.params)
    wanted = list(model.state_dict())

    with ExitStack() as stack:
        dit = stack.enter_context(safe_open(str(info.path), framework="pt", device="cpu"))
        adapter = dit if info.adapter_path == info.path else \
            stack.enter_context(safe_open(str(info.adapter_path), framework="pt", device="cpu"))
        dit_keys, adapter_keys = set(dit.keys()), set(adapter.keys())

        def source(key: str) -> tuple[object, str, set[str], Path]:
            if key.startswith(ADAPTER_PREFIX):
                return adapter, info.adapter_prefix + key[len(ADAPTER_PREFIX):], adapter_keys, info.adapter_path
            return dit, info.prefix + key, dit_keys, info.path

        # To a GPU: the tensors the model needs, read straight into GPU memory at once, file by file (the
        # DiT file may hold an unused adapter under the names a separate adapter file uses)
        on_gpu: dict[Path, dict[str, Tensor]] = {}
        for file, names in {info.path: dit_keys, info.adapter_path: adapter_keys}.items():
            needed = [name for _, name, _, f in map(source, wanted) if f == file]
            on_gpu[file] = read_to_gpu(dict.fromkeys(names, file), needed, device)

        state = {}
        for key in wanted:
            handle, name, names, file = source(key)
            if name not in names:
                raise ModelFileError(f"{file}: tensor {name} is missing. The file is incomplete or of another "
                                     "variant; re-download it.")
            read = on_gpu[file]
            t = read.pop(name) if name in read else handle.get_tensor(name)   # popped: a cast copy replaces it
            state[key] = t.to(device=device, dtype=_target_dtype(t, dtype))

        # The adapter's own keys are checked above; the DiT's copy is unused when --llm_adapter_path is given.
        used = {info.prefix + k for k in wanted}
        extra = sorted(k for k in dit_keys - used
                       if k.startswith(info.prefix) and not _IGNORED.match(k[len(info.prefix):])
                       and not k.startswith(info.prefix + ADAPTER_PREFIX))
        if extra:
            logger.warning("%s: ignoring %d tensors the model does not use, e.g. %s", info.path, len(extra), extra[:3])
    if llm_adapter_path is not None and any(k.startswith(info.prefix + ADAPTER_PREFIX) for k in dit_keys):
        logger.info("%s: using the LLM adapter from %s instead of the one in the DiT file", info.path,
                    info.adapter_path)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval().requires_grad_(False), info

