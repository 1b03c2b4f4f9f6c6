"""Learning-rate schedules (sd-scripts' --lr_scheduler names), written as LambdaLR factors.

The curves are those of diffusers/transformers `get_scheduler` (the tests compare them).
Step counts given by the user are optimizer steps; see `build_lr_scheduler` for how they
map to scheduler steps when accelerate steps the scheduler once per process.
"""

from __future__ import annotations

import argparse
import importlib
import math
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from library.errors import ConfigError
from library.training.optimizers import computes_own_lr, is_schedule_free, parse_key_value_args

SCHEDULER_NAMES = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
    "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "adafactor",
)  # fmt: skip

# Extra keywords each schedule accepts through --lr_scheduler_args (as in transformers).
_EXTRA_KWARGS = {
    "cosine": ("num_cycles",),
    "polynomial": ("lr_end",),
    "cosine_with_min_lr": ("min_lr",),
    "warmup_stable_decay": ("warmup_type", "decay_type"),
}
_WSD_SHAPES = ("linear", "cosine", "1-sqrt")


def parse_steps_or_ratio(value: Any, option: str = "--lr_warmup_steps") -> int | float:
    """An int is a step count; a float below 1 or "N%" is a ratio of the training steps."""
    if isinstance(value, bool):
        raise ConfigError(f"{option}: expected a step count or a ratio, got {value!r}.")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{option} must be >= 0 (got {value}).")
        return value
    if isinstance(value, float):
        if 0 <= value < 1:
            return value
        if value >= 1 and value.is_integer():
            return int(value)
        raise ConfigError(f"{option}: {value} is neither a step count nor a ratio in [0, 1); e.g. 100, 0.1 or 10%.")
    text = str(value).strip()
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            raise ConfigError(f"{option}: {text!r} is not a percentage like 10%.") from None
        if not 0 <= percent < 100:
            raise ConfigError(f"{option}: a percentage must be in [0, 100) (got {text}).")
        return percent / 100
    if re.fullmatch(r"\d+", text):
        return int(text)
    try:
        return parse_steps_or_ratio(float(text), option)
    except ValueError:
        raise ConfigError(f"{option}: {text!r} is neither a step count nor a ratio; e.g. 100, 0.1 or 10%.") from None


