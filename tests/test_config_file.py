"""--config_file: flattening, strict keys and types, CLI override, --output_config."""

import argparse

import pytest

from library.errors import ConfigError
from library.training.config_file import parse_args_with_config, read_config_file, write_config_file


def make_parser():
    p = argparse.ArgumentParser()
    p.add_argument("--config_file")
    p.add_argument("--output_config", action="store_true")
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--max_train_steps", type=int, default=1600)
    p.add_argument("--optimizer_type", type=str, default="AdamW")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--network_args", type=str, nargs="*")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    return p


def test_values_from_file_sections_flattened_and_cli_overrides(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text('[training]\nlearning_rate = 2e-4\nmax_train_steps = 10\ngradient_checkpointing = true\n'
                 '[network]\nnetwork_args = ["a=1", "b=2"]\n')
    args = parse_args_with_config(make_parser(), ["--config_file", str(f), "--max_train_steps", "5"])
    assert args.learning_rate == 2e-4
    assert args.max_train_steps == 5          # the command line wins
    assert args.gradient_checkpointing is True
    assert args.network_args == ["a=1", "b=2"]


def test_unknown_key_and_wrong_types_all_reported(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text('learning_rat = 1e-4\nmax_train_steps = "20"\ngradient_checkpointing = 1\n'
                 'mixed_precision = "fp8"\n')
    with pytest.raises(ConfigError) as e:
        read_config_file(str(f), make_parser())
    msg = str(e.value)
    assert "4 problem(s)" in msg
    assert "unknown option 'learning_rat' (did you mean 'learning_rate'?)" in msg
    assert "--max_train_steps must be an integer (got '20')" in msg
    assert "--gradient_checkpointing is a flag" in msg
    assert "--mixed_precision must be one of no, fp16, bf16" in msg


def test_int_accepted_for_float(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text("learning_rate = 1\n")
    assert read_config_file(str(f), make_parser()) == {"learning_rate": 1.0}


def test_output_config_round_trip(tmp_path):
    parser = make_parser()
    args = parser.parse_args(["--learning_rate", "3e-4", "--gradient_checkpointing"])
    path = write_config_file(args, parser, str(tmp_path / "out.toml"))
    again = parse_args_with_config(make_parser(), ["--config_file", str(path)])
    assert again.learning_rate == 3e-4 and again.gradient_checkpointing
    assert "max_train_steps" not in path.read_text()   # defaults are not written


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        read_config_file(str(tmp_path / "nope.toml"), make_parser())


def test_two_runs_in_one_process_may_use_different_mixed_precision(tmp_path):
    """accelerate keeps its state process-wide; the trainer must still build an accelerator for a
    second run with another --mixed_precision (tests and notebooks run the trainer in-process)."""
    import argparse

    from library.training.trainer import NetworkTrainer

    def args(mp):
        return argparse.Namespace(log_with=None, logging_dir=None, output_dir=str(tmp_path), mixed_precision=mp)

    trainer = NetworkTrainer()
    assert trainer.make_accelerator(args("no")).mixed_precision == "no"
    assert trainer.make_accelerator(args("bf16")).mixed_precision == "bf16"
    assert trainer.make_accelerator(args("no")).mixed_precision == "no"
