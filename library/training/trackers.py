"""Logging to tensorboard / wandb through accelerate, with sd-scripts' options.

    --logging_dir DIR       tensorboard (default tracker) writes to DIR/<log_prefix><timestamp>/
    --log_with              tensorboard | wandb | all
    --log_prefix            prefix of the run's folder under --logging_dir (as sd-scripts)
    --log_tracker_name      the run/project name given to the trackers (default "network_train")
    --log_tracker_config    a TOML file of per-tracker init options, e.g. [wandb] entity = "me"
    --wandb_run_name        the wandb run's name
    --wandb_api_key         handed to wandb through WANDB_API_KEY; never logged or saved
    --log_config            log every option (except the API key) as the run's config
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import toml

from library.errors import ConfigError


def logging_setup(args) -> tuple[str | None, str | None]:
    """(logging folder of this run, tracker name for accelerate's log_with)."""
    log_with = args.log_with
    if args.logging_dir and log_with is None:
        log_with = "tensorboard"
    if log_with in ("tensorboard", "all") and not args.logging_dir:
        raise ConfigError(f"--log_with {log_with} writes tensorboard logs: give --logging_dir DIR")
    logging_dir = None
    if args.logging_dir:
        logging_dir = str(Path(args.logging_dir) / f"{args.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}")
    return logging_dir, log_with


def tracker_init_kwargs(args) -> dict:
    """init_kwargs for accelerate's init_trackers, from --log_tracker_config and --wandb_run_name."""
    kwargs: dict = {}
    if args.log_tracker_config:
        path = Path(args.log_tracker_config)
        if not path.is_file():
            raise ConfigError(f"--log_tracker_config {path}: file not found")
        try:
            kwargs = toml.load(path)
        except (toml.TomlDecodeError, OSError) as e:
            raise ConfigError(f"--log_tracker_config {path}: not a valid TOML file ({e})") from e
        bad = [k for k, v in kwargs.items() if not isinstance(v, dict)]
        if bad:
            raise ConfigError(f"--log_tracker_config {path}: top-level keys must be tracker tables such as "
                              f"[wandb] or [tensorboard]; found plain values for {', '.join(bad)}")
    if args.wandb_run_name:
        kwargs.setdefault("wandb", {})["name"] = args.wandb_run_name
    return kwargs


def init_trackers(accelerator, args) -> None:
    if not accelerator.log_with:
        return
    if args.wandb_api_key:
        os.environ["WANDB_API_KEY"] = args.wandb_api_key   # read by wandb.init; kept out of logs and metadata
    config = {k: str(v) for k, v in vars(args).items() if k != "wandb_api_key"} if args.log_config else {}
    accelerator.init_trackers(args.log_tracker_name or "network_train", config=config,
                              init_kwargs=tracker_init_kwargs(args))