def _argparse_steps_or_ratio(option: str):
    def parse(text: str) -> int | float:
        try:
            return parse_steps_or_ratio(text, option)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def add_lr_scheduler_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare --lr_scheduler and its parameters."""
    group = parser.add_argument_group("learning-rate schedule")
    group.add_argument(
        "--lr_scheduler",
        choices=list(SCHEDULER_NAMES),
        default="constant",
        help="Schedule of the learning rate. constant (no warmup allowed; use constant_with_warmup), "
        "linear/cosine/polynomial decay to 0, cosine_with_restarts, inverse_sqrt, cosine_with_min_lr, "
        "warmup_stable_decay, adafactor (Adafactor's own, with relative_step=True). Default constant.",
    )
    group.add_argument(
        "--lr_warmup_steps",
        type=_argparse_steps_or_ratio("--lr_warmup_steps"),
        default=0,
        help="Linear warmup length: optimizer steps (100), or a ratio of the training steps (0.1 or 10%%). Default 0.",
    )
    group.add_argument(
        "--lr_decay_steps",
        type=_argparse_steps_or_ratio("--lr_decay_steps"),
        default=0,
        help="Decay length for warmup_stable_decay: steps or a ratio like --lr_warmup_steps. Default 0.",
    )
    group.add_argument(
        "--lr_scheduler_num_cycles",
        type=int,
        default=1,
        help="Restarts for cosine_with_restarts; half-waves/2 for cosine_with_min_lr and warmup_stable_decay. Default 1.",
    )
    group.add_argument(
        "--lr_scheduler_power", type=float, default=1.0, help="Power of the polynomial decay. Default 1.0 (linear)."
    )
    group.add_argument(
        "--lr_scheduler_timescale",
        type=int,
        default=None,
        help="inverse_sqrt timescale (default: the warmup steps, or 10000 without warmup).",
    )
    group.add_argument(
        "--lr_scheduler_min_lr_ratio",
        type=float,
        default=None,
        help="Floor as a fraction of the initial lr: required by cosine_with_min_lr, optional for warmup_stable_decay.",
    )
    group.add_argument(
        "--lr_scheduler_type",
        type=str,
        default=None,
        help="A custom scheduler class: a torch.optim.lr_scheduler name or 'package.module.Class', built "
        "as Class(optimizer, **--lr_scheduler_args). Replaces --lr_scheduler.",
    )
    group.add_argument(
        "--lr_scheduler_args",
        type=str,
        nargs="*",
        default=None,
        help='key=value arguments (Python literals) for --lr_scheduler_type, or extras of the built-in '
        'schedules: lr_end (polynomial), min_lr (cosine_with_min_lr), warmup_type/decay_type '
        '(warmup_stable_decay: linear, cosine, 1-sqrt), num_cycles (cosine).',
    )


@dataclass(frozen=True)
class LRSchedulerConfig:
    lr_scheduler: str = "constant"
    lr_warmup_steps: int | float = 0
    lr_decay_steps: int | float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_scheduler_timescale: int | None = None
    lr_scheduler_min_lr_ratio: float | None = None
    lr_scheduler_type: str | None = None
    lr_scheduler_args: tuple[str, ...] = field(default_factory=tuple)
    learning_rate: float | None = None  # only shown by the Adafactor proxy schedule

    @classmethod
    def from_args(cls, args: Any) -> "LRSchedulerConfig":
        if isinstance(args, cls):
            return args
        defaults = cls()
        return cls(
            lr_scheduler=getattr(args, "lr_scheduler", None) or defaults.lr_scheduler,
            lr_warmup_steps=parse_steps_or_ratio(getattr(args, "lr_warmup_steps", 0) or 0, "--lr_warmup_steps"),
            lr_decay_steps=parse_steps_or_ratio(getattr(args, "lr_decay_steps", 0) or 0, "--lr_decay_steps"),
            lr_scheduler_num_cycles=getattr(args, "lr_scheduler_num_cycles", 1),
            lr_scheduler_power=getattr(args, "lr_scheduler_power", 1.0),
            lr_scheduler_timescale=getattr(args, "lr_scheduler_timescale", None),
            lr_scheduler_min_lr_ratio=getattr(args, "lr_scheduler_min_lr_ratio", None),
            lr_scheduler_type=getattr(args, "lr_scheduler_type", None) or None,
            lr_scheduler_args=tuple(getattr(args, "lr_scheduler_args", None) or ()),
            learning_rate=getattr(args, "learning_rate", None),
        )


# ----------------------------------------------------------------------------------------------
# The curves: factor(step) multiplying each group's initial lr. Module-level functions bound
# with functools.partial so the scheduler pickles with accelerate's save_state.


def _warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def _constant(step: int) -> float:
    return 1.0


def _constant_with_warmup(step: int, *, warmup: int) -> float:
    return _warmup(step, warmup) if step < warmup else 1.0


def _linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _cosine(step: int, *, warmup: int, total: int, num_cycles: float, min_ratio: float = 0.0) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    return max(0.0, factor * (1 - min_ratio) + min_ratio)


def _cosine_with_restarts(step: int, *, warmup: int, total: int, num_cycles: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))


def _polynomial(step: int, *, warmup: int, total: int, lr_init: float, lr_end: float, power: float) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    if step > total:
        return lr_end / lr_init
    remaining = 1 - (step - warmup) / max(1, total - warmup)
    return ((lr_init - lr_end) * remaining**power + lr_end) / lr_init


def _inverse_sqrt(step: int, *, warmup: int, timescale: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


def _wsd_shape(kind: str, progress: float, num_cycles: float, rising: bool) -> float:
    if kind == "linear":
        return progress if rising else 1.0 - progress
    if kind == "cosine":
        if rising:
            return 0.5 * (1.0 - math.cos(math.pi * progress))
        return 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    return 1.0 - math.sqrt(1.0 - progress) if rising else 1.0 - math.sqrt(progress)  # 1-sqrt


def _warmup_stable_decay(
    step: int, *, warmup: int, stable: int, decay: int, warmup_type: str, decay_type: str, min_ratio: float, num_cycles: float
) -> float:
    if step < warmup:
        factor = _wsd_shape(warmup_type, step / max(1, warmup), num_cycles, rising=True)
        return max(0.0, factor * (1.0 - min_ratio) + min_ratio)
    if step < warmup + stable:
        return 1.0
    if step < warmup + stable + decay:
        factor = _wsd_shape(decay_type, (step - warmup - stable) / max(1, decay), num_cycles, rising=False)
        return max(0.0, factor * (1.0 - min_ratio) + min_ratio)
    return min_ratio


# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleSteps:
    """Lengths in scheduler steps."""

    total: int
    warmup: int
    decay: int


def resolve_schedule_steps(config: LRSchedulerConfig, num_training_steps: int, num_processes: int = 1) -> ScheduleSteps:
    """Turn step counts and ratios into scheduler steps (optimizer steps × num_processes)."""
    total = num_training_steps * num_processes

    def steps(value: int | float) -> int:
        return int(value * total) if isinstance(value, float) else value * num_processes

    return ScheduleSteps(total=total, warmup=steps(config.lr_warmup_steps), decay=steps(config.lr_decay_steps))


def _custom_scheduler(config: LRSchedulerConfig, optimizer: Optimizer, kwargs: dict[str, Any]) -> LRScheduler:
    path = config.lr_scheduler_type or ""
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name or "torch.optim.lr_scheduler")
    except ImportError as e:
        raise ConfigError(f"--lr_scheduler_type {path}: cannot import {module_name!r} ({e}).") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise ConfigError(f"--lr_scheduler_type {path}: {module.__name__} has no {attr!r}.")
    try:
        return cls(optimizer, **kwargs)
    except TypeError as e:
        raise ConfigError(f"--lr_scheduler_type {path} rejected --lr_scheduler_args {kwargs}: {e}") from None


def build_lr_scheduler(
    config: Any, optimizer: Optimizer, num_training_steps: int, num_processes: int = 1
) -> LRScheduler:
    """The scheduler for `optimizer` over `num_training_steps` optimizer steps.

    `config` is an LRSchedulerConfig or any object with the --lr_* attributes (parsed args).
    `num_processes`: how many times the scheduler is stepped per optimizer step. accelerate's
    prepared scheduler steps once per process (unless split_batches), so pass the process
    count when the scheduler goes through `accelerator.prepare`, else 1. Step counts and
    ratios the user gives are optimizer steps in both cases.
    """
    cfg = LRSchedulerConfig.from_args(config)
    name = cfg.lr_scheduler
    extra = parse_key_value_args(cfg.lr_scheduler_args, "--lr_scheduler_args")
    if num_training_steps < 1:
        raise ConfigError(f"the lr schedule needs at least one training step (got {num_training_steps}).")
    steps = resolve_schedule_steps(cfg, num_training_steps, num_processes)
    _check_options(cfg, steps, extra, optimizer)

    if is_schedule_free(optimizer):
        return LambdaLR(optimizer, _constant)
    if computes_own_lr(optimizer):
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer, initial_lr=cfg.learning_rate or 0.0)
    if cfg.lr_scheduler_type:
        return _custom_scheduler(cfg, optimizer, extra)

    warmup, total, cycles = steps.warmup, steps.total, cfg.lr_scheduler_num_cycles
    if name == "constant":
        factor = _constant
    elif name == "constant_with_warmup":
        factor = partial(_constant_with_warmup, warmup=warmup)
    elif name == "linear":
        factor = partial(_linear, warmup=warmup, total=total)
    elif name == "cosine":
        factor = partial(_cosine, warmup=warmup, total=total, num_cycles=float(extra.get("num_cycles", 0.5)))
    elif name == "cosine_with_restarts":
        factor = partial(_cosine_with_restarts, warmup=warmup, total=total, num_cycles=cycles)
    elif name == "polynomial":
        lr_init = optimizer.defaults["lr"]
        lr_end = float(extra.get("lr_end", 1e-7))
        if not lr_init > lr_end:
            raise ConfigError(f"polynomial schedule: lr_end ({lr_end}) must be below the learning rate ({lr_init}).")
        factor = partial(_polynomial, warmup=warmup, total=total, lr_init=lr_init, lr_end=lr_end, power=cfg.lr_scheduler_power)
    elif name == "inverse_sqrt":
        timescale = cfg.lr_scheduler_timescale or warmup or 10_000
        factor = partial(_inverse_sqrt, warmup=warmup, timescale=timescale)
    elif name == "cosine_with_min_lr":
        if "min_lr" in extra:
            min_ratio = float(extra["min_lr"]) / optimizer.defaults["lr"]
        else:
            min_ratio = float(cfg.lr_scheduler_min_lr_ratio)
        factor = partial(_cosine, warmup=warmup, total=total, num_cycles=cycles / 2, min_ratio=min_ratio)
    elif name == "warmup_stable_decay":
        factor = partial(
            _warmup_stable_decay,
            warmup=warmup,
            stable=total - warmup - steps.decay,
            decay=steps.decay,
            warmup_type=extra.get("warmup_type", "linear"),
            decay_type=extra.get("decay_type", "cosine"),
            min_ratio=cfg.lr_scheduler_min_lr_ratio or 0.0,
            num_cycles=cycles / 2,
        )
    else:
        raise ConfigError(f"--lr_scheduler {name!r}: choose one of {', '.join(SCHEDULER_NAMES)}.")
    return LambdaLR(optimizer, factor)


def _check_options(cfg: LRSchedulerConfig, steps: ScheduleSteps, extra: dict[str, Any], optimizer: Optimizer) -> None:
    """Refuse options that would be silently ignored or cannot work; all problems at once."""
    name = cfg.lr_scheduler
    problems: list[str] = []
    custom = bool(cfg.lr_scheduler_type)
    if name not in SCHEDULER_NAMES:
        problems.append(f"--lr_scheduler {name!r}: choose one of {', '.join(SCHEDULER_NAMES)}.")
    if is_schedule_free(optimizer):
        if name != "constant" or custom or steps.warmup:
            problems.append(
                "schedule-free optimizers schedule their own learning rate: keep --lr_scheduler constant with no "
                "--lr_warmup_steps / --lr_scheduler_type, and pass warmup as --optimizer_args warmup_steps=N."
            )
    elif computes_own_lr(optimizer):
        if name not in ("constant", "adafactor") or custom or steps.warmup:
            problems.append(
                "Adafactor with relative_step=True computes its own learning rate, so only --lr_scheduler adafactor "
                "(or constant) without warmup fits. Either drop the schedule options or pass "
                '--optimizer_args "relative_step=False" "scale_parameter=False" "warmup_init=False".'
            )
    elif name == "adafactor" and not custom:
        problems.append(
            "--lr_scheduler adafactor only works with --optimizer_type Adafactor and relative_step=True; "
            "pick another schedule (constant_with_warmup is a good fit for Adafactor with relative_step=False)."
        )
    needless_warmup = custom or name in ("constant", "adafactor")
    if steps.warmup and needless_warmup and not is_schedule_free(optimizer) and not computes_own_lr(optimizer):
        what = f"--lr_scheduler_type {cfg.lr_scheduler_type}" if custom else f"--lr_scheduler {name}"
        fix = "" if custom else " Use --lr_scheduler constant_with_warmup for a warmup then a constant rate."
        problems.append(f"{what} has no warmup but --lr_warmup_steps is {cfg.lr_warmup_steps}.{fix}")
    if steps.warmup > steps.total:
        problems.append(f"--lr_warmup_steps ({cfg.lr_warmup_steps}) is longer than the training run.")
    if not custom:
        if steps.decay and name != "warmup_stable_decay":
            problems.append("--lr_decay_steps is only used by --lr_scheduler warmup_stable_decay.")
        if cfg.lr_scheduler_min_lr_ratio is not None and name not in ("cosine_with_min_lr", "warmup_stable_decay"):
            problems.append("--lr_scheduler_min_lr_ratio is only used by cosine_with_min_lr and warmup_stable_decay.")
        if cfg.lr_scheduler_timescale is not None and name != "inverse_sqrt":
            problems.append("--lr_scheduler_timescale is only used by --lr_scheduler inverse_sqrt.")
        allowed = _EXTRA_KWARGS.get(name, ())
        unknown = [k for k in extra if k not in allowed]
        if unknown:
            accepted = ", ".join(allowed) if allowed else "nothing"
            problems.append(f"--lr_scheduler_args {', '.join(unknown)}: --lr_scheduler {name} accepts {accepted}.")
        if name == "cosine_with_min_lr":
            if ("min_lr" in extra) == (cfg.lr_scheduler_min_lr_ratio is not None):
                problems.append("cosine_with_min_lr needs exactly one of --lr_scheduler_min_lr_ratio or --lr_scheduler_args min_lr=...")
        if name == "warmup_stable_decay":
            if steps.warmup + steps.decay > steps.total:
                problems.append("warmup_stable_decay: --lr_warmup_steps + --lr_decay_steps exceed the training steps.")
            for key in ("warmup_type", "decay_type"):
                if extra.get(key, "linear") not in _WSD_SHAPES:
                    problems.append(f"--lr_scheduler_args {key}={extra[key]!r}: choose one of {', '.join(_WSD_SHAPES)}.")
    if problems:
        raise ConfigError("Invalid learning-rate schedule options:\n" + "\n".join(f"  - {p}" for p in problems))
