"""The common command-line options of every `*_train_network.py` script.

Each concern declares its own options where it lives (dataset options in library/data, loss
options in library/training/losses.py, ...); this module gathers them into one parser and holds
the options of the loop itself: paths, saving, precision, network, sampling, logging, resuming.
Options that exist in sd-scripts but are not built yet are declared, so a user's command line
parses, and refused with a message by `refuse_unsupported` instead of being silently ignored.
"""

from __future__ import annotations

import argparse

from library.errors import ConfigError


def add_model_io_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model files and output")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="base model file (.safetensors) or diffusers folder")
    g.add_argument("--tokenizer_cache_dir", type=str, default=None,
                   help="folder with one sub-folder per tokenizer, named after its hub id with '/' "
                        "replaced by '_'; used offline, and filled after a hub download")
    g.add_argument("--output_dir", type=str, default=None, help="where LoRA files, samples and logs go")
    g.add_argument("--output_name", type=str, default=None, help="base name of the saved LoRA files")
    g.add_argument("--save_model_as", type=str, default="safetensors", choices=["safetensors", "ckpt", "pt"],
                   help="file format of the saved LoRA (safetensors recommended)")
    g.add_argument("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"],
                   help="dtype of the saved LoRA weights (default: as trained, float)")
    g.add_argument("--save_every_n_epochs", type=int, default=None, help="save a LoRA every N epochs")
    g.add_argument("--save_every_n_steps", type=int, default=None, help="save a LoRA every N steps")
    g.add_argument("--save_last_n_epochs", type=int, default=None,
                   help="keep only the last N epoch-wise LoRA files")
    g.add_argument("--save_last_n_steps", type=int, default=None,
                   help="keep only the step-wise LoRA files of the last N steps")
    g.add_argument("--save_last_n_epochs_state", type=int, default=None,
                   help="keep only the last N epoch-wise state folders")
    g.add_argument("--save_last_n_steps_state", type=int, default=None,
                   help="keep only the step-wise state folders of the last N steps")
    g.add_argument("--save_state", action="store_true",
                   help="with each LoRA save, also save the full training state (optimizer, RNG, position) "
                        "for --resume")
    g.add_argument("--save_state_on_train_end", action="store_true", help="save the training state at the end")
    g.add_argument("--resume", type=str, default=None, help="state folder to resume from")
    g.add_argument("--initial_epoch", type=int, default=None, help="start counting epochs from here (1-based)")
    g.add_argument("--initial_step", type=int, default=None, help="start counting steps from here")
    g.add_argument("--skip_until_initial_step", action="store_true",
                   help="with --initial_step, skip the batches before it (without decoding them)")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--max_train_steps", type=int, default=1600, help="number of optimizer steps")
    g.add_argument("--max_train_epochs", type=int, default=None, help="number of epochs (overrides max_train_steps)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--seed", type=int, default=None, help="random seed (data order, noise, init)")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--unet_lr", type=float, default=None, help="learning rate of the diffusion-model LoRA")
    g.add_argument("--text_encoder_lr", type=float, nargs="*", default=None,
                   help="learning rate(s) of the text-encoder LoRA (one value, or one per text encoder)")
    g.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    g.add_argument("--full_bf16", action="store_true", help="keep the LoRA weights and gradients in bf16")
    g.add_argument("--full_fp16", action="store_true", help="keep the LoRA weights and gradients in fp16")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--sdpa", action="store_true", help="use PyTorch scaled-dot-product attention (the default)")
    g.add_argument("--xformers", action="store_true", help="use xformers attention")
    g.add_argument("--mem_eff_attn", action="store_true", help="(SD only) memory-efficient attention")
    g.add_argument("--vae_batch_size", type=int, default=1, help="batch size when caching latents")
    g.add_argument("--text_encoder_batch_size", type=int, default=None,
                   help="batch size when caching text-encoder outputs (default: the training batch size)")
    g.add_argument("--torch_compile", action="store_true",
                   help="torch.compile each transformer block (first steps are slower while compiling)")
    g.add_argument("--dynamo_backend", type=str, default="inductor", help="torch.compile backend")
    g.add_argument("--cuda_graph", action="store_true",
                   help="record the whole training step as a CUDA graph per input shape and replay it (not in "
                        "sd-scripts): removes the per-kernel Python overhead that leaves the GPU idle at small "
                        "batches (FLUX.1-dev on an H200: 0.76 -> 0.59 s/step). Needs cached latents and text "
                        "outputs, bf16 or fp32, AdamW/Adam, no block swap; the first two steps of each image "
                        "size run without it")
    g.add_argument("--ddp_timeout", type=int, default=None, help="minutes before a stuck multi-GPU collective fails")
    g.add_argument("--ddp_gradient_as_bucket_view", action="store_true",
                   help="accepted for sd-scripts command lines; no effect here (LoRA gradients are averaged "
                        "directly, without a DDP wrapper)")
    g.add_argument("--ddp_static_graph", action="store_true",
                   help="accepted for sd-scripts command lines; no effect here (no DDP wrapper)")
    g.add_argument("--masked_loss", action="store_true",
                   help="weight the loss per pixel by the images' masks (alpha channel with alpha_mask)")


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("network (LoRA)")
    g.add_argument("--network_module", type=str, default=None, help="e.g. networks.lora_flux")
    g.add_argument("--network_dim", type=int, default=None, help="LoRA rank (default 4)")
    g.add_argument("--network_alpha", type=float, default=1.0,
                   help="LoRA alpha; the update is scaled by alpha/rank")
    g.add_argument("--network_dropout", type=float, default=None, help="dropout on the LoRA down output")
    g.add_argument("--network_args", type=str, nargs="*", default=None, help="key=value options of the network module")
    g.add_argument("--network_weights", type=str, default=None, help="start from these LoRA weights")
    g.add_argument("--dim_from_weights", action="store_true", help="take the rank from --network_weights")
    g.add_argument("--network_train_unet_only", action="store_true", help="train only the diffusion-model LoRA")
    g.add_argument("--network_train_text_encoder_only", action="store_true", help="train only the text-encoder LoRA")
    g.add_argument("--scale_weight_norms", type=float, default=None,
                   help="after each step, scale each module down so its update's norm is at most this")
    g.add_argument("--base_weights", type=str, nargs="*", default=None, help="LoRA files merged into the base first")
    g.add_argument("--base_weights_multiplier", type=float, nargs="*", default=None)
    g.add_argument("--fused_backward_pass", action="store_true",
                   help="full fine-tuning only (fuses the optimizer step into backward): refused for LoRA")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sample images during training")
    g.add_argument("--sample_prompts", type=str, default=None, help="prompt file (.txt, .toml or .json)")
    g.add_argument("--sample_every_n_steps", type=int, default=None)
    g.add_argument("--sample_every_n_epochs", type=int, default=None)
    g.add_argument("--sample_at_first", action="store_true", help="also sample before the first step")
    g.add_argument("--sample_sampler", type=str, default="ddim", help="(SD only) sampler for samples")


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging")
    g.add_argument("--logging_dir", type=str, default=None, help="tensorboard logs go here")
    g.add_argument("--log_with", type=str, default=None, choices=[None, "tensorboard", "wandb", "all"])
    g.add_argument("--log_prefix", type=str, default=None, help="prefix of the run's log folder name")
    g.add_argument("--log_tracker_name", type=str, default=None)
    g.add_argument("--log_tracker_config", type=str, default=None)
    g.add_argument("--wandb_run_name", type=str, default=None)
    g.add_argument("--wandb_api_key", type=str, default=None, help="never written to logs or metadata")
    g.add_argument("--log_config", action="store_true", help="log the options to the tracker")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("config file")
    g.add_argument("--config_file", type=str, default=None,
                   help="TOML file with any of these options (the command line overrides it)")
    g.add_argument("--output_config", action="store_true",
                   help="write the options given to the --config_file path and exit")


