"""Detect and load FLUX.1 (dev, schnell) and Chroma DiT files.

`inspect_flux_checkpoint` reads only the safetensors headers: the layout (BFL single file,
optionally behind `model.diffusion_model.`, or diffusers), the variant, every size (blocks,
width, heads from the q-norm width, MLP ratio, text and vector widths) and the dtype. Files
of other kinds are refused with a message saying what they look like.

`load_flux_dit` builds the model on the meta device and assigns tensors read memory-mapped,
one at a time, so the weights exist once (when the file dtype is kept they stay backed by the
file's pages). Diffusers files are converted to BFL names on the fly by `from_diffusers`.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal

import torch
from safetensors import safe_open
from torch import Tensor, nn

from library.autoencoders import describe_checkpoint
from library.errors import ConfigError, ModelFileError
from library.flux.chroma import Chroma
from library.flux.model import VARIANTS, Flux, FluxParams
from library.safetensors_io import read_to_gpu, tensor_shapes

logger = logging.getLogger(__name__)

BFL_PREFIX = "model.diffusion_model."
REAL_HEAD_DIM = 128
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass
class FluxCheckpointInfo:
    variant: Literal["dev", "schnell", "chroma"]
    params: FluxParams
    dtype: torch.dtype                    # dtype of the big weights in the file
    prefix: str                           # stripped from every key ("" or "model.diffusion_model.")
    layout: Literal["bfl", "diffusers"]
    path: Path
    files: tuple[Path, ...] = ()          # the safetensors files (several for sharded diffusers folders)


# ---------------------------------------------------------------------------------------------
# Finding and reading the files.

def _checkpoint_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.exists():
        raise ModelFileError(f"{path}: no such file or folder. Check --pretrained_model_name_or_path.")
    for folder in (path / "transformer", path):
        shards = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
        if shards:
            return shards
    raise ModelFileError(
        f"{path}: this folder holds no transformer/diffusion_pytorch_model*.safetensors. Pass a FLUX .safetensors "
        "file or a diffusers model folder."
    )


def _read_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    shapes: dict[str, tuple[tuple[int, ...], str, Path]] = {}
    for f in files:
        for k, (shape, dtype) in tensor_shapes(f).items():
            shapes[k] = (shape, dtype, f)
    return shapes


def _torch_dtype(name: str, path) -> torch.dtype:
    try:
        return _SAFETENSORS_DTYPES[name]
    except KeyError:
        raise ModelFileError(f"{path}: tensors of dtype {name} are not supported (quantized file?). Use a "
                             "bf16, fp16 or fp8 (e4m3fn) file.") from None


def _max_index(keys, pattern: str) -> int | None:
    rx = re.compile(pattern)
    found = [int(m.group(1)) for k in keys if (m := rx.match(k))]
    return max(found) if found else None


def _count(keys, pattern: str) -> int:
    """1 + the largest block index N matched by `pattern`, or 0 when no block exists."""
    found = _max_index(keys, pattern)
    return 0 if found is None else 1 + found


# ---------------------------------------------------------------------------------------------
# Size inference.

def _check_head_dim(path, head_dim: int) -> None:
    if head_dim != REAL_HEAD_DIM:
        raise ModelFileError(f"{path}: attention head size {head_dim}; FLUX/Chroma use {REAL_HEAD_DIM} "
                             "(RoPE axes 16+56+56). This file is not a FLUX-family model we can load.")


def _params_from_bfl(path, s: dict[str, tuple[int, ...]], chroma: bool) -> FluxParams:
    hidden, in_channels = s["img_in.weight"]
    head_dim = s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    _check_head_dim(path, head_dim)
    base = VARIANTS["chroma" if chroma else "dev"].params
    params = FluxParams(
        in_channels=in_channels,
        vec_in_dim=s["vector_in.in_layer.weight"][1] if "vector_in.in_layer.weight" in s else base.vec_in_dim,
        context_in_dim=s["txt_in.weight"][1],
        hidden_size=hidden,
        mlp_ratio=s["double_blocks.0.img_mlp.0.weight"][0] / hidden,
        num_heads=hidden // head_dim,
        depth=1 + _max_index(s, r"double_blocks\.(\d+)\."),
        depth_single_blocks=_count(s, r"single_blocks\.(\d+)\."),
        axes_dim=base.axes_dim,
        theta=base.theta,
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in s,
        guidance_embed="guidance_in.in_layer.weight" in s,
    )
    if chroma:
        approx_hidden, approx_in = s["distilled_guidance_layer.in_proj.weight"]
        params = _with_approximator(params, approx_in, approx_hidden,
                                    1 + _max_index(s, r"distilled_guidance_layer\.layers\.(\d+)\."))
    return params


def _params_from_diffusers(path, s: dict[str, tuple[int, ...]], chroma: bool) -> FluxParams:
    hidden, in_channels = s["x_embedder.weight"]
    head_dim = s["transformer_blocks.0.attn.norm_q.weight"][0]
    _check_head_dim(path, head_dim)
    base = VARIANTS["chroma" if chroma else "dev"].params
    vec_key = "time_text_embed.text_embedder.linear_1.weight"
    params = FluxParams(
        in_channels=in_channels,
        vec_in_dim=s[vec_key][1] if vec_key in s else base.vec_in_dim,
        context_in_dim=s["context_embedder.weight"][1],
        hidden_size=hidden,
        mlp_ratio=s["transformer_blocks.0.ff.net.0.proj.weight"][0] / hidden,
        num_heads=hidden // head_dim,
        depth=1 + _max_index(s, r"transformer_blocks\.(\d+)\."),
        depth_single_blocks=_count(s, r"single_transformer_blocks\.(\d+)\."),
        axes_dim=base.axes_dim,
        theta=base.theta,
        qkv_bias="transformer_blocks.0.attn.to_q.bias" in s,
        guidance_embed="time_text_embed.guidance_embedder.linear_1.weight" in s,
    )
    if chroma:
        approx_hidden, approx_in = s["distilled_guidance_layer.in_proj.weight"]
        params = _with_approximator(params, approx_in, approx_hidden,
                                    1 + _max_index(s, r"distilled_guidance_layer\.layers\.(\d+)\."))
    return params


def _with_approximator(params: FluxParams, in_dim: int, hidden: int, depth: int) -> FluxParams:
    return replace(params, approximator_in_dim=in_dim, approximator_hidden_dim=hidden, approximator_depth=depth,
                   guidance_embed=False)


# ---------------------------------------------------------------------------------------------
# Inspection.

def inspect_flux_checkpoint(path: str | os.PathLike) -> FluxCheckpointInfo:
    """What a FLUX-family file or diffusers folder is, from its headers alone."""
    path = Path(path)
    files = _checkpoint_files(path)
    raw = _read_shapes(files)
    keys = set(raw)

    prefix = BFL_PREFIX if any(k.startswith(BFL_PREFIX) for k in keys) else ""
    own = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    shapes = {k: v[0] for k, v in own.items()}

    if "double_blocks.0.img_attn.qkv.weight" in shapes and "img_in.weight" in shapes:
        layout, chroma = "bfl", "distilled_guidance_layer.in_proj.weight" in shapes
        params = _params_from_bfl(path, shapes, chroma)
        big = "double_blocks.0.img_attn.qkv.weight"
    elif "transformer_blocks.0.attn.add_k_proj.weight" in shapes and "x_embedder.weight" in shapes:
        layout, chroma = "diffusers", "distilled_guidance_layer.in_proj.weight" in shapes
        params = _params_from_diffusers(path, shapes, chroma)
        big = "transformer_blocks.0.attn.to_q.weight"
    else:
        what = describe_checkpoint(keys) or "an unknown model (no double_blocks.* or transformer_blocks.* tensors)"
        raise ModelFileError(f"{path}: expected a FLUX.1 or Chroma DiT, but this file looks like {what}. "
                             "Pass the DiT file (e.g. flux1-dev.safetensors) to --pretrained_model_name_or_path.")

    variant = "chroma" if chroma else ("dev" if params.guidance_embed else "schnell")
    return FluxCheckpointInfo(
        variant=variant, params=params, dtype=_torch_dtype(own[big][1], path), prefix=prefix, layout=layout,
        path=path, files=tuple(files),
    )


# ---------------------------------------------------------------------------------------------
# Diffusers -> BFL key adapter.

@dataclass(frozen=True)
class KeyRecipe:
    """How one BFL tensor is made from diffusers tensors: concatenated along dim 0 (q, k, v[, mlp])
    or, for the final adaLN, with its two halves swapped (diffusers stores scale, shift)."""

    sources: tuple[str, ...]
    swap_halves: bool = False

    def build(self, get: Callable[[str], Tensor]) -> Tensor:
        parts = [get(k) for k in self.sources]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if self.swap_halves:
            first, second = t.chunk(2, dim=0)
            t = torch.cat((second, first), dim=0)
        return t


def diffusers_to_bfl_plan(params: FluxParams, chroma: bool) -> dict[str, KeyRecipe]:
    """BFL key -> recipe over diffusers keys, for every tensor of the model."""
    plan: dict[str, KeyRecipe] = {}

    def linear(bfl: str, *diffusers: str, swap: bool = False) -> None:
        for suffix in ("weight", "bias"):
            plan[f"{bfl}.{suffix}"] = KeyRecipe(tuple(f"{d}.{suffix}" for d in diffusers), swap)

    def norm(bfl: str, diffusers: str) -> None:
        plan[f"{bfl}.scale"] = KeyRecipe((f"{diffusers}.weight",))

    linear("img_in", "x_embedder")
    linear("txt_in", "context_embedder")
    linear("final_layer.linear", "proj_out")
    if chroma:
        g = "distilled_guidance_layer"
        linear(f"{g}.in_proj", f"{g}.in_proj")
        linear(f"{g}.out_proj", f"{g}.out_proj")
        for i in range(params.approximator_depth):
            linear(f"{g}.layers.{i}.in_layer", f"{g}.layers.{i}.linear_1")
            linear(f"{g}.layers.{i}.out_layer", f"{g}.layers.{i}.linear_2")
            norm(f"{g}.norms.{i}", f"{g}.norms.{i}")
    else:
        embedders = [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")]
        if params.guidance_embed:
            embedders.append(("guidance_in", "guidance_embedder"))
        for bfl, d in embedders:
            linear(f"{bfl}.in_layer", f"time_text_embed.{d}.linear_1")
            linear(f"{bfl}.out_layer", f"time_text_embed.{d}.linear_2")
        linear("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)

    for i in range(params.depth):
        b, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        if not chroma:
            linear(f"{b}.img_mod.lin", f"{t}.norm1.linear")
            linear(f"{b}.txt_mod.lin", f"{t}.norm1_context.linear")
        linear(f"{b}.img_attn.qkv", f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v")
        linear(f"{b}.txt_attn.qkv", f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj")
        norm(f"{b}.img_attn.norm.query_norm", f"{t}.attn.norm_q")
        norm(f"{b}.img_attn.norm.key_norm", f"{t}.attn.norm_k")
        norm(f"{b}.txt_attn.norm.query_norm", f"{t}.attn.norm_added_q")
        norm(f"{b}.txt_attn.norm.key_norm", f"{t}.attn.norm_added_k")
        linear(f"{b}.img_attn.proj", f"{t}.attn.to_out.0")
        linear(f"{b}.txt_attn.proj", f"{t}.attn.to_add_out")
        linear(f"{b}.img_mlp.0", f"{t}.ff.net.0.proj")
        linear(f"{b}.img_mlp.2", f"{t}.ff.net.2")
        linear(f"{b}.txt_mlp.0", f"{t}.ff_context.net.0.proj")
        linear(f"{b}.txt_mlp.2", f"{t}.ff_context.net.2")
    for i in range(params.depth_single_blocks):
        b, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        linear(f"{b}.linear1", f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v", f"{t}.proj_mlp")
        linear(f"{b}.linear2", f"{t}.proj_out")
        norm(f"{b}.norm.query_norm", f"{t}.attn.norm_q")
        norm(f"{b}.norm.key_norm", f"{t}.attn.norm_k")
        if not chroma:
            linear(f"{b}.modulation.lin", f"{t}.norm.linear")
    if not params.qkv_bias:
        for name in [k for k in plan if k.endswith("qkv.bias")]:
            del plan[name]
    return plan


def from_diffusers(state: dict[str, Tensor], params: FluxParams, chroma: bool) -> dict[str, Tensor]:
    """Convert a diffusers-layout state dict to BFL names."""
    plan = diffusers_to_bfl_plan(params, chroma)
    return {k: recipe.build(state.__getitem__) for k, recipe in plan.items()}


# ---------------------------------------------------------------------------------------------
# Loading.

def _target_dtype(name: str, t: Tensor, requested: torch.dtype | None, path) -> torch.dtype:
    """None keeps the file dtype (fp8 is widened to bf16: it cannot be computed with directly).
    float8_e4m3fn stores the matrices in fp8 and everything 1-D (biases, norm scales) in bf16."""
    if requested is None:
        return torch.bfloat16 if t.dtype in _FP8_DTYPES else t.dtype
    if requested in _FP8_DTYPES:
        if t.ndim < 2:
            return torch.bfloat16
        if t.dtype in _FP8_DTYPES and t.dtype != torch.float8_e4m3fn:
            raise ModelFileError(f"{path}: {name} is stored as {t.dtype}; only float8_e4m3fn files can be kept in "
                                 "fp8. Use a bf16/fp16 file (it is cast to e4m3fn) or an e4m3fn file.")
        return torch.float8_e4m3fn
    return requested


def check_flux_checkpoint(path: str | os.PathLike, model_type: str = "flux") -> FluxCheckpointInfo:
    """inspect_flux_checkpoint, and an error when the file is not of `model_type` ("flux" or
    "chroma"): headers only, so a wrong file is refused before anything is loaded."""
    if model_type not in ("flux", "chroma"):
        raise ConfigError(f"--model_type {model_type!r} is not supported; use 'flux' (dev/schnell) or 'chroma'.")
    info = inspect_flux_checkpoint(path)
    if model_type == "flux" and info.variant == "chroma":
        raise ModelFileError(f"{path}: this is a Chroma model; pass --model_type chroma to train or run it.")
    if model_type == "chroma" and info.variant != "chroma":
        raise ModelFileError(f"{path}: this is a FLUX.1 {info.variant} model, not Chroma; use --model_type flux "
                             "(the default) or pass a Chroma file.")
    return info


def load_flux_dit(path: str | os.PathLike, *, model_type: str = "flux", device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> tuple[nn.Module, FluxCheckpointInfo]:
    """Load a FLUX.1 dev/schnell (`model_type="flux"`) or Chroma (`"chroma"`) DiT.

    dtype None keeps the file dtype (an fp8 file is widened to bf16); torch.float8_e4m3fn keeps
    or casts the matrices to fp8 storage (1-D tensors in bf16); any other dtype casts
    everything. The model comes back in eval mode with requires_grad off."""
    if dtype is not None and dtype in _FP8_DTYPES and dtype != torch.float8_e4m3fn:
        raise ConfigError(f"fp8 storage supports float8_e4m3fn only, not {dtype}.")
    info = check_flux_checkpoint(path, model_type)
    is_chroma = info.variant == "chroma"

    with torch.device("meta"):
        model = (Chroma if is_chroma else Flux)(info.params)
    wanted = list(model.state_dict())

    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in info.files}
        where = {k: f for f, h in handles.items() for k in h.keys()}
        # To a GPU: the tensors the model needs, read straight into GPU memory at once
        needed = ({info.prefix + k for k in wanted} if info.layout == "bfl" else
                  {k for k in where if k.startswith(info.prefix)})
        on_gpu = read_to_gpu(where, needed, device)

        def get(key: str) -> Tensor:
            full = info.prefix + key
            if full not in where:
                raise ModelFileError(f"{path}: tensor {full} is missing. The file is incomplete or a different "
                                     "variant; re-download it.")
            if full in on_gpu:   # popped: a cast copy replaces it, not doubles it
                return on_gpu.pop(full)
            return handles[where[full]].get_tensor(full)

        if info.layout == "bfl":
            sources: dict[str, Callable[[], Tensor]] = {k: (lambda k=k: get(k)) for k in wanted}
            extra = {k[len(info.prefix):] for k in where if k.startswith(info.prefix)} - set(wanted)
            if extra:
                logger.warning("%s: ignoring %d tensors the model does not use, e.g. %s", path, len(extra),
                               sorted(extra)[:3])
        else:
            plan = diffusers_to_bfl_plan(info.params, is_chroma)
            sources = {k: (lambda r=plan[k]: r.build(get)) for k in wanted}

        state = {}
        for key in wanted:
            t = sources[key]()
            state[key] = t.to(device=device, dtype=_target_dtype(key, t, dtype, path))
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval().requires_grad_(False), info
