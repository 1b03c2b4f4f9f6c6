"""The Lumina text-encoding step, shared by training, caching, sampling and inference.

Each caption is joined to the system prompt as `system_prompt + " <Prompt Start> " + caption`
(unchanged when the system prompt is empty; negative prompts get none unless asked), tokenized
by Gemma's tokenizer (<bos> first, right padding to `max_length`, a multiple of 8, truncation)
and encoded by Gemma2; the DiT reads the second-to-last hidden state (2304 wide) and the
attention mask, from which it takes each caption's real length.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from library.errors import ConfigError
from library.text_cache import TextCacheAdapter, cache_entries

SYSTEM_PROMPT_SEPARATOR = " <Prompt Start> "
RECOMMENDED_SYSTEM_PROMPTS = (
    "You are an assistant designed to generate high-quality images based on user prompts.",
    "You are an assistant designed to generate high-quality images with the highest degree of image-text "
    "alignment based on textual prompts.",
)
DEFAULT_MAX_LENGTH = 256
# Caption positions index RoPE tables of 300 entries and the image sits at position len, so a
# caption may hold at most 299 tokens; the tokenizer pads to multiples of 8.
MAX_SUPPORTED_LENGTH = 296


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """--system_prompt and --gemma2_max_token_length (training and inference scripts)."""
    parser.add_argument(
        "--system_prompt", type=str, default="",
        help="system prompt joined before every caption as '<system prompt> <Prompt Start> <caption>'. Lumina 2 was "
             f"trained with one; recommended: \"{RECOMMENDED_SYSTEM_PROMPTS[0]}\" (general) or "
             f"\"{RECOMMENDED_SYSTEM_PROMPTS[1]}\" (closest text alignment). Default: none.")
    parser.add_argument(
        "--gemma2_max_token_length", type=int, default=DEFAULT_MAX_LENGTH,
        help=f"Gemma2 tokens per caption including the system prompt (multiple of 8, at most "
             f"{MAX_SUPPORTED_LENGTH}; default {DEFAULT_MAX_LENGTH})")


def with_system_prompt(caption: str, system_prompt: str) -> str:
    return system_prompt + SYSTEM_PROMPT_SEPARATOR + caption if system_prompt else caption


def check_max_length(max_length: int) -> None:
    if max_length < 8 or max_length % 8 or max_length > MAX_SUPPORTED_LENGTH:
        raise ConfigError(f"--gemma2_max_token_length {max_length}: use a multiple of 8 between 8 and "
                          f"{MAX_SUPPORTED_LENGTH} (the tokenizer pads to multiples of 8; Lumina 2's caption "
                          "positions end at 299). The default is 256.")


@dataclass
class LuminaTextOutputs:
    hidden_state: Tensor     # (B, L, 2304) Gemma2 hidden_states[-2]
    attention_mask: Tensor   # (B, L) int, 1 = real token, right-padded
    input_ids: Tensor        # (B, L)

    CACHE_KEYS = ("hidden_state", "attention_mask", "input_ids")

    @staticmethod
    def from_cache(batch: dict[str, Tensor]) -> "LuminaTextOutputs":
        """From a batch of cached entries (a dict of stacked tensors, see encode_for_cache)."""
        return LuminaTextOutputs(*(batch[k] for k in LuminaTextOutputs.CACHE_KEYS))

    def to(self, device: torch.device | str) -> "LuminaTextOutputs":
        return LuminaTextOutputs(*(getattr(self, k).to(device) for k in self.CACHE_KEYS))


class LuminaTextEncoding:
    """Tokenize + encode captions for Lumina with Gemma2.

    `weights_identity` names the encoder weights (see library.text_encoders.file_fingerprint);
    with the settings it makes up `identity`, the key that keeps a text cache valid."""

    def __init__(self, tokenizer, gemma2: nn.Module, *, max_length: int = DEFAULT_MAX_LENGTH, system_prompt: str = "",
                 weights_identity: str = ""):
        check_max_length(max_length)
        if tokenizer.padding_side != "right":
            raise ValueError("Lumina needs a right-padding tokenizer (see load_gemma2_tokenizer)")
        self.tokenizer = tokenizer
        self.gemma2 = gemma2
        self.max_length = max_length
        self.system_prompt = system_prompt or ""
        self.weights_identity = weights_identity

    @property
    def identity(self) -> str:
        prompt_hash = hashlib.sha256(self.system_prompt.encode("utf-8")).hexdigest()[:16]
        return f"lumina-text-v1|{self.weights_identity}|max_length={self.max_length}|system_prompt={prompt_hash}"

    @classmethod
    def from_files(cls, *, gemma2_path: str | os.PathLike, max_length: int = DEFAULT_MAX_LENGTH,
                   system_prompt: str = "", tokenizer_path: str | os.PathLike | None = None,
                   tokenizer_cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> "LuminaTextEncoding":
        """Load Gemma2 and its tokenizer (embedded in the file when present) and name them in `identity`."""
        from library.lumina.gemma2 import load_gemma2, load_gemma2_tokenizer
        from library.text_encoders import file_fingerprint

        check_max_length(max_length)
        # the model first: a wrong file is refused by name before any tokenizer (hub) look-up
        gemma2 = load_gemma2(gemma2_path, device=device, dtype=dtype)
        tokenizer = load_gemma2_tokenizer(gemma2_path, local_path=tokenizer_path, cache_dir=tokenizer_cache_dir)
        return cls(tokenizer, gemma2, max_length=max_length, system_prompt=system_prompt,
                   weights_identity=file_fingerprint(gemma2_path))

    def prompts(self, captions: list[str], *, add_system_prompt: bool = True) -> list[str]:
        return [with_system_prompt(c, self.system_prompt if add_system_prompt else "") for c in captions]

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                                pad_to_multiple_of=8, return_tensors="pt")
        return tokens.input_ids, tokens.attention_mask

    def encode(self, captions: list[str], *, add_system_prompt: bool = True) -> LuminaTextOutputs:
        """Captions -> Gemma2 states. Negative prompts for sampling pass add_system_prompt=False
        (unless the user asks for it). Gradients flow if the caller enables them."""
        input_ids, mask = self.tokenize(self.prompts(captions, add_system_prompt=add_system_prompt))
        device = next(self.gemma2.parameters()).device
        input_ids, mask = input_ids.to(device), mask.to(device)
        out = self.gemma2(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        return LuminaTextOutputs(hidden_state=out.hidden_states[-2], attention_mask=mask, input_ids=input_ids)

    @torch.no_grad()
    def encode_for_cache(self, captions: list[str]) -> list[dict[str, Tensor]]:
        """One dict per caption, on the CPU, with sd-scripts' _lumina_te.npz names (states in float32)."""
        return cache_entries(self.encode(captions), LuminaTextOutputs.CACHE_KEYS, float32=("hidden_state",))


class LuminaTextCacheEncoder(TextCacheAdapter):
    """A LuminaTextEncoding as the data pipeline's TextCacheEncoder (identity + encode -> dicts).
    Disk caches are named `<image stem>_lumina_te.safetensors`."""

    file_suffix = "_lumina_te"
