"""The FLUX / Chroma text-encoding step, shared by training, caching, sampling and inference.

CLIP-L: 77 tokens, max-length padding; its `pooler_output` (the EOS token's state after the final
layer norm, no projection) is the DiT's `y`. T5-XXL: `t5_max_length` tokens (512 dev and
Chroma, 256 schnell; the caller passes it), max-length padding; its last hidden state is the
DiT's `txt`. The T5 attention mask is given to T5 and returned for the DiT only with
`apply_t5_attn_mask` (Chroma needs it). Chroma has no CLIP: `l_pooled` is zeros.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from library.flux.sampling import FluxConditioning, prepare_txt_ids
from library.text_cache import TextCacheAdapter, cache_entries
from library.text_encoders import model_device, output_dtype

CLIP_MAX_LENGTH = 77
CLIP_L_WIDTH = 768


@dataclass
class FluxTextOutputs:
    l_pooled: Tensor       # (B, 768) CLIP-L pooled output (zeros for Chroma)
    t5_out: Tensor         # (B, L, 4096) T5 last hidden state
    txt_ids: Tensor        # (B, L, 3) zeros
    t5_attn_mask: Tensor   # (B, L) int, 1 = real token (always returned, even when not applied)

    CACHE_KEYS = ("l_pooled", "t5_out", "txt_ids", "t5_attn_mask")

    def conditioning(self, apply_t5_attn_mask: bool, dtype: torch.dtype | None = None) -> FluxConditioning:
        """What the DiT takes; the mask only when it is applied."""
        dtype = dtype or self.t5_out.dtype
        return FluxConditioning(
            txt=self.t5_out.to(dtype), txt_ids=self.txt_ids, vec=self.l_pooled.to(dtype),
            txt_mask=self.t5_attn_mask if apply_t5_attn_mask else None,
        )

    @staticmethod
    def from_cache(batch: dict[str, Tensor]) -> "FluxTextOutputs":
        """From a batch of cached entries (a dict of stacked tensors, see encode_for_cache)."""
        return FluxTextOutputs(*(batch[k] for k in FluxTextOutputs.CACHE_KEYS))

    def to(self, device: torch.device | str) -> "FluxTextOutputs":
        return FluxTextOutputs(*(getattr(self, k).to(device) for k in self.CACHE_KEYS))


class FluxTextEncoding:
    """Tokenize + encode captions for FLUX (clip_l given) or Chroma (clip_l None).

    `weights_identity` names the encoder weights (see library.text_encoders.file_fingerprint);
    it is part of `identity`, the key that keeps a text cache valid."""

    def __init__(self, clip_tokenizer, t5_tokenizer, clip_l: nn.Module | None, t5: nn.Module, t5_max_length: int,
                 apply_t5_attn_mask: bool, *, weights_identity: str = "", clip_width: int = CLIP_L_WIDTH):
        if clip_l is not None and clip_tokenizer is None:
            raise ValueError("a CLIP model needs its tokenizer")
        self.clip_tokenizer = clip_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.clip_l = clip_l
        self.t5 = t5
        self.t5_max_length = t5_max_length
        self.apply_t5_attn_mask = apply_t5_attn_mask
        self.weights_identity = weights_identity
        self.clip_width = clip_l.config.hidden_size if clip_l is not None else clip_width

    @property
    def identity(self) -> str:
        return (f"flux-text-v1|{self.weights_identity}|clip={'yes' if self.clip_l is not None else 'no'}"
                f"|t5_max_length={self.t5_max_length}|apply_t5_attn_mask={self.apply_t5_attn_mask}")

    @classmethod
    def from_files(cls, *, clip_l_path: str | os.PathLike | None, t5xxl_path: str | os.PathLike, t5_max_length: int,
                   apply_t5_attn_mask: bool, tokenizer_cache_dir: str | os.PathLike | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   t5_fp8_storage: bool = False) -> "FluxTextEncoding":
        """Load tokenizers and encoders (clip_l_path None for Chroma) and name them in `identity`."""
        from library import text_encoders as te

        clip_l = te.load_clip_l(clip_l_path, device=device, dtype=dtype) if clip_l_path is not None else None
        clip_tok = te.load_clip_l_tokenizer(tokenizer_cache_dir) if clip_l_path is not None else None
        t5 = te.load_t5xxl(t5xxl_path, device=device, dtype=dtype, fp8_storage=t5_fp8_storage)
        t5_tok = te.load_t5xxl_tokenizer(tokenizer_cache_dir)
        files = [te.file_fingerprint(p) for p in (clip_l_path, t5xxl_path) if p is not None]
        return cls(clip_tok, t5_tok, clip_l, t5, t5_max_length, apply_t5_attn_mask, weights_identity="|".join(files))

    def tokenize_t5(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        tokens = self.t5_tokenizer(captions, padding="max_length", max_length=self.t5_max_length, truncation=True,
                                   return_tensors="pt")
        return tokens.input_ids, tokens.attention_mask

    def encode(self, captions: list[str]) -> FluxTextOutputs:
        """Gradients flow if the caller enables them (text-encoder training)."""
        t5_out, mask = self.encode_t5(captions)
        return FluxTextOutputs(
            l_pooled=self.encode_clip_pooled(captions).to(t5_out.device),
            t5_out=t5_out,
            txt_ids=prepare_txt_ids(len(captions), t5_out.shape[1], device=t5_out.device),
            t5_attn_mask=mask,
        )

    def encode_clip_pooled(self, captions: list[str]) -> Tensor:
        """(B, 768) CLIP-L pooled output; zeros for Chroma (no CLIP-L)."""
        if self.clip_l is None:
            return torch.zeros(len(captions), self.clip_width, device=model_device(self.t5),
                               dtype=output_dtype(self.t5))
        clip_ids = self.clip_tokenizer(captions, padding="max_length", max_length=CLIP_MAX_LENGTH,
                                       truncation=True, return_tensors="pt").input_ids
        return self.clip_l(clip_ids.to(model_device(self.clip_l))).pooler_output

    def encode_t5(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """(T5 last hidden state (B, L, 4096), token mask (B, L))."""
        t5_device = model_device(self.t5)
        input_ids, mask = self.tokenize_t5(captions)
        input_ids, mask = input_ids.to(t5_device), mask.to(t5_device)
        t5_out = self.t5(input_ids, attention_mask=mask if self.apply_t5_attn_mask else None).last_hidden_state
        return t5_out, mask

    @torch.no_grad()
    def encode_for_cache(self, captions: list[str]) -> list[dict[str, Tensor]]:
        """One dict per caption, on the CPU, float32, with sd-scripts' _flux_te.npz names."""
        entries = cache_entries(self.encode(captions), FluxTextOutputs.CACHE_KEYS,
                                float32=("l_pooled", "t5_out"))
        for entry in entries:
            entry["apply_t5_attn_mask"] = torch.tensor(self.apply_t5_attn_mask)
        return entries


class FluxTextCacheEncoder(TextCacheAdapter):
    """A FluxTextEncoding as the data pipeline's TextCacheEncoder (identity + encode -> dicts)."""
