"""Text encoders from single safetensors files (CLIP-L, T5-XXL) and their tokenizers.

The models are transformers' CLIPTextModel / T5EncoderModel built from the bundled configs in
configs/ with the sizes read from the file's shapes (layers, width, feed-forward, vocabulary;
head size 64 assumed, as in the real models), so a tiny file loads through the same code as a
full one. Weights are assigned memory-mapped onto a model built without allocating
parameters, so loading never holds two copies.

fp8 T5 files (t5xxl_fp8_e4m3fn.safetensors): by default every tensor is upcast on load to the
compute dtype (bf16 unless asked otherwise). With `fp8_storage=True` the attention and FFN
matrices stay float8_e4m3fn in memory and are upcast one layer at a time in forward, while
embeddings, relative-position bias and layer norms are in the compute dtype (sd-scripts'
behaviour); the gated FFN then runs in the compute dtype.

Tokenizers load by hub id, from `--tokenizer_cache_dir` (DIR/<hub id with / -> _>, written after
a hub download, as sd-scripts does), or from an explicit local folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from library.autoencoders import describe_checkpoint
from library.errors import ModelFileError
from library.safetensors_io import load_file, tensor_shapes

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CLIP_L_TOKENIZER_ID = "openai/clip-vit-large-patch14"
CLIP_G_TOKENIZER_ID = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
T5_XXL_TOKENIZER_ID = "google/t5-v1_1-xxl"
HEAD_DIM = 64  # CLIP-L and T5-XXL both use 64-wide heads; the head count follows from the width

_CLIP_ANCHOR = "text_model.embeddings.token_embedding.weight"
_T5_ANCHOR = "encoder.block.0.layer.0.SelfAttention.q.weight"
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)


# ---------------------------------------------------------------------------------------------
# Bundled configs.

def bundled_config(name: str) -> dict[str, Any]:
    return json.loads((CONFIG_DIR / name / "config.json").read_text(encoding="utf-8"))


def clip_l_config(**overrides):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**(bundled_config("clip_l") | overrides))


def t5xxl_config(**overrides):
    from transformers import T5Config

    return T5Config(**(bundled_config("t5xxl") | overrides))


# ---------------------------------------------------------------------------------------------
# Shared loading helpers.

def _find_prefix(path, shapes: dict, anchor: str, expected: str, prefer: str, prefix: str | None) -> str:
    """The key prefix in front of the encoder's own names. All-in-one files can hold several
    encoders (text_encoders.clip_l..., text_encoders.clip_g...): an explicit `prefix` wins,
    then the candidate containing `prefer`."""
    candidates = sorted({key[: -len(anchor)] for key in shapes if key.endswith(anchor)})
    if prefix is not None:
        if prefix not in candidates:
            raise ModelFileError(f"{path}: found no tensors of {expected} under the prefix {prefix!r}; the file "
                                 f"has them under {candidates}.")
        return prefix
    if len(candidates) == 1:
        return candidates[0]
    preferred = [c for c in candidates if prefer in c]
    if len(preferred) == 1:
        return preferred[0]
    if not candidates:
        what = describe_checkpoint(shapes) or "an unknown kind of file"
        raise ModelFileError(f"{path}: expected {expected}, but this file looks like {what}. Check which file you "
                             f"passed to which option.")
    raise ModelFileError(f"{path}: holds several text encoders ({candidates}); pass the one you mean as a "
                         "separate file.")


def _max_block(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    return max(int(m.group(1)) for k in keys if (m := rx.match(k)))


def _compute_dtype(file_dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    if requested is not None:
        return requested
    return torch.bfloat16 if file_dtype in _FP8_DTYPES else file_dtype


def model_device(model: nn.Module) -> torch.device:
    """Where a (text encoder) model's weights are."""
    return next(model.parameters()).device


def output_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a text encoder computes in: its weights' dtype, bf16 for one-byte (fp8) weights."""
    dtype = next(model.parameters()).dtype
    return torch.bfloat16 if dtype.itemsize == 1 else dtype


