"""The SD 1.x / 2.x text-encoding step, shared by training, caching and sample images.

- Tokenizers: `openai/clip-vit-large-patch14` (SD 1.x, pads with its end token) and the
  tokenizer of `stabilityai/stable-diffusion-2` (SD 2.x, pads with "!" = id 0), from a diffusers
  folder's tokenizer/, from --tokenizer_cache_dir (folders named after the hub ids with '/'
  replaced by '_'), or from the hub.
- 77 tokens per caption by default. With --max_token_length 150 or 225 the caption is tokenized
  to 75·n + 2 tokens and cut into n chunks of 77 (start token + 75 tokens + the sequence's last
  token). When the tokenizer pads with a token other than its end token (SD 2.x), a chunk whose
  text runs to its end gets an end token in its last place, and a chunk that starts with padding
  gets an end token first (sd-scripts' rule).
- Each chunk is encoded separately; the states are joined as the first chunk's start state,
  the 75 middle states of every chunk, and the last chunk's last state (77, 152 or 227 states).
- --clip_skip k: hidden_states[-k] followed by the final layer norm (1 is the last layer). SD 2.x's
  encoder is built without OpenCLIP's last layer, so no clip_skip already reads its penultimate
  layer, as SD 2.x was trained.
- Prompt weighting (library/sd/prompt_weighting.py, A1111 syntax): `encode_weighted` multiplies
  each token's states by its weight, then rescales each caption's states so that their mean (over
  all positions and channels, as diffusers' long-prompt-weighting pipeline does) equals the
  unweighted mean. The states keep the layout above (75·n + 2). A caption whose weights are all 1
  gives exactly the unweighted states. Sample prompts and sd_minimal_inference.py always use it;
  training captions with --weighted_captions (`weighted_captions=True`: `encode` then weights, and
  the cache identity says so).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from library.text_cache import TextCacheAdapter

MODEL_MAX_LENGTH = 77
CHUNK = MODEL_MAX_LENGTH - 2      # 75 caption tokens per chunk
V1_TOKENIZER_ID = "openai/clip-vit-large-patch14"
V2_TOKENIZER_ID = "stabilityai/stable-diffusion-2"
MAX_TOKEN_LENGTHS = (75, 150, 225)
CACHE_KEY = "encoder_hidden_states"


def load_sd_tokenizer(v2: bool, *, cache_dir: str | os.PathLike | None = None,
                      local_path: str | os.PathLike | None = None):
    """The CLIP tokenizer of SD 1.x or 2.x (see the module docstring for where it comes from)."""
    from transformers import CLIPTokenizer

    from library.text_encoders import load_tokenizer

    if v2:
        return load_tokenizer(V2_TOKENIZER_ID, CLIPTokenizer, cache_dir=cache_dir, local_path=local_path,
                              subfolder="tokenizer")
    return load_tokenizer(V1_TOKENIZER_ID, CLIPTokenizer, cache_dir=cache_dir, local_path=local_path)


def chunk_count(max_token_length: int | None) -> int:
    if max_token_length is None:
        return 1
    if max_token_length not in MAX_TOKEN_LENGTHS:
        raise ValueError(f"max_token_length must be one of {MAX_TOKEN_LENGTHS}, got {max_token_length}")
    return max_token_length // CHUNK


def _final_layer_norm(text_encoder: nn.Module) -> nn.Module:
    model = getattr(text_encoder, "text_model", text_encoder)
    norm = getattr(model, "final_layer_norm", None) or getattr(getattr(model, "text_model", None), "final_layer_norm",
                                                               None)
    if norm is None:
        raise TypeError(f"{type(text_encoder).__name__} has no final_layer_norm; not a CLIP text model")
    return norm


class SDTextEncoding:
    """Tokenize + encode captions for SD 1.x/2.x. Gradients flow when the caller enables them
    (text-encoder LoRA). `weights_identity` names the encoder weights; it is part of `identity`,
    the key that keeps a text cache valid."""

    def __init__(self, tokenizer, text_encoder: nn.Module, *, clip_skip: int | None = None,
                 max_token_length: int | None = None, weights_identity: str = "", weighted_captions: bool = False):
        layers = text_encoder.config.num_hidden_layers
        if clip_skip is not None and not 1 <= clip_skip <= layers:
            raise ValueError(f"clip_skip must be between 1 and the encoder's {layers} layers, got {clip_skip}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.clip_skip = clip_skip
        self.max_token_length = max_token_length
        self.chunks = chunk_count(max_token_length)
        self.weights_identity = weights_identity
        self.weighted_captions = weighted_captions

    @property
    def identity(self) -> str:
        tok = self.tokenizer
        return (f"sd-text-v1|{self.weights_identity}|vocab={len(tok)}|pad={tok.pad_token_id}|eos={tok.eos_token_id}"
                f"|clip_skip={self.clip_skip}|max_token_length={self.max_token_length}"
                + ("|weighted_captions=a1111-mean-rescale" if self.weighted_captions else ""))

    @property
    def width(self) -> int:
        return self.text_encoder.config.hidden_size

    @property
    def sequence_length(self) -> int:
        return self.chunks * CHUNK + 2

    def tokenize(self, captions: list[str]) -> Tensor:
        """(B, chunks, 77) token ids."""
        tok = self.tokenizer
        total = self.sequence_length
        ids = tok(list(captions), padding="max_length", truncation=True, max_length=total,
                  return_tensors="pt").input_ids
        return self._chunked(ids)

    def _chunked(self, ids: Tensor) -> Tensor:
        """(B, 75·chunks + 2) padded ids -> (B, chunks, 77)."""
        tok = self.tokenizer
        total = self.sequence_length
        if self.chunks == 1:
            return ids[:, None]
        eos, pad = tok.eos_token_id, tok.pad_token_id
        rows = []
        for row in ids:
            pieces = []
            for start in range(1, total - 1, CHUNK):
                chunk = torch.cat([row[:1], row[start:start + CHUNK], row[-1:]])
                if pad != eos:
                    if chunk[-2] != eos and chunk[-2] != pad:
                        chunk[-1] = eos    # the text runs on past this chunk: close it
                    if chunk[1] == pad:
                        chunk[1] = eos     # an empty chunk reads <start> <end> <pad>...
                pieces.append(chunk)
            rows.append(torch.stack(pieces))
        return torch.stack(rows)

    def encode_ids(self, ids: Tensor) -> Tensor:
        """(B, chunks, 77) ids -> (B, 75·chunks + 2, width) states."""
        b, n, length = ids.shape
        device = next(self.text_encoder.parameters()).device
        flat = ids.reshape(b * n, length).to(device)
        if self.clip_skip is None:
            states = self.text_encoder(flat).last_hidden_state
        else:
            out = self.text_encoder(flat, output_hidden_states=True)
            states = _final_layer_norm(self.text_encoder)(out.hidden_states[-self.clip_skip])
        states = states.reshape(b, n * length, states.shape[-1])
        parts = [states[:, :1]]
        parts += [states[:, start:start + CHUNK] for start in range(1, n * length, length)]
        parts.append(states[:, -1:])
        return torch.cat(parts, dim=1)

    def tokenize_weighted(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Prompts with A1111 weighting syntax -> (B, chunks, 77) ids and (B, 75·chunks + 2)
        weights, one per position of the encoded states (start, tokens, end/padding)."""
        from library.sd.prompt_weighting import weighted_row

        rows = [weighted_row(self.tokenizer, caption, self.sequence_length) for caption in captions]
        ids = torch.tensor([r for r, _ in rows], dtype=torch.long)
        weights = torch.tensor([w for _, w in rows], dtype=torch.float32)
        return self._chunked(ids), weights

    def encode_weighted(self, captions: list[str]) -> Tensor:
        """States with the prompts' weights applied (see the module docstring)."""
        ids, weights = self.tokenize_weighted(captions)
        return apply_token_weights(self.encode_ids(ids), weights)

    def encode(self, captions: list[str]) -> Tensor:
        if self.weighted_captions:
            return self.encode_weighted(captions)
        return self.encode_ids(self.tokenize(captions))

    @torch.no_grad()
    def encode_for_cache(self, captions: list[str]) -> list[dict[str, Tensor]]:
        states = self.encode(captions).float().cpu()
        return [{CACHE_KEY: states[i]} for i in range(len(captions))]


