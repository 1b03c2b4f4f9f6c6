"""Validation loss: the training loss on held-out images, made comparable between evaluations.

Every evaluation sees the same batches (the validation loader's epoch 1, up to
--max_validation_steps), the same noise (drawn from a generator seeded by the validation seed
and the batch index, on the CPU so CPU and GPU runs agree) and the same fixed noise levels, so
a change in the figure is a change in the network. It runs without gradients, in evaluation
mode, and inside `preserved_rng` so the training RNG stream is untouched (resume stays exact).
"""

from __future__ import annotations

import argparse

import torch

from library.errors import ConfigError

# Fixed noise levels (σ, the fraction of noise) at which each validation batch is evaluated:
# evenly spread so the figure weighs coarse and fine detail alike. Families that count in DDPM
# timesteps map σ to their own timestep (see NetworkTrainer.noisy_input_at).
VALIDATION_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


def add_validation_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("validation loss (needs validation_split in the dataset config)")
    g.add_argument("--validate_every_n_steps", type=int, default=None,
                   help="also compute the validation loss every N steps (default: off)")
    g.add_argument("--validate_every_n_epochs", type=int, default=None,
                   help="compute the validation loss every N epochs (default 1 when a validation split exists)")
    g.add_argument("--max_validation_steps", type=int, default=None,
                   help="use at most N validation batches per evaluation (default: all)")


def check_validation_args(args: argparse.Namespace, has_validation_set: bool) -> None:
    problems = []
    for name in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            problems.append(f"--{name} must be at least 1")
        if value is not None and not has_validation_set:
            problems.append(f"--{name} is set but there is no validation set: add validation_split (e.g. 0.1) "
                            "to a [[datasets]] or subset of the dataset config, or --validation_split")
    if problems:
        raise ConfigError("invalid validation options:\n  " + "\n  ".join(problems))


def validation_noise(like: torch.Tensor, seed: int, batch_index: int) -> torch.Tensor:
    """The same noise for batch `batch_index` at every evaluation, on any device."""
    generator = torch.Generator().manual_seed(seed * 100_003 + batch_index)
    return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)


def should_validate_at_step(args: argparse.Namespace, step: int) -> bool:
    return bool(args.validate_every_n_steps) and step % args.validate_every_n_steps == 0


def should_validate_at_epoch(args: argparse.Namespace, epoch: int) -> bool:
    """`epoch` counts from 1. Without --validate_every_n_epochs, every epoch (as sd-scripts does)."""
    return epoch % (args.validate_every_n_epochs or 1) == 0
