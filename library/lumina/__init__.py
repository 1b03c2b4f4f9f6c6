"""Lumina Image 2.0: the Next-DiT in Alpha-VLLM's module names, its loaders, Gemma2 text encoding
and the sampler. The autoencoder is the FLUX AE (library.autoencoders.load_flux_ae).

    model.py     NextDiT, LuminaParams, VARIANTS
    layers.py    blocks, embedders, final layer (checkpoint names)
    loading.py   inspect_lumina_checkpoint, load_lumina_dit (Alpha-VLLM and Comfy-Org files)
    gemma2.py    load_gemma2, load_gemma2_tokenizer (tokenizer embedded in the Gemma2 file)
    text.py      LuminaTextEncoding (system prompt, Gemma2 hidden_states[-2] + mask), cache adapter
    sampling.py  get_sigmas, denoise (CFG truncation + renormalisation), sample_latents, decode_to_image,
                 generate_image
"""

from library.lumina.gemma2 import load_gemma2, load_gemma2_tokenizer
from library.lumina.loading import LuminaCheckpointInfo, inspect_lumina_checkpoint, load_lumina_dit
from library.lumina.model import VARIANTS, LuminaParams, LuminaVariant, NextDiT
from library.lumina.sampling import (LuminaConditioning, decode_to_image, denoise, generate_image, get_sigmas,
                                     sample_latents)
from library.lumina.text import (LuminaTextCacheEncoder, LuminaTextEncoding, LuminaTextOutputs, add_text_arguments,
                                 with_system_prompt)

__all__ = [
    "NextDiT", "LuminaParams", "LuminaVariant", "VARIANTS", "LuminaCheckpointInfo", "inspect_lumina_checkpoint",
    "load_lumina_dit", "load_gemma2", "load_gemma2_tokenizer", "LuminaTextEncoding", "LuminaTextOutputs",
    "LuminaTextCacheEncoder", "add_text_arguments", "with_system_prompt", "LuminaConditioning", "denoise",
    "generate_image", "get_sigmas", "sample_latents", "decode_to_image",
]
