"""The SD UNet as the trainer's denoiser.

`SDUNet` holds diffusers' UNet2DConditionModel under `.unet` (so module paths below it, and the
LoRA names built from them, are diffusers' paths, as sd-scripts names SD LoRA modules) and
gives the loop what it expects of a denoiser: a plain forward, gradient checkpointing (on the
GPU, or with the checkpoints in CPU memory via library.offload_checkpointing), and the
attention choice (PyTorch SDPA, or xformers when installed).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor, nn

from library.errors import ConfigError

ATTENTION_MODES = ("sdpa", "xformers")


class SDUNet(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def forward(self, sample: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        """sample (B, 4, h, w), timesteps (B,) DDPM steps, context (B, L, text width) -> prediction."""
        return self.unet(sample, timesteps, encoder_hidden_states=context, return_dict=False)[0]

    def enable_gradient_checkpointing(self, cpu_offload: bool = False) -> None:
        """Checkpoint every ResNet and transformer block (diffusers' granularity); with
        `cpu_offload` the saved block inputs wait in pinned CPU memory."""
        func = None
        if cpu_offload:
            from library.offload_checkpointing import OffloadedCheckpoint

            func = OffloadedCheckpoint()   # called as func(block, *args), as diffusers calls it
        self.unet.enable_gradient_checkpointing(func)

    def disable_gradient_checkpointing(self) -> None:
        self.unet.disable_gradient_checkpointing()

    def set_attention(self, mode: str) -> None:
        """"sdpa": PyTorch scaled_dot_product_attention (diffusers' default; flash / memory-efficient
        kernels on CUDA). "xformers": xformers' memory-efficient attention (must be installed)."""
        if mode == "sdpa":
            from diffusers.models.attention_processor import AttnProcessor2_0

            self.unet.set_attn_processor(AttnProcessor2_0())
        elif mode == "xformers":
            require_xformers()
            self.unet.enable_xformers_memory_efficient_attention()
        else:
            raise ValueError(f"unknown attention mode {mode!r}; choose one of {ATTENTION_MODES}")


def require_xformers() -> None:
    if importlib.util.find_spec("xformers") is None:
        raise ConfigError("--xformers needs the xformers package, which is not installed. Install it (pip install "
                          "xformers, matching your torch build), or remove --xformers: PyTorch SDPA attention is used "
                          "by default and is as memory-efficient.")