def _build_without_weights(model_cls, config):
    """Parameters on the meta device (assigned from the file later), buffers real."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False), torch.random.fork_rng(devices=[]):
        return model_cls(config)


def file_fingerprint(path: str | os.PathLike) -> str:
    """Cheap identity of a weights file for cache keys: name, size and a hash of the header and
    the first and last MiB of tensor data (a retrained file with equal shapes still differs)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h.update(f.read(n))
        h.update(f.read(1 << 20))
        f.seek(max(8 + n, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return f"{path.name}:{size}:{h.hexdigest()[:16]}"


# ---------------------------------------------------------------------------------------------
# CLIP-L.

class CLIPTextEncoder(nn.Module):
    """transformers' CLIPTextModel under the attribute `text_model`.

    transformers 5 dropped the `text_model` level from CLIPTextModel (its keys are
    `encoder.layers.0...`). Files, sd-scripts and ComfyUI name everything `text_model.encoder...`
    (LoRA names `lora_te1_text_model_encoder_layers_0_self_attn_q_proj`), so we put the level
    back: module paths and state-dict keys of this wrapper are the file's keys.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.text_model = model

    @property
    def config(self):
        return self.text_model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.dtype

    @property
    def device(self) -> torch.device:
        return self.text_model.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def wrap_clip_text_model(model: nn.Module) -> nn.Module:
    """Give a CLIPTextModel the file's module paths (`text_model.*`) on any transformers version."""
    return model if hasattr(model, "text_model") else CLIPTextEncoder(model)


def load_clip_l(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                *, prefix: str | None = None):
    """CLIP-L from a single file (`text_model.*`, optionally behind a prefix such as
    `text_encoders.clip_l.transformer.`). Returns a module whose state-dict keys are the file's
    (see CLIPTextEncoder) and whose forward is CLIPTextModel's. A `text_projection.weight` is
    ignored: FLUX uses the pooled output without projection."""
    from transformers import CLIPTextModel

    raw = tensor_shapes(path)
    prefix = _find_prefix(path, raw, _CLIP_ANCHOR, "a CLIP-L text encoder (clip_l.safetensors)", "clip_l", prefix)
    shapes = {k[len(prefix):]: s for k, (s, _) in raw.items() if k.startswith(prefix)}
    vocab, width = shapes[_CLIP_ANCHOR]
    config = clip_l_config(
        vocab_size=vocab, hidden_size=width, projection_dim=width, num_attention_heads=width // HEAD_DIM,
        max_position_embeddings=shapes["text_model.embeddings.position_embedding.weight"][0],
        intermediate_size=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=1 + _max_block(shapes, r"text_model\.encoder\.layers\.(\d+)\."),
    )
    model = wrap_clip_text_model(_build_without_weights(CLIPTextModel, config))
    wanted = set(model.state_dict())
    keys = [prefix + k for k in shapes if k in wanted]
    _check_complete(path, wanted, {k[len(prefix):] for k in keys}, "CLIP text encoder")
    tensors = load_file(path, device=device, keys=keys)
    target = _compute_dtype(_torch_dtype(raw[prefix + _CLIP_ANCHOR][1]), dtype)
    state = {k[len(prefix):]: t.to(dtype=target) for k, t in _popping(tensors)}
    model.load_state_dict(state, assign=True, strict=True)
    return model.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# CLIP with its text projection (SD3: CLIP-L and CLIP-G, OpenCLIP ViT-bigG).

def _popping(tensors: dict[str, torch.Tensor]):
    """(key, tensor) pairs, each dropped from `tensors` as it is handed out: a dtype cast then
    replaces the loaded tensor instead of doubling the memory (on the GPU too) until the end."""
    while tensors:
        key = next(iter(tensors))
        yield key, tensors.pop(key)


def clip_g_config(**overrides):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**(bundled_config("clip_g") | overrides))


def _load_clip_with_projection(path, config_fn, expected: str, prefer: str, device, dtype, prefix: str | None,
                               identity_projection: bool):
    """transformers' CLIPTextModelWithProjection (keys `text_model.*` + `text_projection.weight`,
    as in the files) with sizes from the shapes. Without a `text_projection.weight` in the file,
    an identity projection is used when `identity_projection` (CLIP-L, as sd-scripts does), else
    the file is refused."""
    from transformers import CLIPTextModelWithProjection

    raw = tensor_shapes(path)
    prefix = _find_prefix(path, raw, _CLIP_ANCHOR, expected, prefer, prefix)
    shapes = {k[len(prefix):]: s for k, (s, _) in raw.items() if k.startswith(prefix)}
    vocab, width = shapes[_CLIP_ANCHOR]
    projection = shapes.get("text_projection.weight")
    if projection is None and not identity_projection:
        raise ModelFileError(f"{path}: the CLIP text encoder has no text_projection.weight; {expected} needs it. "
                             "The file is incomplete or a CLIP without projection.")
    config = config_fn(
        vocab_size=vocab, hidden_size=width, num_attention_heads=width // HEAD_DIM,
        projection_dim=projection[0] if projection is not None else width,
        max_position_embeddings=shapes["text_model.embeddings.position_embedding.weight"][0],
        intermediate_size=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=1 + _max_block(shapes, r"text_model\.encoder\.layers\.(\d+)\."),
    )
    model = _build_without_weights(CLIPTextModelWithProjection, config)
    wanted = set(model.state_dict())
    keys = [prefix + k for k in shapes if k in wanted]
    got = {k[len(prefix):] for k in keys}
    if projection is None:
        got.add("text_projection.weight")
    _check_complete(path, wanted, got, "CLIP text encoder")
    target = _compute_dtype(_torch_dtype(raw[prefix + _CLIP_ANCHOR][1]), dtype)
    state = {k[len(prefix):]: t.to(dtype=target) for k, t in _popping(load_file(path, device=device, keys=keys))}
    if projection is None:
        state["text_projection.weight"] = torch.eye(width, device=device, dtype=target)
    model.load_state_dict(state, assign=True, strict=True)
    return model.to(device).eval().requires_grad_(False)


def load_clip_l_with_projection(path: str | os.PathLike, device: str | torch.device = "cpu",
                                dtype: torch.dtype | None = None, *, prefix: str | None = None):
    """CLIP-L as SD3 uses it: CLIPTextModelWithProjection (`text_embeds` is the projected
    pooled output; an identity projection when the file has none)."""
    return _load_clip_with_projection(path, clip_l_config, "a CLIP-L text encoder (clip_l.safetensors)", "clip_l",
                                      device, dtype, prefix, identity_projection=True)


def load_clip_g(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                *, prefix: str | None = None):
    """CLIP-G (OpenCLIP ViT-bigG in the HF layout, clip_g.safetensors) as
    CLIPTextModelWithProjection, from a single file or `text_encoders.clip_g.transformer.`."""
    return _load_clip_with_projection(path, clip_g_config, "a CLIP-G text encoder (clip_g.safetensors)", "clip_g",
                                      device, dtype, prefix, identity_projection=False)


# ---------------------------------------------------------------------------------------------
# T5-XXL.

def load_t5xxl(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               *, fp8_storage: bool = False, prefix: str | None = None):
    """HF T5EncoderModel from a single file (fp32/fp16/bf16/fp8). See the module docstring for
    the two ways fp8 is handled; `dtype` is the compute dtype (default: the file's, bf16 for fp8)."""
    from transformers import T5EncoderModel

    raw = tensor_shapes(path)
    prefix = _find_prefix(path, raw, _T5_ANCHOR, "a T5-XXL text encoder (t5xxl_fp16.safetensors)", "t5xxl", prefix)
    shapes = {k[len(prefix):]: s for k, (s, _) in raw.items() if k.startswith(prefix)}
    embed_key = "shared.weight" if "shared.weight" in shapes else "encoder.embed_tokens.weight"
    if embed_key not in shapes:
        raise ModelFileError(f"{path}: the T5 file has no token embedding (shared.weight). It is incomplete.")
    if "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" not in shapes:
        raise ModelFileError(f"{path}: this T5 has no gated feed-forward (wi_0/wi_1); FLUX needs T5 v1.1 XXL "
                             "(t5xxl_fp16.safetensors).")
    vocab, d_model = shapes[embed_key]
    inner = shapes[_T5_ANCHOR][0]
    n_buckets, n_heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    if inner != n_heads * HEAD_DIM:
        raise ModelFileError(f"{path}: T5 attention width {inner} is not {n_heads} heads x {HEAD_DIM}; "
                             "this is not a T5 v1.1 layout we can load.")
    n_layers = 1 + _max_block(shapes, r"encoder\.block\.(\d+)\.")
    config = t5xxl_config(
        vocab_size=vocab, d_model=d_model, d_kv=HEAD_DIM, num_heads=n_heads, relative_attention_num_buckets=n_buckets,
        d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0], num_layers=n_layers,
        num_decoder_layers=n_layers,
    )
    model = _build_without_weights(T5EncoderModel, config)
    wanted = set(model.state_dict())
    file_keys = [prefix + k for k in shapes if k in wanted or k == embed_key]
    tensors = {k[len(prefix):]: t for k, t in load_file(path, device=device, keys=file_keys).items()}
    embedding = tensors.pop(embed_key)
    tensors.pop("shared.weight", None)
    tensors.pop("encoder.embed_tokens.weight", None)

    compute = _compute_dtype(_torch_dtype(raw[prefix + _T5_ANCHOR][1]), dtype)
    state = {}
    for k, t in _popping(tensors):
        if fp8_storage and _is_block_matrix(k):
            target = torch.float8_e4m3fn
        elif compute == torch.float16 and ".DenseReluDense.wo." in k:
            target = torch.float32  # transformers keeps `wo` in fp32: an fp16 T5 FFN overflows
        else:
            target = compute
        state[k] = t.to(device=device, dtype=target)
    shared = embedding.to(device=device, dtype=compute)
    state["shared.weight"] = shared
    state["encoder.embed_tokens.weight"] = shared  # tied: one storage for both names
    _check_complete(path, wanted, set(state), "T5 text encoder")
    model.load_state_dict(state, assign=True, strict=True)
    model = model.to(device).eval().requires_grad_(False)
    if fp8_storage:
        _run_fp8_matrices_in_compute_dtype(model)
    return model


