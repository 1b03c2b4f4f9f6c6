"""The LoRA file's header metadata: sd-scripts' ss_* keys and the SAI modelspec keys.

Every value is a string (`str(v)`: True -> "True", None -> "None"), as sd-scripts writes them,
so metadata readers (A1111/Forge/ComfyUI extensions, civitai) see the same thing. Paths are
reduced to basenames: no absolute path goes into a shared file.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import mimetypes
import os
import time
from typing import Any

from library.errors import ConfigError

SAI_MODEL_SPEC_VERSION = "1.0.1"

# What --no_metadata keeps (sd-scripts' SS_METADATA_MINIMUM_KEYS); the saver adds the modelspec
# and the sshs_* hashes on top.
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")

# Optional modelspec fields taken from --metadata_<name>, in the order they are written.
_MODELSPEC_OPTIONAL = (
    "description", "author", "license", "usage_hint", "thumbnail", "tags", "merged_from", "trigger_phrase",
    "preprocessor", "is_negative_embedding",
)  # fmt: skip


def add_metadata_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare --no_metadata, --training_comment and the --metadata_* (modelspec) options."""
    group = parser.add_argument_group("metadata written into the LoRA file")
    group.add_argument(
        "--no_metadata",
        action="store_true",
        help="Write only the keys needed to load the file (network module, dim, alpha, args, base model) "
        "plus the modelspec and hashes: no training settings, dataset or tag statistics.",
    )
    group.add_argument("--training_comment", type=str, default=None, help="Free text stored as ss_training_comment.")
    group.add_argument(
        "--metadata_title", type=str, default=None, help="modelspec.title (default: --output_name, else LoRA@<time>)."
    )
    group.add_argument("--metadata_author", type=str, default=None, help="modelspec.author.")
    group.add_argument("--metadata_description", type=str, default=None, help="modelspec.description.")
    group.add_argument("--metadata_license", type=str, default=None, help="modelspec.license.")
    group.add_argument("--metadata_tags", type=str, default=None, help="modelspec.tags, comma separated.")
    group.add_argument("--metadata_usage_hint", type=str, default=None, help="modelspec.usage_hint: a short how-to-use hint.")
    group.add_argument(
        "--metadata_thumbnail",
        type=str,
        default=None,
        help="modelspec.thumbnail: an image file (stored as a data: URL) or a data: URL.",
    )
    group.add_argument("--metadata_merged_from", type=str, default=None, help="modelspec.merged_from: source model names.")
    group.add_argument("--metadata_trigger_phrase", type=str, default=None, help="modelspec.trigger_phrase.")
    group.add_argument("--metadata_preprocessor", type=str, default=None, help="modelspec.preprocessor.")
    group.add_argument(
        "--metadata_is_negative_embedding", type=str, default=None, help="modelspec.is_negative_embedding."
    )


def check_metadata_args(args: Any) -> None:
    """Validate metadata options at launch (a missing thumbnail file), not at the first save."""
    thumbnail = getattr(args, "metadata_thumbnail", None)
    if thumbnail and not thumbnail.startswith("data:") and not os.path.isfile(thumbnail):
        raise ConfigError(f"--metadata_thumbnail {thumbnail!r} is not a file; give an image file or a data: URL.")


def _json_or_str(value: Any) -> str:
    """Dataset material: containers as JSON (as sd-scripts json.dumps them), the rest as str."""
    return json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)


def _safe_name(value: Any) -> Any:
    """A path-like value reduced to its basename; other values unchanged."""
    if isinstance(value, (str, os.PathLike)):
        return os.path.basename(os.fspath(value).rstrip("/\\")) or os.fspath(value)
    return value


