"""tiny SD 1.x or SD 2.x checkpoint (ldm single file, the same weights as a diffusers folder, tokenizers)

Tiny random Stable Diffusion checkpoints in the original ldm layout, as the files users
download: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and
`cond_stage_model.transformer.text_model.*` (SD 1.x, CLIP in the transformers layout) or
`cond_stage_model.model.*` (SD 2.x, OpenCLIP: token_embedding, positional_embedding,
transformer.resblocks.N.attn.in_proj_weight, ln_final, text_projection, one more layer than the
transformers tower that SD 2.x uses). The same weights are also written as a diffusers folder.

Sizes keep the real rules the loaders rely on: the SD structure (4 levels, 2 ResNets per level,
attention on the first three levels, one transformer block each), GroupNorm widths that are
multiples of 32, SD 1.x attention with 8 heads, SD 2.x attention and both text towers with
64-wide heads, SD 2.x's linear transformer projections and gelu text tower. The UNet is built
with diffusers and its keys are written in the ldm names by `unet_to_ldm` (the inverse of
diffusers' converter, checked by the loading tests).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from library.autoencoders import SD_VAE_SCALING, AutoEncoderConfig
from library.safetensors_io import save_file_atomic
from library.tiny import tokenizers as tiny_tokenizers
from library.tiny.flux import _to_file_dtype, init_random_, random_autoencoder

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
V1_TOKENIZER_ID = "openai/clip-vit-large-patch14"
V2_TOKENIZER_ID = "stabilityai/stable-diffusion-2"

TINY_TEXT_WIDTH = 128          # 2 heads of 64
TINY_V1_TEXT_LAYERS = 3
TINY_V2_TEXT_LAYERS = 3        # the transformers tower; the OpenCLIP file holds one more
TINY_VAE_CONFIG = AutoEncoderConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=4, use_quant_conv=True,
                                    scale_factor=SD_VAE_SCALING.scale_factor, shift_factor=0.0)

_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]


def unet_config(v2: bool, *, full: bool = False) -> dict:
    """diffusers UNet2DConditionModel config: SD 1.5 / SD 2.1 at full size, else tiny."""
    widths = [320, 640, 1280, 1280] if full else ([64, 64, 128, 128] if v2 else [32, 32, 64, 64])
    context = (1024 if v2 else 768) if full else TINY_TEXT_WIDTH
    return {
        "sample_size": (96 if v2 else 64) if full else 16, "in_channels": 4, "out_channels": 4,
        "down_block_types": list(_DOWN), "up_block_types": list(_UP), "block_out_channels": widths,
        "layers_per_block": 2, "cross_attention_dim": context,
        "attention_head_dim": [w // 64 for w in widths] if v2 else 8,
        "use_linear_projection": v2, "transformer_layers_per_block": 1, "norm_num_groups": 32,
    }


def build_unet(v2: bool = False, *, full: bool = False, seed: int = 0, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """A diffusers UNet2DConditionModel with random weights made directly on `device` (the
    full-size GPU benchmark uses this without writing a 3.4 GB file)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel(**unet_config(v2, full=full))
    model = model.to(dtype=dtype).to_empty(device=device)
    return init_random_(model, seed).eval()


# ---------------------------------------------------------------------------------------------
# diffusers -> ldm key names (the inverse of diffusers.loaders.single_file_utils' converter).

_RESNET_NAMES = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                 ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
          "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet_key(rest: str) -> str:
    for new, old in _RESNET_NAMES:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(rest)


def unet_key_to_ldm(key: str, config: dict) -> str:
    """One diffusers UNet key -> its ldm name (without `model.diffusion_model.`)."""
    per_level = config["layers_per_block"] + 1
    module, _, leaf = key.rpartition(".")
    if module in _FIXED:
        return f"{_FIXED[module]}.{leaf}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{1 + i * per_level + j}.0.{_resnet_key(rest)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{0 if m[1] == '0' else 2}.{_resnet_key(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * per_level + int(m[2])}.0.{_resnet_key(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        slot = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1
        return f"output_blocks.{i * per_level + per_level - 1}.{slot}.conv.{m[2]}"
    raise KeyError(f"no ldm name for UNet key {key}")


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    return {unet_key_to_ldm(k, config): v for k, v in state.items()}


