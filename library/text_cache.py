"""The families' side of the data pipeline's TextCacheEncoder protocol (library/data/caching.py):
a batch of text-encoder outputs split into one CPU dict per caption, and the adapter that shows a
family's text encoding to the cache.

A family keeps what is its own: which outputs are cached (its CACHE_KEYS, sd-scripts' names),
which of them are stored in float32, the flags it records beside them, and its file suffix.
"""

from __future__ import annotations

from typing import Any, Collection, Sequence

from torch import Tensor


def cache_entries(outputs: Any, keys: Sequence[str], *, float32: Collection[str] = ()) -> list[dict[str, Tensor]]:
    """One dict per caption from the batch-first tensors `outputs.<key>`, detached and on the CPU;
    the `float32` keys are converted (cached states stay float32 whatever dtype the encoder ran in)."""
    entries = []
    for i in range(len(getattr(outputs, keys[0]))):
        entry = {k: getattr(outputs, k)[i].detach().cpu() for k in keys}
        for k in float32:
            entry[k] = entry[k].float()
        entries.append(entry)
    return entries


class TextCacheAdapter:
    """A family's text encoding as a TextCacheEncoder: its `identity`, and `encode` giving its
    `encode_for_cache(captions)`. A subclass may set `file_suffix` to name the disk cache files."""

    def __init__(self, encoding: Any):
        self.encoding = encoding

    @property
    def identity(self) -> str:
        return self.encoding.identity

    def encode(self, captions: list[str]) -> list[dict[str, Tensor]]:
        return self.encoding.encode_for_cache(captions)
