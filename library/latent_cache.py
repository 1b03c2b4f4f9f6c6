"""The families' side of the data pipeline's LatentCacheEncoder protocol (library/data/caching.py):
an autoencoder shown to the latent cache. A family supplies only what is its own: the identity
string (everything that changes the latents: file fingerprint, scaling, sampling, dtype), how its
autoencoder turns images into latents, and optionally the cache files' suffix."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


def _posterior_sample(autoencoder: nn.Module, images: Tensor) -> Tensor:
    return autoencoder.encode(images, sample=True)   # library.autoencoders' KL autoencoders


class LatentCacheAdapter:
    """Images (B, 3, H, W) in [-1, 1] -> latents as float32 on the CPU, encoded on `device`."""

    def __init__(self, autoencoder: nn.Module, identity: str, device: torch.device, dtype: torch.dtype, *,
                 encode: Callable[[nn.Module, Tensor], Tensor] = _posterior_sample, file_suffix: str | None = None):
        self.autoencoder, self.identity, self.device, self.dtype = autoencoder, identity, device, dtype
        self._encode = encode
        if file_suffix is not None:
            self.file_suffix = file_suffix

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        self.autoencoder.to(self.device)
        return self._encode(self.autoencoder, images.to(self.device, self.dtype)).float().cpu()
