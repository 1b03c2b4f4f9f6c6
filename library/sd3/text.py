"""The SD3 text-encoding step, shared by training, caching, sampling and inference.

- CLIP-L and CLIP-G (both CLIPTextModelWithProjection) read 77 tokens with max-length
  padding (CLIP-G pads with id 0). Their penultimate hidden states (hidden_states[-2], no final
  layer norm) are concatenated along channels (768 + 1280 = 2048) -> `lg_out`; their projected
  pooled outputs (`text_embeds`) are concatenated -> `lg_pooled` (2048), the MMDiT's `y`.
- T5-XXL reads `t5_max_length` tokens (--t5xxl_max_token_length, default 256); its last hidden
  state is `t5_out`. Without a T5, zeros of 77 tokens stand in for it.
- The MMDiT's context is lg_out zero-padded to the T5 width (4096), followed by t5_out along
  the tokens (77 + 256 tokens).
- --apply_lg_attn_mask / --apply_t5_attn_mask pass the padding masks into the encoders only; the
  MMDiT attends to every token (SD3 was trained that way).
- --clip_l_dropout_rate / --clip_g_dropout_rate / --t5_dropout_rate drop an encoder per sample:
  its states, its pooled part and its mask become zeros. During encoding the dropped samples
  are not run through that encoder; on cached outputs the same zeroing is applied at train
  time (`TextDropout.apply`), as sd-scripts does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from library.text_cache import TextCacheAdapter, cache_entries
from library.text_encoders import model_device, output_dtype

CLIP_MAX_LENGTH = 77
DEFAULT_T5_MAX_LENGTH = 256
CONTEXT_WIDTH = 4096   # T5-XXL's width; the CLIP states are padded to it


@dataclass
class SD3Conditioning:
    """What the MMDiT is conditioned on for one prompt batch."""

    context: Tensor    # (B, 77 + L, context width)
    y: Tensor          # (B, pooled width)


@dataclass
class SD3TextOutputs:
    """Field names are sd-scripts' `_sd3_te.npz` keys."""

    lg_out: Tensor             # (B, 77, CLIP-L + CLIP-G width) penultimate states, not padded
    t5_out: Tensor             # (B, L, T5 width); zeros of 77 tokens without a T5
    lg_pooled: Tensor          # (B, CLIP-L + CLIP-G projection widths)
    clip_l_attn_mask: Tensor   # (B, 77) 1 = real token (always returned, even when not applied)
    clip_g_attn_mask: Tensor   # (B, 77)
    t5_attn_mask: Tensor       # (B, L)

    CACHE_KEYS = ("lg_out", "t5_out", "lg_pooled", "clip_l_attn_mask", "clip_g_attn_mask", "t5_attn_mask")

    def context(self, dtype: torch.dtype | None = None) -> Tensor:
        """(B, 77 + L, T5 width): the CLIP states zero-padded to the T5 width, then the T5 states."""
        width = self.t5_out.shape[-1]
        if self.lg_out.shape[-1] > width:
            raise ValueError(f"the CLIP states ({self.lg_out.shape[-1]} wide) do not fit the context width {width}")
        lg = F.pad(self.lg_out, (0, width - self.lg_out.shape[-1]))
        context = torch.cat((lg.to(self.t5_out.dtype), self.t5_out), dim=1)
        return context if dtype is None else context.to(dtype)

    def conditioning(self, dtype: torch.dtype | None = None) -> SD3Conditioning:
        y = self.lg_pooled if dtype is None else self.lg_pooled.to(dtype)
        return SD3Conditioning(context=self.context(dtype), y=y)

    @staticmethod
    def from_cache(batch: dict[str, Tensor]) -> "SD3TextOutputs":
        """From a batch of cached entries (a dict of stacked tensors, see encode_for_cache)."""
        return SD3TextOutputs(*(batch[k] for k in SD3TextOutputs.CACHE_KEYS))

    def to(self, device: torch.device | str) -> "SD3TextOutputs":
        return SD3TextOutputs(*(getattr(self, k).to(device) for k in self.CACHE_KEYS))

    def clone(self) -> "SD3TextOutputs":
        return SD3TextOutputs(*(getattr(self, f.name).clone() for f in fields(self)))


# ---------------------------------------------------------------------------------------------
# Per-encoder caption dropout.

