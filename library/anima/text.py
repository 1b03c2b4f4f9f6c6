"""Anima's text step, shared by training, caching, sampling and inference: Qwen3-0.6B + T5 ids.

Qwen3-0.6B is transformers' `Qwen3Model` (no LM head), loaded from a Hugging Face model folder or
from a single .safetensors file with the bundled config (configs/qwen3_06b/) and the sizes read
from the shapes (head size from the q-norm width), so tiny files load through the same code. It
is always frozen. A leading `model.` in the keys is stripped; `lm_head.weight` is ignored.

Each caption is tokenized twice, both with max-length padding and truncation and with no chat
template or system prompt: by Qwen3's tokenizer (`--qwen3_max_token_length`, 512) for the
encoder, whose last hidden state (after the final norm) is zeroed at padded positions; and by
the T5 tokenizer (`--t5_max_token_length`, 512), whose ids and mask only feed the DiT's LLM
adapter (T5 itself never runs). Tokenizers load from the Qwen3 folder / `--t5_tokenizer_path`,
from `--tokenizer_cache_dir` (DIR/Qwen_Qwen3-0.6B, DIR/google_t5-v1_1-xxl), or by hub id.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from library import text_encoders as te
from library.autoencoders import describe_checkpoint
from library.errors import ModelFileError
from library.safetensors_io import load_file, tensor_shapes
from library.text_cache import TextCacheAdapter, cache_entries

QWEN3_TOKENIZER_ID = "Qwen/Qwen3-0.6B"
DEFAULT_QWEN3_MAX_LENGTH = 512
DEFAULT_T5_MAX_LENGTH = 512
_ANCHOR = "embed_tokens.weight"
_Q_NORM = "layers.0.self_attn.q_norm.weight"


# ---------------------------------------------------------------------------------------------
# Qwen3-0.6B.

def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
        raise ModelFileError(f"{path}: this folder holds no .safetensors weights. Pass the Qwen3-0.6B model folder "
                             "or its single .safetensors file to --qwen3.")
    raise ModelFileError(f"{path}: no such file or folder. Check --qwen3.")


def qwen3_config(path: Path, shapes: dict[str, tuple[int, ...]]):
    """Bundled (or the folder's own) Qwen3 config with every size read from the shapes."""
    from transformers import Qwen3Config

    own = path / "config.json" if path.is_dir() else None
    base = json.loads(own.read_text(encoding="utf-8")) if own is not None and own.is_file() \
        else te.bundled_config("qwen3_06b")
    vocab, hidden = shapes[_ANCHOR]
    head_dim = shapes[_Q_NORM][0]
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"layers\.(\d+)\.", k)))
    sizes = dict(
        vocab_size=vocab, hidden_size=hidden, head_dim=head_dim, num_hidden_layers=layers,
        num_attention_heads=shapes["layers.0.self_attn.q_proj.weight"][0] // head_dim,
        num_key_value_heads=shapes["layers.0.self_attn.k_proj.weight"][0] // head_dim,
        intermediate_size=shapes["layers.0.mlp.gate_proj.weight"][0], max_window_layers=layers, use_cache=False,
    )
    base = {k: v for k, v in base.items() if k not in ("architectures", "transformers_version", "torch_dtype")}
    for special in ("bos_token_id", "eos_token_id", "pad_token_id"):  # unused for encoding; must fit the vocabulary
        if isinstance(base.get(special), int) and base[special] >= vocab:
            base[special] = None
    return Qwen3Config(**(base | sizes))


