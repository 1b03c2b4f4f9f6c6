"""Gemma2-2B, Lumina's text encoder, from a single safetensors file, and its tokenizer.

The model is transformers' Gemma2Model built from the bundled config (configs/gemma2_2b/) with
the sizes read from the file's shapes (vocabulary, width, depth, FFN width; heads from the
projection heights with the real head size 256), so a tiny file loads through the same code
as `gemma_2_2b_fp16.safetensors`. Keys may sit behind `model.` (Comfy-Org's split file) or
`text_encoders.gemma2_2b.transformer.model.` (the all-in-one file).

Comfy-Org's file also carries Gemma's sentencepiece model as a uint8 tensor `spiece_model`:
that is the tokenizer, read with no hub access. Without it the tokenizer comes from a local
folder, `--tokenizer_cache_dir` or the hub (google/gemma-2-2b, a gated repository).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from library.errors import ModelFileError
from library.safetensors_io import load_file, tensor_shapes
from library.text_encoders import (_build_without_weights, _check_complete, _compute_dtype, _find_prefix,
                                   _max_block, _popping, _torch_dtype, bundled_config, load_tokenizer)

logger = logging.getLogger(__name__)

GEMMA2_TOKENIZER_ID = "google/gemma-2-2b"
HEAD_DIM = 256               # Gemma2-2B: 8 query heads and 4 KV heads of 256 (not hidden / heads)
SPIECE_KEY = "spiece_model"
_ANCHOR = "layers.0.self_attn.q_proj.weight"
_GEMMA2_ONLY = "layers.0.pre_feedforward_layernorm.weight"  # Gemma2's sandwich norm; Qwen/Llama lack it
_EXPECTED = "a Gemma2 text encoder (gemma_2_2b_fp16.safetensors)"


def gemma2_config(**overrides):
    from transformers import Gemma2Config

    return Gemma2Config(**(bundled_config("gemma2_2b") | overrides))


def gemma2_prefix(path: str | os.PathLike, prefix: str | None = None) -> str:
    """The key prefix in front of Gemma2Model's own names ("", "model.", ...)."""
    return _find_prefix(path, tensor_shapes(path), _ANCHOR, _EXPECTED, "gemma2", prefix)


def load_gemma2(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                *, prefix: str | None = None):
    """Gemma2Model from a single file. `dtype` is the compute dtype (default: the file's). Gemma2
    overflows in float16 activations; bf16 or fp32 are the safe choices."""
    from transformers import Gemma2Model

    raw = tensor_shapes(path)
    prefix = _find_prefix(path, raw, _ANCHOR, _EXPECTED, "gemma2", prefix)
    shapes = {k[len(prefix):]: s for k, (s, _) in raw.items() if k.startswith(prefix)}
    if _GEMMA2_ONLY not in shapes or "embed_tokens.weight" not in shapes:
        from library.autoencoders import describe_checkpoint

        what = describe_checkpoint(raw) or "another language model"
        raise ModelFileError(f"{path}: expected {_EXPECTED}, but this file looks like {what}. Pass Lumina's "
                             "gemma_2_2b_fp16.safetensors to --gemma2.")
    vocab, hidden = shapes["embed_tokens.weight"]
    q_rows, k_rows = shapes[_ANCHOR][0], shapes["layers.0.self_attn.k_proj.weight"][0]
    if q_rows % HEAD_DIM or k_rows % HEAD_DIM:
        raise ModelFileError(f"{path}: attention projections of {q_rows} and {k_rows} rows are not multiples of "
                             f"Gemma2's head size {HEAD_DIM}; this is not a Gemma2-2B layout we can load.")
    config = gemma2_config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=shapes["layers.0.mlp.gate_proj.weight"][0],
        num_hidden_layers=1 + _max_block(shapes, r"layers\.(\d+)\."), num_attention_heads=q_rows // HEAD_DIM,
        num_key_value_heads=k_rows // HEAD_DIM, head_dim=HEAD_DIM,
    )
    model = _build_without_weights(Gemma2Model, config)
    wanted = set(model.state_dict())
    keys = [prefix + k for k in shapes if k in wanted]
    _check_complete(path, wanted, {k[len(prefix):] for k in keys}, "Gemma2 text encoder")
    target = _compute_dtype(_torch_dtype(raw[prefix + _ANCHOR][1]), dtype)
    if target == torch.float16:
        logger.warning("%s: running Gemma2 in float16 can overflow; use bf16 or fp32 for the text encoder.", path)
    tensors = load_file(path, device=device, keys=keys)   # to a GPU: read straight into GPU memory
    state = {k[len(prefix):]: t.to(device=device, dtype=target) for k, t in _popping(tensors)}
    model.load_state_dict(state, assign=True, strict=True)
    return model.to(device).eval().requires_grad_(False)


def embedded_spiece_model(path: str | os.PathLike) -> bytes | None:
    """The sentencepiece model stored in the file (`spiece_model`, uint8), or None. In an
    all-in-one file the copy next to the Gemma2 weights is taken."""
    keys = [k for k in tensor_shapes(path) if k == SPIECE_KEY or k.endswith("." + SPIECE_KEY)]
    if not keys:
        return None
    if len(keys) > 1:
        prefix = gemma2_prefix(path)
        keys = [k for k in keys if prefix.startswith(k[: -len(SPIECE_KEY)])] or keys
    tensor = load_file(path, keys=keys[:1])[keys[0]]
    if tensor.dtype != torch.uint8 or tensor.ndim != 1:
        raise ModelFileError(f"{path}: {keys[0]} is a {tensor.dtype} tensor of shape {tuple(tensor.shape)}; the "
                             "embedded tokenizer should be a 1-D uint8 tensor. The file is damaged.")
    return tensor.numpy().tobytes()


def tokenizer_from_spiece(spiece_model: bytes, source: str = "the embedded spiece_model"):
    """transformers' GemmaTokenizer from sentencepiece model bytes (converted in memory)."""
    from transformers import GemmaTokenizer

    from library.text_encoders import _checked

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "tokenizer.model").write_bytes(spiece_model)
        try:
            # The hub's tokenizer config adds <bos>; a bare sentencepiece model does not say so.
            tokenizer = _checked(GemmaTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=False))
        except Exception as e:  # sentencepiece / transformers raise several types for bad bytes
            raise ModelFileError(f"{source}: cannot read the Gemma tokenizer ({type(e).__name__}: {e}). Pass "
                                 "--tokenizer_cache_dir or a tokenizer folder instead.") from e
    return tokenizer


def load_gemma2_tokenizer(gemma2_path: str | os.PathLike | None = None, *, local_path: str | os.PathLike | None = None,
                          cache_dir: str | os.PathLike | None = None, offline: bool = False):
    """An explicit tokenizer folder > the tokenizer embedded in the Gemma2 file > DIR/google_gemma-2-2b
    in the cache dir > the hub. Padding goes on the right (Lumina reads the real length from the mask)."""
    spiece = embedded_spiece_model(gemma2_path) if gemma2_path is not None and local_path is None else None
    if spiece is not None:
        tokenizer = tokenizer_from_spiece(spiece, f"{gemma2_path} ({SPIECE_KEY})")
    else:
        from transformers import GemmaTokenizer

        tokenizer = load_tokenizer(GEMMA2_TOKENIZER_ID, GemmaTokenizer, cache_dir=cache_dir, local_path=local_path,
                                   offline=offline)
    tokenizer.padding_side = "right"
    return tokenizer
