"""Stable Diffusion 1.x / 2.x: loaders, the UNet as the trainer's denoiser, text encoding and
the sampler. The networks themselves are diffusers' UNet2DConditionModel and AutoencoderKL and
transformers' CLIPTextModel; what lives here is reading the files users have into them.

    loading.py   inspect_sd_checkpoint, load_sd_model (ldm single files, .ckpt, diffusers folders),
                 load_sd_vae (--vae), the ldm -> diffusers configs inferred from tensor shapes
    model.py     SDUNet (the denoiser: diffusers' UNet with checkpointing and attention choices)
    text.py      tokenizers, SDTextEncoding (--clip_skip, --max_token_length chunks), the cache adapter
    sampling.py  the sample-image samplers (diffusers schedulers) and generate_image
"""

from library.sd.loading import SDCheckpointInfo, SDComponents, inspect_sd_checkpoint, load_sd_model, load_sd_vae
from library.sd.model import SDUNet
from library.sd.sampling import SAMPLERS, generate_image, make_scheduler
from library.sd.text import SDTextCacheEncoder, SDTextEncoding, load_sd_tokenizer

__all__ = [
    "SDCheckpointInfo", "SDComponents", "inspect_sd_checkpoint", "load_sd_model", "load_sd_vae", "SDUNet",
    "SAMPLERS", "generate_image", "make_scheduler", "SDTextCacheEncoder", "SDTextEncoding", "load_sd_tokenizer",
]