def _single(value: Any) -> Any:
    """A one-element list (nargs options such as --text_encoder_lr) written as its element."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return value[0]
    return value


def training_metadata(
    args: Any,
    *,
    session_id: int | str,
    training_started_at: float,
    num_train_images: int,
    num_reg_images: int,
    num_validation_images: int,
    num_batches_per_epoch: int,
    num_epochs: int,
    optimizer_description: str,
    base_model_version: str,
    dataset_metadata: dict[str, Any],
    network_module: str,
    network_dim: int | None,
    network_alpha: float | None,
    network_args: dict[str, Any] | None,
    model_file_hashes: dict[str, str],
    family_metadata: dict[str, Any] | None = None,
    commit_hash: str | None = None,
) -> dict[str, str]:
    """The ss_* metadata of a training run (FORMATS 4.7), every value a string.

    `args` supplies the option values (missing options count as their sd-scripts default);
    `dataset_metadata` comes from the data pipeline (ss_datasets/ss_tag_frequency/... or the
    no-dataset-config keys), `family_metadata` from the family (e.g. ss_guidance_scale),
    `model_file_hashes` from BackgroundFileHash.result().
    """

    def arg(name: str, default: Any = None) -> Any:
        return getattr(args, name, default)

    output_name = arg("output_name")
    if output_name is not None and os.path.isabs(os.fspath(output_name)):
        output_name = _safe_name(output_name)

    metadata: dict[str, Any] = {
        "ss_session_id": session_id,
        "ss_training_started_at": training_started_at,
        "ss_output_name": output_name,
        "ss_learning_rate": arg("learning_rate"),
        "ss_text_encoder_lr": _single(arg("text_encoder_lr")),
        "ss_unet_lr": arg("unet_lr"),
        "ss_num_train_images": num_train_images,
        "ss_num_validation_images": num_validation_images,
        "ss_num_reg_images": num_reg_images,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": bool(arg("gradient_checkpointing", False)),
        "ss_gradient_accumulation_steps": arg("gradient_accumulation_steps", 1),
        "ss_max_train_steps": arg("max_train_steps"),
        "ss_lr_warmup_steps": arg("lr_warmup_steps", 0),
        "ss_lr_scheduler": arg("lr_scheduler", "constant"),
        "ss_network_module": network_module,
        "ss_network_dim": network_dim,
        "ss_network_alpha": network_alpha,
        "ss_network_dropout": arg("network_dropout"),
        "ss_mixed_precision": arg("mixed_precision", "no"),
        "ss_full_fp16": bool(arg("full_fp16", False)),
        "ss_v2": bool(arg("v2", False)),
        "ss_base_model_version": base_model_version,
        "ss_clip_skip": arg("clip_skip"),
        "ss_max_token_length": arg("max_token_length"),
        "ss_cache_latents": bool(arg("cache_latents", False)),
        "ss_seed": arg("seed"),
        "ss_lowram": bool(arg("lowram", False)),
        "ss_noise_offset": arg("noise_offset"),
        "ss_multires_noise_iterations": arg("multires_noise_iterations"),
        "ss_multires_noise_discount": arg("multires_noise_discount", 0.3),
        "ss_adaptive_noise_scale": arg("adaptive_noise_scale"),
        "ss_zero_terminal_snr": bool(arg("zero_terminal_snr", False)),
        "ss_training_comment": arg("training_comment"),
        "ss_sd_scripts_commit_hash": commit_hash,
        "ss_optimizer": optimizer_description,
        "ss_max_grad_norm": arg("max_grad_norm", 1.0),
        "ss_caption_dropout_rate": arg("caption_dropout_rate", 0.0),
        "ss_caption_dropout_every_n_epochs": arg("caption_dropout_every_n_epochs", 0),
        "ss_caption_tag_dropout_rate": arg("caption_tag_dropout_rate", 0.0),
        "ss_face_crop_aug_range": arg("face_crop_aug_range"),
        "ss_prior_loss_weight": arg("prior_loss_weight", 1.0),
        "ss_min_snr_gamma": arg("min_snr_gamma"),
        "ss_scale_weight_norms": arg("scale_weight_norms"),
        "ss_ip_noise_gamma": arg("ip_noise_gamma"),
        "ss_debiased_estimation": bool(arg("debiased_estimation_loss", False)),
        "ss_noise_offset_random_strength": bool(arg("noise_offset_random_strength", False)),
        "ss_ip_noise_gamma_random_strength": bool(arg("ip_noise_gamma_random_strength", False)),
        "ss_loss_type": arg("loss_type", "l2"),
        "ss_huber_schedule": arg("huber_schedule", "snr"),
        "ss_huber_scale": arg("huber_scale", 1.0),
        "ss_huber_c": arg("huber_c", 0.1),
        "ss_fp8_base": bool(arg("fp8_base", False)),
        "ss_fp8_base_unet": bool(arg("fp8_base_unet", False)),
        "ss_validation_seed": arg("validation_seed"),
        "ss_validation_split": arg("validation_split", 0.0),
        "ss_max_validation_steps": arg("max_validation_steps"),
        "ss_validate_every_n_epochs": arg("validate_every_n_epochs"),
        "ss_validate_every_n_steps": arg("validate_every_n_steps"),
        "ss_resize_interpolation": arg("resize_interpolation"),
    }
    result = {key: str(value) for key, value in metadata.items()}
    result.update({key: str(value) for key, value in (family_metadata or {}).items()})
    result.update({key: _json_or_str(value) for key, value in dataset_metadata.items()})
    # the loop's own count: per process with several GPUs (as sd-scripts' len(train_dataloader))
    result["ss_num_batches_per_epoch"] = str(num_batches_per_epoch)
    if network_args:
        result["ss_network_args"] = json.dumps(network_args)

    model = arg("pretrained_model_name_or_path")
    if model is not None:
        result["ss_sd_model_name"] = _safe_name(model)
    vae = arg("vae")
    if vae is not None:
        result["ss_vae_name"] = _safe_name(vae)
    result.update({key: str(value) for key, value in model_file_hashes.items()})
    return result


def with_save_time(
    metadata: dict[str, str], *, steps: int, epoch: int, finished_at: float | None = None
) -> dict[str, str]:
    """A copy with the keys written at each save: ss_training_finished_at (default: now), ss_steps, ss_epoch."""
    finished = time.time() if finished_at is None else finished_at
    return {**metadata, "ss_training_finished_at": str(finished), "ss_steps": str(steps), "ss_epoch": str(epoch)}


def minimal_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """What --no_metadata keeps of the training metadata."""
    return {key: metadata[key] for key in MINIMUM_KEYS if key in metadata}


# ----------------------------------------------------------------------------------------------
# modelspec


def resolution_string(resolution: Any, default: int | tuple[int, int]) -> str:
    """"WxH" from --resolution ("1024", "1024,768", 1024, (W, H)); from `default` when None."""
    value = default if resolution is None else resolution
    if isinstance(value, str):
        parts = [int(p) for p in value.replace("x", ",").split(",") if p.strip()]
    elif isinstance(value, int):
        parts = [value]
    else:
        parts = [int(p) for p in value]
    if len(parts) not in (1, 2):
        raise ConfigError(f"--resolution {value!r}: give SIZE or WIDTH,HEIGHT.")
    return f"{parts[0]}x{parts[-1]}"


def thumbnail_data_url(value: str) -> str:
    """A data: URL kept as is; an image file converted to one."""
    if value.startswith("data:"):
        return value
    if not os.path.isfile(value):
        raise ConfigError(f"--metadata_thumbnail {value!r} is not a file; give an image file or a data: URL.")
    mime = mimetypes.guess_type(value)[0] or "application/octet-stream"
    with open(value, "rb") as f:
        encoded = base64.b64encode(f.read()).decode("ascii")
    return f"data:{mime};base64,{encoded}"


def modelspec(
    architecture: str,
    implementation: str,
    *,
    title: str,
    timestamp: float,
    resolution: str,
    prediction_type: str | None = None,
    implementation_version: str | None = None,
    encoder_layer: int | None = None,
    timestep_range: tuple[int, int] | None = None,
    description: str | None = None,
    author: str | None = None,
    license: str | None = None,
    usage_hint: str | None = None,
    thumbnail: str | None = None,
    tags: str | None = None,
    merged_from: str | None = None,
    trigger_phrase: str | None = None,
    preprocessor: str | None = None,
    is_negative_embedding: str | None = None,
) -> dict[str, str]:
    """The modelspec.* keys (SAI model spec 1.0.1); None values are left out.

    architecture: e.g. "flux-1-dev/lora". prediction_type: "epsilon"/"v", or None to omit it
    (as FLUX/Chroma files do). date is the local ISO time of the whole-second timestamp.
    """
    spec: dict[str, Any] = {
        "sai_model_spec": SAI_MODEL_SPEC_VERSION,
        "architecture": architecture,
        "implementation": implementation,
        "title": title,
        "resolution": resolution,
        "description": description,
        "author": author,
        "date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "implementation_version": implementation_version,
        "license": license,
        "usage_hint": usage_hint,
        "thumbnail": thumbnail_data_url(thumbnail) if thumbnail else None,
        "tags": tags,
        "merged_from": merged_from,
        "trigger_phrase": trigger_phrase,
        "prediction_type": prediction_type,
        "timestep_range": f"{timestep_range[0]},{timestep_range[1]}" if timestep_range is not None else None,
        "encoder_layer": str(encoder_layer) if encoder_layer is not None else None,
        "preprocessor": preprocessor,
        "is_negative_embedding": is_negative_embedding,
    }
    return {f"modelspec.{key}": str(value) for key, value in spec.items() if value is not None}


def modelspec_from_args(
    args: Any,
    *,
    architecture: str,
    implementation: str,
    timestamp: float,
    default_resolution: int | tuple[int, int],
    prediction_type: str | None = None,
    implementation_version: str | None = None,
) -> dict[str, str]:
    """modelspec() with title, resolution, clip skip, timestep range and --metadata_* from args."""
    title = getattr(args, "metadata_title", None) or getattr(args, "output_name", None) or f"LoRA@{timestamp}"
    min_t, max_t = getattr(args, "min_timestep", None), getattr(args, "max_timestep", None)
    timestep_range = None
    if min_t is not None or max_t is not None:
        timestep_range = (min_t if min_t is not None else 0, max_t if max_t is not None else 1000)
    optional = {name: getattr(args, f"metadata_{name}", None) for name in _MODELSPEC_OPTIONAL}
    return modelspec(
        architecture,
        implementation,
        title=title,
        timestamp=timestamp,
        resolution=resolution_string(getattr(args, "resolution", None), default_resolution),
        prediction_type=prediction_type,
        implementation_version=implementation_version,
        encoder_layer=getattr(args, "clip_skip", None),
        timestep_range=timestep_range,
        **optional,
    )