# Options declared for compatibility but not built yet: (dest, is-set test, message).
_NOT_YET = [
    ("base_weights", "--base_weights is not supported yet. Merge the LoRA into the model first."),
    ("xformers", "--xformers is not supported for this model: attention uses PyTorch SDPA. Remove it."),
    ("mem_eff_attn", "--mem_eff_attn is for SD 1.x/2.x only. Remove it."),
    ("full_fp16", "--full_fp16 is not supported yet; use --mixed_precision bf16 (or --full_bf16)."),
    ("fused_backward_pass", "--fused_backward_pass is not available for LoRA training (it saves the optimizer "
                            "memory of a full fine-tune; a LoRA's is small): remove it, and use --optimizer_type "
                            "adafactor alone if you want Adafactor."),
]


def refuse_unsupported(args: argparse.Namespace, handled: frozenset[str] = frozenset()) -> None:
    """Every option that would be silently ignored is an error instead; all listed at once.
    `handled`: options of this list that the family implements itself (e.g. SD's --xformers)."""
    problems = [msg for dest, msg in _NOT_YET
                if dest not in handled and getattr(args, dest, None) not in (None, False, [], 0)]
    if problems:
        raise ConfigError("these options cannot be used yet:\n  " + "\n  ".join(problems))


def check_common_args(args: argparse.Namespace) -> None:
    problems = []
    if not args.output_dir:
        problems.append("--output_dir is required: where should the LoRA be written?")
    if not args.network_module:
        problems.append("--network_module is required (e.g. networks.lora_flux)")
    if args.max_train_steps is not None and args.max_train_steps < 1 and not args.max_train_epochs:
        problems.append("--max_train_steps must be at least 1")
    if args.gradient_accumulation_steps < 1:
        problems.append("--gradient_accumulation_steps must be at least 1")
    if args.network_dim is not None and args.network_dim < 1:
        problems.append("--network_dim must be at least 1")
    if args.full_bf16 and args.mixed_precision != "bf16":
        problems.append("--full_bf16 needs --mixed_precision bf16")
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        problems.append("--network_train_unet_only and --network_train_text_encoder_only exclude each other: "
                        "give one (or neither, to train both)")
    if args.base_weights_multiplier and not args.base_weights:
        problems.append("--base_weights_multiplier needs --base_weights")
    if args.ddp_timeout is not None and args.ddp_timeout < 1:
        problems.append("--ddp_timeout is in minutes and must be at least 1")
    if args.dim_from_weights and not args.network_weights:
        problems.append("--dim_from_weights needs --network_weights")
    if args.skip_until_initial_step and args.initial_step is None and args.initial_epoch is None:
        problems.append("--skip_until_initial_step needs --initial_step or --initial_epoch")
    for name in ("save_every_n_epochs", "save_every_n_steps", "sample_every_n_steps", "sample_every_n_epochs"):
        v = getattr(args, name)
        if v is not None and v < 1:
            problems.append(f"--{name} must be at least 1")
    if problems:
        raise ConfigError("invalid options:\n  " + "\n  ".join(problems))