def _is_block_matrix(key: str) -> bool:
    return key.startswith("encoder.block.") and (".SelfAttention." in key or ".DenseReluDense." in key) \
        and "relative_attention_bias" not in key


def _upcast_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return F.linear(x, self.weight.to(x.dtype), bias)


def _gated_ffn_in_input_dtype(self, hidden: torch.Tensor) -> torch.Tensor:
    # transformers casts the FFN activations to wo's dtype, which would be fp8 here.
    gated = self.act(self.wi_0(hidden)) * self.wi_1(hidden)
    return self.wo(self.dropout(gated))


def _run_fp8_matrices_in_compute_dtype(model: nn.Module) -> None:
    """Instance-level forward overrides (class names stay, so LoRA still finds its targets)."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.dtype in _FP8_DTYPES:
            module.forward = types.MethodType(_upcast_linear_forward, module)
        elif type(module).__name__ == "T5DenseGatedActDense":
            module.forward = types.MethodType(_gated_ffn_in_input_dtype, module)


def _check_complete(path, wanted: set[str], got: set[str], what: str) -> None:
    missing = sorted(wanted - got)
    if missing:
        raise ModelFileError(f"{path}: the {what} is missing {len(missing)} tensors (e.g. {missing[:3]}). "
                             "The file is incomplete or of another layout.")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _torch_dtype(safetensors_dtype: str) -> torch.dtype:
    try:
        return _SAFETENSORS_DTYPES[safetensors_dtype]
    except KeyError:
        raise ModelFileError(f"unsupported tensor dtype {safetensors_dtype} in a text-encoder file") from None


# ---------------------------------------------------------------------------------------------
# Tokenizers.

def tokenizer_cache_folder(cache_dir: str | os.PathLike, hub_id: str) -> Path:
    return Path(cache_dir) / hub_id.replace("/", "_")


_PROBE_TEXT = "a photo of a cat"


class _UnusableTokenizer(Exception):
    pass


def _checked(tokenizer):
    """transformers 5 returns a tokenizer with an empty vocabulary (everything -> unk) when the
    files are missing instead of raising; treat that as a failed load."""
    ids = tokenizer(_PROBE_TEXT, add_special_tokens=False).input_ids
    if not ids or tokenizer.unk_token_id in ids:
        raise _UnusableTokenizer(f"it maps plain words to the unknown token (vocabulary size {len(tokenizer)}); "
                                 "the tokenizer files are missing or incomplete")
    return tokenizer


def load_tokenizer(hub_id: str, tokenizer_class, *, cache_dir: str | os.PathLike | None = None,
                   local_path: str | os.PathLike | None = None, offline: bool = False, subfolder: str | None = None):
    """Explicit folder > DIR/<hub id with / -> _> in the cache dir > the hub (saved to the cache dir).
    `subfolder`: where the tokenizer sits inside the hub repository (e.g. "tokenizer" of
    stabilityai/stable-diffusion-2); the cache folder holds the tokenizer itself."""
    name = tokenizer_class.__name__
    if local_path is not None:
        if not Path(local_path).is_dir():
            raise ModelFileError(f"tokenizer folder {local_path} does not exist. Pass the folder that holds "
                                 f"tokenizer.json / tokenizer_config.json for {hub_id}.")
        try:
            return _checked(tokenizer_class.from_pretrained(str(local_path)))
        except Exception as e:  # transformers raises several types for a bad folder
            raise ModelFileError(f"{local_path}: cannot load a {name} from this folder ({e}).") from e
    if cache_dir is not None:
        folder = tokenizer_cache_folder(cache_dir, hub_id)
        if folder.is_dir():
            try:
                return _checked(tokenizer_class.from_pretrained(str(folder)))
            except Exception as e:
                raise ModelFileError(f"{folder}: the cached tokenizer cannot be loaded ({e}). Delete the folder "
                                     "to fetch it again.") from e
    try:
        hub_kwargs = {"subfolder": subfolder} if subfolder else {}
        tokenizer = _checked(tokenizer_class.from_pretrained(hub_id, local_files_only=offline, **hub_kwargs))
    except Exception as e:
        where = (f"{tokenizer_cache_folder(cache_dir, hub_id)}" if cache_dir is not None
                 else f"--tokenizer_cache_dir DIR (looked for DIR/{hub_id.replace('/', '_')})")
        raise ModelFileError(
            f"cannot load the tokenizer {hub_id} from the Hugging Face hub ({type(e).__name__}: {e}). Without "
            f"internet access, put a copy in {where}; any earlier online run with --tokenizer_cache_dir writes one."
        ) from e
    if cache_dir is not None:
        tokenizer.save_pretrained(str(tokenizer_cache_folder(cache_dir, hub_id)))
    return tokenizer


def load_clip_l_tokenizer(cache_dir=None, local_path=None, offline: bool = False):
    from transformers import CLIPTokenizer

    return load_tokenizer(CLIP_L_TOKENIZER_ID, CLIPTokenizer, cache_dir=cache_dir, local_path=local_path,
                          offline=offline)


def load_t5xxl_tokenizer(cache_dir=None, local_path=None, offline: bool = False):
    from transformers import T5TokenizerFast

    return load_tokenizer(T5_XXL_TOKENIZER_ID, T5TokenizerFast, cache_dir=cache_dir, local_path=local_path,
                          offline=offline)


def load_clip_g_tokenizer(cache_dir=None, local_path=None, offline: bool = False):
    """The CLIP-G tokenizer with its pad token forced to id 0 ("!"), as SD3 was trained
    (sd-scripts sets pad_token_id = 0); the vocabulary is CLIP-L's."""
    from transformers import CLIPTokenizer

    tokenizer = load_tokenizer(CLIP_G_TOKENIZER_ID, CLIPTokenizer, cache_dir=cache_dir, local_path=local_path,
                               offline=offline)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    return tokenizer