def load_qwen3(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Qwen3Model (frozen, eval) from a HF folder or a single file. dtype None keeps the file's."""
    from transformers import Qwen3Model

    path = Path(path)
    files = _weight_files(path)
    where: dict[str, tuple[Path, str]] = {}  # own key -> (file, key in file)
    shapes: dict[str, tuple[int, ...]] = {}
    file_dtype = None
    for f in files:
        for key, (shape, dt) in tensor_shapes(f).items():
            own = key[len("model."):] if key.startswith("model.") else key
            where[own], shapes[own] = (f, key), shape
            if own == _ANCHOR:
                file_dtype = dt
    if _ANCHOR not in shapes or _Q_NORM not in shapes:
        what = describe_checkpoint(shapes) or "an unknown kind of file"
        raise ModelFileError(f"{path}: expected the Qwen3-0.6B text encoder (e.g. qwen_3_06b_base.safetensors), but "
                             f"this looks like {what}. Pass the Qwen3 file or folder to --qwen3.")
    config = qwen3_config(path, shapes)
    model = te._build_without_weights(Qwen3Model, config)
    wanted = set(model.state_dict())
    missing = sorted(wanted - set(where))
    if missing:
        raise ModelFileError(f"{path}: the Qwen3 text encoder is missing {len(missing)} tensors (e.g. {missing[:3]}); "
                             "the file is incomplete.")
    target = te._compute_dtype(te._torch_dtype(file_dtype), dtype)
    by_file: dict[Path, list[str]] = {}
    for own in wanted:
        by_file.setdefault(where[own][0], []).append(where[own][1])
    state = {}
    for f, keys in by_file.items():
        for key, t in te._popping(load_file(f, device=device, keys=keys)):   # to a GPU: read straight into it
            own = key[len("model."):] if key.startswith("model.") else key
            state[own] = t.to(device=device, dtype=target)
    model.load_state_dict(state, assign=True, strict=True)
    return model.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Tokenizers.

def load_qwen3_tokenizer(qwen3_path: str | os.PathLike | None = None, *, cache_dir=None, offline: bool = False):
    """From the Qwen3 model folder when --qwen3 is one, else the cache dir or the hub (Qwen/Qwen3-0.6B).
    The pad token is `<|endoftext|>` (the eos when a tokenizer defines no pad)."""
    from transformers import AutoTokenizer

    local = Path(qwen3_path) if qwen3_path is not None and Path(qwen3_path).is_dir() else None
    tokenizer = te.load_tokenizer(QWEN3_TOKENIZER_ID, AutoTokenizer, cache_dir=cache_dir, local_path=local,
                                  offline=offline)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_anima_t5_tokenizer(t5_tokenizer_path: str | os.PathLike | None = None, *, cache_dir=None,
                            offline: bool = False):
    """T5 v1.1's tokenizer (google/t5-v1_1-xxl vocabulary; tokenizer files only)."""
    return te.load_t5xxl_tokenizer(cache_dir, local_path=t5_tokenizer_path, offline=offline)


# ---------------------------------------------------------------------------------------------
# Encoding.

@dataclass
class AnimaTextOutputs:
    prompt_embeds: Tensor   # (B, Lq, 1024) Qwen3 last hidden state, zero at padding
    attn_mask: Tensor       # (B, Lq) 1 = real Qwen3 token
    t5_input_ids: Tensor    # (B, Lt) T5 ids for the LLM adapter
    t5_attn_mask: Tensor    # (B, Lt) 1 = real T5 token

    CACHE_KEYS = ("prompt_embeds", "attn_mask", "t5_input_ids", "t5_attn_mask")  # sd-scripts' _anima_te.npz names

    @staticmethod
    def from_cache(batch: dict[str, Tensor]) -> "AnimaTextOutputs":
        return AnimaTextOutputs(*(batch[k] for k in AnimaTextOutputs.CACHE_KEYS))

    def to(self, device: torch.device | str) -> "AnimaTextOutputs":
        return AnimaTextOutputs(*(getattr(self, f.name).to(device) for f in fields(self)))

    def dit_kwargs(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The DiT's text arguments: `context` (Qwen3 states) plus the adapter's ids and masks."""
        embeds = self.prompt_embeds if dtype is None else self.prompt_embeds.to(dtype)
        return dict(context=embeds, t5_input_ids=self.t5_input_ids, t5_attn_mask=self.t5_attn_mask,
                    qwen3_attn_mask=self.attn_mask)


class AnimaTextEncoding:
    """Tokenize + encode captions for Anima. `weights_identity` names the Qwen3 weights; it is part
    of `identity`, the key that keeps a text cache valid."""

    def __init__(self, qwen3_tokenizer, t5_tokenizer, qwen3: nn.Module, *,
                 qwen3_max_length: int = DEFAULT_QWEN3_MAX_LENGTH, t5_max_length: int = DEFAULT_T5_MAX_LENGTH,
                 weights_identity: str = ""):
        for name, value in (("--qwen3_max_token_length", qwen3_max_length), ("--t5_max_token_length", t5_max_length)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.qwen3_tokenizer = qwen3_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.qwen3 = qwen3
        self.qwen3_max_length = qwen3_max_length
        self.t5_max_length = t5_max_length
        self.weights_identity = weights_identity

    @property
    def identity(self) -> str:
        return (f"anima-text-v1|{self.weights_identity}|qwen3_max_length={self.qwen3_max_length}"
                f"|t5_max_length={self.t5_max_length}|qwen3_vocab={len(self.qwen3_tokenizer)}"
                f"|t5_vocab={len(self.t5_tokenizer)}")

    @classmethod
    def from_files(cls, qwen3_path: str | os.PathLike, *, t5_tokenizer_path: str | os.PathLike | None = None,
                   tokenizer_cache_dir: str | os.PathLike | None = None, qwen3_max_length: int = DEFAULT_QWEN3_MAX_LENGTH,
                   t5_max_length: int = DEFAULT_T5_MAX_LENGTH, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> "AnimaTextEncoding":
        qwen3 = load_qwen3(qwen3_path, device=device, dtype=dtype)
        qwen3_tok = load_qwen3_tokenizer(qwen3_path, cache_dir=tokenizer_cache_dir)
        t5_tok = load_anima_t5_tokenizer(t5_tokenizer_path, cache_dir=tokenizer_cache_dir)
        files = _weight_files(Path(qwen3_path))
        return cls(qwen3_tok, t5_tok, qwen3, qwen3_max_length=qwen3_max_length, t5_max_length=t5_max_length,
                   weights_identity="|".join(te.file_fingerprint(f) for f in files))

    def tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        q = self.qwen3_tokenizer(captions, padding="max_length", max_length=self.qwen3_max_length, truncation=True,
                                 return_tensors="pt")
        t = self.t5_tokenizer(captions, padding="max_length", max_length=self.t5_max_length, truncation=True,
                              return_tensors="pt")
        return q.input_ids, q.attention_mask, t.input_ids, t.attention_mask

    def encode(self, captions: list[str]) -> AnimaTextOutputs:
        """Gradients flow if the caller enables them (Qwen3 LoRA training)."""
        ids, mask, t5_ids, t5_mask = self.tokenize(captions)
        device = next(self.qwen3.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        hidden = self.qwen3(input_ids=ids, attention_mask=mask).last_hidden_state
        # where(), not a product: a caption with no token at all may give NaN states, which must become 0.
        hidden = torch.where(mask.bool()[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=device))
        return AnimaTextOutputs(hidden, mask, t5_ids.to(device), t5_mask.to(device))

    @torch.no_grad()
    def encode_for_cache(self, captions: list[str]) -> list[dict[str, Tensor]]:
        """One dict per caption, on the CPU; the embeddings in float32."""
        return cache_entries(self.encode(captions), AnimaTextOutputs.CACHE_KEYS, float32=("prompt_embeds",))


class AnimaTextCacheEncoder(TextCacheAdapter):
    """An AnimaTextEncoding as the data pipeline's TextCacheEncoder (identity + encode -> dicts)."""

    file_suffix = "_anima_te"  # cache files `<stem>_anima_te.safetensors`, as sd-scripts' `_anima_te.npz`