@dataclass(frozen=True)
class TextDropout:
    """Per-sample dropout of each encoder's output (SD3 paper; sd-scripts' three rates).

    Draws follow sd-scripts' order: for each sample a CLIP-L then a CLIP-G draw, then one T5
    draw per sample. `generator` None uses torch's global generator (seeded by the trainer)."""

    clip_l: float = 0.0
    clip_g: float = 0.0
    t5: float = 0.0

    def __post_init__(self):
        for name, rate in (("clip_l_dropout_rate", self.clip_l), ("clip_g_dropout_rate", self.clip_g),
                           ("t5_dropout_rate", self.t5)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"--{name} must be in [0, 1], got {rate}")

    @property
    def active(self) -> bool:
        return self.clip_l > 0 or self.clip_g > 0 or self.t5 > 0

    def draw(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Boolean keep masks (B,) for CLIP-L, CLIP-G and T5."""
        lg = torch.rand(batch_size, 2, generator=generator)
        t5 = torch.rand(batch_size, generator=generator)
        return lg[:, 0] >= self.clip_l, lg[:, 1] >= self.clip_g, t5 >= self.t5

    def apply(self, out: SD3TextOutputs, clip_l_width: int, clip_l_pooled_width: int | None = None,
              generator: torch.Generator | None = None) -> SD3TextOutputs:
        """Zero dropped parts of (cached) outputs; returns a new object. clip_l_width splits
        lg_out (768 real) and clip_l_pooled_width lg_pooled (the CLIP-L projection, 768)."""
        if not self.active:
            return out
        pooled_split = clip_l_width if clip_l_pooled_width is None else clip_l_pooled_width
        keep_l, keep_g, keep_t5 = (k.to(out.lg_out.device) for k in self.draw(out.lg_out.shape[0], generator))
        out = out.clone()
        for keep, states, pooled, mask in (
            (keep_l, out.lg_out[..., :clip_l_width], out.lg_pooled[..., :pooled_split], out.clip_l_attn_mask),
            (keep_g, out.lg_out[..., clip_l_width:], out.lg_pooled[..., pooled_split:], out.clip_g_attn_mask),
            (keep_t5, out.t5_out, None, out.t5_attn_mask),
        ):
            drop = ~keep
            states[drop] = 0
            mask[drop] = 0
            if pooled is not None:
                pooled[drop] = 0
        return out


# ---------------------------------------------------------------------------------------------
# Encoding.

class SD3TextEncoding:
    """Tokenize + encode captions for SD3. `t5` may be None (zeros are used in its place; then
    `context_width` gives their width, 4096 for the real model).

    `weights_identity` names the encoder weights (see library.text_encoders.file_fingerprint);
    it is part of `identity`, the key that keeps a text cache valid."""

    def __init__(self, clip_l_tokenizer, clip_g_tokenizer, t5_tokenizer, clip_l: nn.Module, clip_g: nn.Module,
                 t5: nn.Module | None, *, t5_max_length: int = DEFAULT_T5_MAX_LENGTH,
                 apply_lg_attn_mask: bool = False, apply_t5_attn_mask: bool = False,
                 dropout: TextDropout = TextDropout(), weights_identity: str = "",
                 context_width: int | None = None):
        if t5 is not None and t5_tokenizer is None:
            raise ValueError("a T5 model needs its tokenizer")
        if t5_max_length < 1:
            raise ValueError(f"--t5xxl_max_token_length must be >= 1, got {t5_max_length}")
        if clip_g_tokenizer.pad_token_id != 0:
            raise ValueError("the CLIP-G tokenizer must pad with id 0 (load it with load_clip_g_tokenizer)")
        self.clip_l_tokenizer = clip_l_tokenizer
        self.clip_g_tokenizer = clip_g_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.clip_l = clip_l
        self.clip_g = clip_g
        self.t5 = t5
        self.t5_max_length = t5_max_length
        self.apply_lg_attn_mask = apply_lg_attn_mask
        self.apply_t5_attn_mask = apply_t5_attn_mask
        self.dropout = dropout
        self.weights_identity = weights_identity
        self.context_width = t5.config.d_model if t5 is not None else (context_width or CONTEXT_WIDTH)
        if context_width is not None and context_width != self.context_width:
            raise ValueError(f"the T5 width {self.context_width} differs from the MMDiT context width {context_width}")

    @property
    def clip_l_width(self) -> int:
        return self.clip_l.config.hidden_size

    @property
    def clip_l_pooled_width(self) -> int:
        return self.clip_l.config.projection_dim

    @property
    def identity(self) -> str:
        return (f"sd3-text-v1|{self.weights_identity}|t5={'yes' if self.t5 is not None else 'no'}"
                f"|t5_max_length={self.t5_max_length}|apply_lg_attn_mask={self.apply_lg_attn_mask}"
                f"|apply_t5_attn_mask={self.apply_t5_attn_mask}")

    @classmethod
    def from_files(cls, *, checkpoint: str | os.PathLike | None, clip_l_path=None, clip_g_path=None,
                   t5xxl_path=None, t5_max_length: int = DEFAULT_T5_MAX_LENGTH, apply_lg_attn_mask: bool = False,
                   apply_t5_attn_mask: bool = False, dropout: TextDropout = TextDropout(),
                   tokenizer_cache_dir=None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   t5_fp8_storage: bool = False, require_t5: bool = True,
                   context_width: int | None = None) -> "SD3TextEncoding":
        """Load the three encoders (separate files win over copies inside the checkpoint) and
        their tokenizers, and name the files in `identity`."""
        from library import text_encoders as te
        from library.sd3.loading import load_sd3_clip_g, load_sd3_clip_l, load_sd3_t5xxl

        clip_l = load_sd3_clip_l(checkpoint, clip_l_path, device=device, dtype=dtype)
        clip_g = load_sd3_clip_g(checkpoint, clip_g_path, device=device, dtype=dtype)
        t5 = load_sd3_t5xxl(checkpoint, t5xxl_path, device=device, dtype=dtype, fp8_storage=t5_fp8_storage,
                            required=require_t5)
        # Each encoder is named by the file it came from (its own file, else the checkpoint).
        sources = [clip_l_path or checkpoint, clip_g_path or checkpoint]
        if t5 is not None:
            sources.append(t5xxl_path or checkpoint)
        files = [te.file_fingerprint(p) for p in dict.fromkeys(sources) if p is not None]
        return cls(
            te.load_clip_l_tokenizer(tokenizer_cache_dir), te.load_clip_g_tokenizer(tokenizer_cache_dir),
            te.load_t5xxl_tokenizer(tokenizer_cache_dir) if t5 is not None else None, clip_l, clip_g, t5,
            t5_max_length=t5_max_length, apply_lg_attn_mask=apply_lg_attn_mask,
            apply_t5_attn_mask=apply_t5_attn_mask, dropout=dropout, weights_identity="|".join(files),
            context_width=context_width,
        )

    # -- tokenizing ---------------------------------------------------------------------------

    @staticmethod
    def _tokens(tokenizer, captions: list[str], length: int) -> tuple[Tensor, Tensor]:
        tokens = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return tokens.input_ids, tokens.attention_mask

    def tokenize(self, captions: list[str]) -> dict[str, Tensor]:
        out = {}
        out["clip_l_ids"], out["clip_l_mask"] = self._tokens(self.clip_l_tokenizer, captions, CLIP_MAX_LENGTH)
        out["clip_g_ids"], out["clip_g_mask"] = self._tokens(self.clip_g_tokenizer, captions, CLIP_MAX_LENGTH)
        if self.t5 is not None:
            out["t5_ids"], out["t5_mask"] = self._tokens(self.t5_tokenizer, captions, self.t5_max_length)
        return out

    # -- encoding -----------------------------------------------------------------------------

    def _encode_clip(self, model: nn.Module, ids: Tensor, mask: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(penultimate states, projected pooled, mask) with dropped samples zeroed and not run."""
        device = model_device(model)
        batch, length = ids.shape
        states = torch.zeros(batch, length, model.config.hidden_size, device=device, dtype=output_dtype(model))
        pooled = torch.zeros(batch, model.config.projection_dim, device=device, dtype=output_dtype(model))
        mask = mask.to(device) * keep.to(device)[:, None].to(mask.dtype)
        kept = keep.nonzero().flatten().tolist()
        if kept:
            index = torch.tensor(kept, device=device)
            ids_kept = ids.to(device)[index]
            out = model(ids_kept, attention_mask=mask[index] if self.apply_lg_attn_mask else None,
                        output_hidden_states=True)
            if len(kept) == batch:
                return out.hidden_states[-2], out.text_embeds, mask
            states = states.to(out.text_embeds.dtype).index_copy(0, index, out.hidden_states[-2])
            pooled = pooled.to(out.text_embeds.dtype).index_copy(0, index, out.text_embeds)
        return states, pooled, mask

    def _encode_t5(self, ids: Tensor, mask: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        device = model_device(self.t5)
        batch, length = ids.shape
        mask = mask.to(device) * keep.to(device)[:, None].to(mask.dtype)
        kept = keep.nonzero().flatten().tolist()
        states = torch.zeros(batch, length, self.context_width, device=device, dtype=output_dtype(self.t5))
        if kept:
            index = torch.tensor(kept, device=device)
            out = self.t5(ids.to(device)[index], attention_mask=mask[index] if self.apply_t5_attn_mask else None
                          ).last_hidden_state
            if len(kept) == batch:
                return out, mask
            states = states.to(out.dtype).index_copy(0, index, out)
        return states, mask

    # -- one encoder at a time (text-encoder LoRA: the trained ones run, the others may be cached)

    def encode_clip_l(self, captions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """CLIP-L alone: penultimate states (B, 77, width), projected pooled (B, proj), mask (B, 77)."""
        ids, mask = self._tokens(self.clip_l_tokenizer, captions, CLIP_MAX_LENGTH)
        return self._encode_clip(self.clip_l, ids, mask, torch.ones(len(captions), dtype=torch.bool))

    def encode_clip_g(self, captions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """CLIP-G alone, as encode_clip_l."""
        ids, mask = self._tokens(self.clip_g_tokenizer, captions, CLIP_MAX_LENGTH)
        return self._encode_clip(self.clip_g, ids, mask, torch.ones(len(captions), dtype=torch.bool))

    def encode_t5_states(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """T5 alone: last hidden states (B, L, width) and mask (B, L); zeros of 77 tokens without a T5."""
        if self.t5 is None:
            device = model_device(self.clip_l)
            return (torch.zeros(len(captions), CLIP_MAX_LENGTH, self.context_width, device=device,
                                dtype=output_dtype(self.clip_l)),
                    torch.zeros(len(captions), CLIP_MAX_LENGTH, dtype=torch.long, device=device))
        ids, mask = self._tokens(self.t5_tokenizer, captions, self.t5_max_length)
        return self._encode_t5(ids, mask, torch.ones(len(captions), dtype=torch.bool))

    def encode(self, captions: list[str], *, enable_dropout: bool = False,
               generator: torch.Generator | None = None) -> SD3TextOutputs:
        """Gradients flow if the caller enables them (text-encoder training). The dropout rates
        apply only with enable_dropout (training without a text cache)."""
        tokens = self.tokenize(captions)
        batch = len(captions)
        if enable_dropout and self.dropout.active:
            keep_l, keep_g, keep_t5 = self.dropout.draw(batch, generator)
        else:
            keep_l = keep_g = keep_t5 = torch.ones(batch, dtype=torch.bool)

        l_states, l_pooled, l_mask = self._encode_clip(self.clip_l, tokens["clip_l_ids"], tokens["clip_l_mask"],
                                                       keep_l)
        g_states, g_pooled, g_mask = self._encode_clip(self.clip_g, tokens["clip_g_ids"], tokens["clip_g_mask"],
                                                       keep_g)
        device = l_states.device
        lg_out = torch.cat((l_states, g_states.to(device)), dim=-1)
        lg_pooled = torch.cat((l_pooled, g_pooled.to(device)), dim=-1)
        if self.t5 is not None:
            t5_out, t5_mask = self._encode_t5(tokens["t5_ids"], tokens["t5_mask"], keep_t5)
        else:
            t5_out = torch.zeros(batch, CLIP_MAX_LENGTH, self.context_width, device=device, dtype=lg_out.dtype)
            t5_mask = torch.zeros(batch, CLIP_MAX_LENGTH, dtype=torch.long, device=device)
        return SD3TextOutputs(lg_out=lg_out, t5_out=t5_out, lg_pooled=lg_pooled, clip_l_attn_mask=l_mask,
                              clip_g_attn_mask=g_mask.to(device), t5_attn_mask=t5_mask)

    @torch.no_grad()
    def encode_for_cache(self, captions: list[str]) -> list[dict[str, Tensor]]:
        """One dict per caption, on the CPU, float32, with sd-scripts' _sd3_te.npz names. No
        dropout (it is applied to cached outputs at train time)."""
        entries = cache_entries(self.encode(captions), SD3TextOutputs.CACHE_KEYS,
                                float32=("lg_out", "t5_out", "lg_pooled"))
        for entry in entries:
            entry["apply_lg_attn_mask"] = torch.tensor(self.apply_lg_attn_mask)
            entry["apply_t5_attn_mask"] = torch.tensor(self.apply_t5_attn_mask)
        return entries


class SD3TextCacheEncoder(TextCacheAdapter):
    """An SD3TextEncoding as the data pipeline's TextCacheEncoder (identity + encode -> dicts)."""