def apply_token_weights(states: Tensor, weights: Tensor) -> Tensor:
    """(B, L, D) states x (B, L) weights, then each row rescaled so its mean over L and D is the
    unweighted mean (computed in float32). Rows whose weights are all 1 come back unchanged."""
    weights = weights.to(states.device)
    plain = states.float()
    weighted = plain * weights[..., None]
    before = plain.mean(dim=(1, 2))
    after = weighted.mean(dim=(1, 2))
    ratio = torch.where(after != 0, before / torch.where(after != 0, after, torch.ones_like(after)),
                        torch.ones_like(after))
    out = (weighted * ratio[:, None, None]).to(states.dtype)
    unweighted = (weights == 1).all(dim=1)
    return torch.where(unweighted[:, None, None], states, out)


def build_text_encoding(text_encoder: nn.Module, v2: bool, *, tokenizer_cache_dir: str | os.PathLike | None = None,
                        tokenizer_dir: str | os.PathLike | None = None, clip_skip: int | None = None,
                        max_token_length: int | None = None, weights_identity: str = "",
                        weighted_captions: bool = False) -> SDTextEncoding:
    """The tokenizer (load_sd_tokenizer) and SDTextEncoding of a loaded model, with --clip_skip /
    --max_token_length errors as ConfigError (used by train_network.py and sd_minimal_inference.py)."""
    from library.errors import ConfigError

    tokenizer = load_sd_tokenizer(v2, cache_dir=tokenizer_cache_dir, local_path=tokenizer_dir)
    try:
        chunk_count(max_token_length)
    except ValueError as e:
        raise ConfigError(f"--max_token_length {max_token_length}: {e}") from e
    try:
        return SDTextEncoding(tokenizer, text_encoder, clip_skip=clip_skip, max_token_length=max_token_length,
                              weights_identity=weights_identity, weighted_captions=weighted_captions)
    except ValueError as e:
        raise ConfigError(f"--clip_skip {clip_skip}: {e}") from e


class SDTextCacheEncoder(TextCacheAdapter):
    """SDTextEncoding as the data pipeline's TextCacheEncoder (identity + encode -> dicts)."""


def tokenizer_folder(path: str | os.PathLike | None) -> Path | None:
    """A diffusers folder's tokenizer/, if any."""
    if path is None:
        return None
    folder = Path(path) / "tokenizer"
    return folder if folder.is_dir() else None
