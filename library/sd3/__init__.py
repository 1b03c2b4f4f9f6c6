"""SD3 / SD3.5 (Medium, 3.5 Medium, 3.5 Large): the MMDiT in Stability AI's module names, its
loaders, the text-encoding step and the sampler.

    model.py      MMDiT, SD3Params, VARIANTS (medium / 5-medium / 5-large as data)
    pos_embed.py  the sin-cos table, crops, random crops, scaled tables (--enable_scaled_pos_embed)
    loading.py    inspect_sd3_checkpoint, load_sd3_mmdit, load_sd3_vae, load_sd3_clip_l/clip_g/t5xxl
    text.py       SD3TextEncoding, SD3TextOutputs, TextDropout, SD3TextCacheEncoder
    sampling.py   get_sigmas, denoise (Euler + CFG), generate_image
"""

from library.sd3.loading import (SD3CheckpointInfo, inspect_sd3_checkpoint, load_sd3_clip_g, load_sd3_clip_l,
                                  load_sd3_mmdit, load_sd3_t5xxl, load_sd3_vae)
from library.sd3.model import VARIANTS, MMDiT, SD3Params, SD3Variant
from library.sd3.pos_embed import latent_sizes_for_resolutions
from library.sd3.sampling import denoise, generate_image, get_sigmas, initial_noise, round_image_size
from library.sd3.text import SD3Conditioning, SD3TextCacheEncoder, SD3TextEncoding, SD3TextOutputs, TextDropout

__all__ = [
    "MMDiT", "SD3Params", "SD3Variant", "VARIANTS", "SD3CheckpointInfo", "inspect_sd3_checkpoint", "load_sd3_mmdit",
    "load_sd3_vae", "load_sd3_clip_l", "load_sd3_clip_g", "load_sd3_t5xxl", "latent_sizes_for_resolutions",
    "denoise", "generate_image", "get_sigmas", "initial_noise", "round_image_size", "SD3Conditioning",
    "SD3TextCacheEncoder", "SD3TextEncoding", "SD3TextOutputs", "TextDropout",
]
