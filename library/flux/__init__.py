"""FLUX.1 (dev, schnell) and Chroma: the DiT in Black Forest Labs' module names, its loaders,
the text-encoding step and the sampler.

    model.py     Flux, FluxParams, VARIANTS (dev / schnell / chroma as data)
    chroma.py    Chroma (approximator-modulated FLUX)
    layers.py    blocks, RoPE, embeddings (checkpoint names)
    loading.py   inspect_flux_checkpoint, load_flux_dit (BFL and diffusers files)
    text.py      FluxTextEncoding, FluxTextOutputs, FluxTextCacheEncoder
    sampling.py  pack/unpack, ids, get_schedule, denoise, generate_image
"""

from library.flux.chroma import Chroma
from library.flux.loading import FluxCheckpointInfo, inspect_flux_checkpoint, load_flux_dit
from library.flux.model import VARIANTS, Flux, FluxParams, FluxVariant
from library.flux.sampling import (
    FluxConditioning,
    denoise,
    generate_image,
    get_schedule,
    pack_latents,
    prepare_img_ids,
    prepare_txt_ids,
    unpack_latents,
)
from library.flux.text import FluxTextCacheEncoder, FluxTextEncoding, FluxTextOutputs

__all__ = [
    "Chroma", "Flux", "FluxParams", "FluxVariant", "VARIANTS", "FluxCheckpointInfo", "inspect_flux_checkpoint",
    "load_flux_dit", "FluxConditioning", "denoise", "generate_image", "get_schedule", "pack_latents",
    "unpack_latents", "prepare_img_ids", "prepare_txt_ids", "FluxTextEncoding", "FluxTextOutputs",
    "FluxTextCacheEncoder",
]