def hf_clip_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP text keys (`text_model.*`) -> OpenCLIP's (without the model prefix)."""
    t = "text_model."
    out = {"token_embedding.weight": state[t + "embeddings.token_embedding.weight"],
           "positional_embedding": state[t + "embeddings.position_embedding.weight"],
           "ln_final.weight": state[t + "final_layer_norm.weight"], "ln_final.bias": state[t + "final_layer_norm.bias"]}
    layers = sorted({int(m[1]) for k in state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))})
    names = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in layers:
        src, dst = f"{t}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            for hf, oc in names.items():
                out[f"{dst}{oc}.{leaf}"] = state[f"{src}{hf}.{leaf}"]
    return out


# ---------------------------------------------------------------------------------------------
# Text encoders.

def _clip_config(v2: bool, layers: int):
    from library.text_encoders import clip_g_config, clip_l_config

    make = clip_g_config if v2 else clip_l_config
    return make(hidden_size=TINY_TEXT_WIDTH, num_attention_heads=TINY_TEXT_WIDTH // 64,
                intermediate_size=4 * TINY_TEXT_WIDTH, num_hidden_layers=layers,
                vocab_size=tiny_tokenizers.clip_vocab_size(), projection_dim=TINY_TEXT_WIDTH)


def random_text_encoder(v2: bool, seed: int = 0, layers: int | None = None) -> nn.Module:
    """transformers CLIPTextModel (wrapped so keys are `text_model.*`): quick_gelu CLIP-L rules
    for SD 1.x, gelu OpenCLIP rules for SD 2.x."""
    from transformers import CLIPTextModel

    from library.text_encoders import wrap_clip_text_model

    layers = layers or (TINY_V2_TEXT_LAYERS + 1 if v2 else TINY_V1_TEXT_LAYERS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = wrap_clip_text_model(CLIPTextModel(_clip_config(v2, layers))).eval()
    return init_random_(model, seed)


def _file_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}


# ---------------------------------------------------------------------------------------------
# The checkpoint.

@dataclass
class TinySDParts:
    """The random networks a tiny checkpoint is made of (diffusers / transformers modules)."""

    unet: nn.Module
    unet_config: dict
    vae_ldm_state: dict[str, torch.Tensor]
    text_state: dict[str, torch.Tensor]     # transformers layout; for SD 2.x one layer more than used
    v2: bool


def make_parts(v2: bool, seed: int = 0) -> TinySDParts:
    unet = build_unet(v2, seed=seed)
    vae = random_autoencoder(TINY_VAE_CONFIG, seed + 1)
    text = random_text_encoder(v2, seed + 2)
    return TinySDParts(unet=unet, unet_config=unet_config(v2), vae_ldm_state=vae.state_dict(),
                       text_state=_file_state(text), v2=v2)


def ldm_state_dict(parts: TinySDParts, seed: int = 0) -> dict[str, torch.Tensor]:
    state = {UNET_PREFIX + k: v for k, v in unet_to_ldm(parts.unet.state_dict(), parts.unet_config).items()}
    state |= {VAE_PREFIX + k: v for k, v in parts.vae_ldm_state.items()}
    if parts.v2:
        gen = torch.Generator().manual_seed(seed + 3)
        open_clip = hf_clip_to_open_clip(parts.text_state)
        open_clip["text_projection"] = torch.randn(TINY_TEXT_WIDTH, TINY_TEXT_WIDTH, generator=gen) / TINY_TEXT_WIDTH**0.5
        open_clip["logit_scale"] = torch.tensor(4.6052)
        state |= {OPEN_CLIP_PREFIX + k: v for k, v in open_clip.items()}
    else:
        state |= {CLIP_PREFIX + k: v for k, v in parts.text_state.items()}
    return state


