"""Logging options (library/training/trackers.py): run folder, tracker init options, refusals."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from library.errors import ConfigError
from library.training import trackers


def args(**kw):
    values = dict(log_with=None, logging_dir=None, log_prefix=None, log_tracker_name=None, log_tracker_config=None,
                  wandb_run_name=None, wandb_api_key=None, log_config=False)
    values.update(kw)
    return argparse.Namespace(**values)


def test_logging_dir_gets_a_prefixed_timestamped_run_folder(tmp_path):
    folder, log_with = trackers.logging_setup(args(logging_dir=str(tmp_path), log_prefix="flux_"))
    assert log_with == "tensorboard"
    name = Path(folder).name
    assert Path(folder).parent == tmp_path and name.startswith("flux_") and len(name) == len("flux_") + 14
    assert trackers.logging_setup(args()) == (None, None)


def test_tensorboard_needs_a_logging_dir():
    with pytest.raises(ConfigError, match="give --logging_dir"):
        trackers.logging_setup(args(log_with="tensorboard"))


def test_tracker_config_file_and_wandb_run_name(tmp_path):
    config = tmp_path / "trackers.toml"
    config.write_text('[wandb]\nentity = "me"\ntags = ["flux"]\n')
    kwargs = trackers.tracker_init_kwargs(args(log_tracker_config=str(config), wandb_run_name="run-1"))
    assert kwargs == {"wandb": {"entity": "me", "tags": ["flux"], "name": "run-1"}}
    config.write_text('entity = "me"\n')
    with pytest.raises(ConfigError, match="top-level keys must be tracker tables"):
        trackers.tracker_init_kwargs(args(log_tracker_config=str(config)))
    with pytest.raises(ConfigError, match="file not found"):
        trackers.tracker_init_kwargs(args(log_tracker_config=str(tmp_path / "nope.toml")))