def write_sd_checkpoint(path: str | os.PathLike, parts: TinySDParts, *, seed: int = 0,
                        dtype: torch.dtype = torch.float32) -> Path:
    save_file_atomic(_to_file_dtype(ldm_state_dict(parts, seed), dtype), path)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Tokenizers and the diffusers folder.

def write_tokenizer(folder: str | os.PathLike, v2: bool) -> Path:
    """The tiny CLIP tokenizer; SD 2.x's pads with "!" (id 0) like stabilityai/stable-diffusion-2."""
    folder = tiny_tokenizers.write_clip_tokenizer(folder)
    if v2:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            data = json.loads((folder / name).read_text(encoding="utf-8"))
            data["pad_token"] = "!"
            (folder / name).write_text(json.dumps(data, indent=2), encoding="utf-8")
    return folder


def write_tokenizer_cache(cache_dir: str | os.PathLike, v2: bool) -> Path:
    cache_dir = Path(cache_dir)
    hub_id = V2_TOKENIZER_ID if v2 else V1_TOKENIZER_ID
    write_tokenizer(cache_dir / tiny_tokenizers.cache_folder_name(hub_id), v2)
    return cache_dir


def write_diffusers_folder(folder: str | os.PathLike, parts: TinySDParts) -> Path:
    """The same weights as a diffusers StableDiffusionPipeline folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from transformers import CLIPTextModel, CLIPTokenizer

    from library.sd.loading import vae_config_from_ldm

    folder = Path(folder)
    vae_config = vae_config_from_ldm({k: tuple(v.shape) for k, v in parts.vae_ldm_state.items()})
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(dict(parts.vae_ldm_state), vae_config), strict=True)
    layers = TINY_V2_TEXT_LAYERS if parts.v2 else TINY_V1_TEXT_LAYERS
    text = CLIPTextModel(_clip_config(parts.v2, layers))
    state = {k: v for k, v in parts.text_state.items()
             if not (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k)) or int(m[1]) < layers}
    own = set(text.state_dict())
    if not any(k.startswith("text_model.") for k in own):   # transformers >= 5.6 dropped the level
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    text.load_state_dict(state, strict=False)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer(folder / "_tokenizer_src", parts.v2)))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction" if parts.v2 else "epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=parts.unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for f in (folder / "_tokenizer_src").iterdir():
        f.unlink()
    (folder / "_tokenizer_src").rmdir()
    return folder


@dataclass
class TinySDPaths:
    checkpoint: Path               # ldm single file
    diffusers_dir: Path | None     # the same weights as a diffusers folder
    tokenizer_cache_dir: Path
    v2: bool


def write_tiny_sd_set(out_dir: str | os.PathLike, *, v2: bool = False, seed: int = 0,
                      dtype: torch.dtype = torch.float32, diffusers_folder: bool = True) -> TinySDPaths:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = make_parts(v2, seed)
    name = "tiny_sd_v2" if v2 else "tiny_sd_v1"
    return TinySDPaths(
        checkpoint=write_sd_checkpoint(out / f"{name}.safetensors", parts, seed=seed, dtype=dtype),
        diffusers_dir=write_diffusers_folder(out / f"{name}_diffusers", parts) if diffusers_folder else None,
        tokenizer_cache_dir=write_tokenizer_cache(out / "tokenizers", v2),
        v2=v2,
    )


# ---------------------------------------------------------------- `python -m library.tiny sd`

def add_cli_arguments(parser) -> None:
    parser.add_argument("--v2", action="store_true", help="SD 2.x (OpenCLIP text encoder, 64-wide heads)")
    parser.add_argument("--no_diffusers_folder", action="store_true", help="write only the single file")


def write_cli(args) -> dict[str, Path | bool | None]:
    return vars(write_tiny_sd_set(args.out, v2=args.v2, seed=args.seed, dtype=args.torch_dtype,
                                  diffusers_folder=not args.no_diffusers_folder))
