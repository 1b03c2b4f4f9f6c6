"""Optimizer construction from --optimizer_type / --optimizer_args (sd-scripts names).

Names are case-insensitive. Besides the built-in names, any torch.optim class name and any
fully qualified "package.module.Class" work. Optional packages are imported only when asked
for, with a "pip install" hint when missing.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.optim import Optimizer

from library.errors import ConfigError

logger = logging.getLogger(__name__)


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare --optimizer_type, --optimizer_args, --max_grad_norm and the deprecated aliases."""
    group = parser.add_argument_group("optimizer")
    group.add_argument(
        "--optimizer_type",
        type=str,
        default=None,
        help="Optimizer (case-insensitive; default AdamW): AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit, "
        "PagedAdamW32bit, Lion, Lion8bit, PagedLion8bit, SGDNesterov, SGDNesterov8bit, Adafactor, "
        "DAdaptation/DAdaptAdamPreprint, DAdaptAdaGrad, DAdaptAdam, DAdaptAdan, DAdaptAdanIP, DAdaptLion, "
        "DAdaptSGD, Prodigy, AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree, any torch.optim class, "
        "or a full 'package.module.Class' path (e.g. bitsandbytes.optim.AdEMAMix8bit).",
    )
    group.add_argument(
        "--optimizer_args",
        type=str,
        nargs="*",
        default=None,
        help='Extra optimizer arguments as key=value, values as Python literals: "weight_decay=0.01" '
        '"betas=(0.9,0.99)" "relative_step=False". Quote strings: "name=\'x\'".',
    )
    group.add_argument(
        "--max_grad_norm",
        type=float,
        default=1.0,
        help="Clip the gradient norm to this value; 0 disables clipping (often recommended with "
        "Adafactor). Default 1.0.",
    )
    group.add_argument(
        "--use_8bit_adam", action="store_true", help="Deprecated: same as --optimizer_type AdamW8bit."
    )
    group.add_argument(
        "--use_lion_optimizer", action="store_true", help="Deprecated: same as --optimizer_type Lion."
    )


@dataclass(frozen=True)
class BuiltOptimizer:
    """An optimizer plus what the training loop must know about it.

    name: "module.Class" for logs. description: the ss_optimizer metadata value,
    "module.Class(k=v,...)". needs_train_eval_mode: schedule-free optimizers must be put in
    train() mode for steps and eval() mode for sampling, validation and saving.
    adapts_lr: D-Adaptation/Prodigy (log d·lr). computes_own_lr: Adafactor with
    relative_step, whose lr is internal (only the adafactor lr scheduler fits).
    """

    name: str
    description: str
    optimizer: Optimizer
    needs_train_eval_mode: bool = False
    adapts_lr: bool = False
    computes_own_lr: bool = False


def resolve_optimizer_type(
    optimizer_type: str | None, *, use_8bit_adam: bool = False, use_lion_optimizer: bool = False
) -> str:
    """--optimizer_type with the deprecated --use_8bit_adam / --use_lion_optimizer folded in."""
    chosen = optimizer_type or ""
    if use_8bit_adam and use_lion_optimizer:
        raise ConfigError("--use_8bit_adam and --use_lion_optimizer contradict each other; use --optimizer_type.")
    if (use_8bit_adam or use_lion_optimizer) and chosen:
        flag = "--use_8bit_adam" if use_8bit_adam else "--use_lion_optimizer"
        raise ConfigError(f"{flag} and --optimizer_type {chosen} are both given; keep only --optimizer_type.")
    if use_8bit_adam:
        return "AdamW8bit"
    if use_lion_optimizer:
        return "Lion"
    return chosen or "AdamW"


def optimizer_type_from_args(args: Any) -> str:
    """resolve_optimizer_type for parsed arguments."""
    return resolve_optimizer_type(
        getattr(args, "optimizer_type", None),
        use_8bit_adam=bool(getattr(args, "use_8bit_adam", False)),
        use_lion_optimizer=bool(getattr(args, "use_lion_optimizer", False)),
    )


def parse_key_value_args(items: Iterable[str] | None, option: str) -> dict[str, Any]:
    """["k=v", ...] -> {k: literal_eval(v)}; shared by --optimizer_args and --lr_scheduler_args."""
    parsed: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{option}: {item!r} is not key=value.")
        try:
            parsed[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise ConfigError(
                f"{option}: the value of {key!r} ({text!r}) is not a Python literal; "
                f"numbers, True/False, None, tuples and quoted strings (\"{key}='{text}'\") work."
            ) from None
    return parsed


# ----------------------------------------------------------------------------------------------
# The named optimizers. Each entry says where the class lives and what to fix up.


@dataclass(frozen=True)
class _Spec:
    module: str  # importable module holding the class
    attr: str  # class name in that module
    pip: str | None  # package to install when the import fails (None: a requirement)
    fixed_kwargs: tuple[tuple[str, Any], ...] = ()  # passed but not shown in ss_optimizer
    default_kwargs: tuple[tuple[str, Any], ...] = ()  # added when missing, shown in ss_optimizer


_NESTEROV = (("nesterov", True),)
_MOMENTUM = (("momentum", 0.9),)

_SPECS: dict[str, _Spec] = {
    "adamw": _Spec("torch.optim", "AdamW", None),
    "sgdnesterov": _Spec("torch.optim", "SGD", None, _NESTEROV, _MOMENTUM),
    "adafactor": _Spec("transformers.optimization", "Adafactor", None),
    "adamw8bit": _Spec("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "pagedadamw": _Spec("bitsandbytes.optim", "PagedAdamW", "bitsandbytes"),
    "pagedadamw8bit": _Spec("bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes"),
    "pagedadamw32bit": _Spec("bitsandbytes.optim", "PagedAdamW32bit", "bitsandbytes"),
    "sgdnesterov8bit": _Spec("bitsandbytes.optim", "SGD8bit", "bitsandbytes", _NESTEROV, _MOMENTUM),
    "lion8bit": _Spec("bitsandbytes.optim", "Lion8bit", "bitsandbytes"),
    "pagedlion8bit": _Spec("bitsandbytes.optim", "PagedLion8bit", "bitsandbytes"),
    "dadaptation": _Spec("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    "dadaptadampreprint": _Spec("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    "dadaptadagrad": _Spec("dadaptation", "DAdaptAdaGrad", "dadaptation"),
    "dadaptadam": _Spec("dadaptation", "DAdaptAdam", "dadaptation"),
    "dadaptadan": _Spec("dadaptation", "DAdaptAdan", "dadaptation"),
    "dadaptadanip": _Spec("dadaptation.experimental", "DAdaptAdanIP", "dadaptation"),
    "dadaptlion": _Spec("dadaptation", "DAdaptLion", "dadaptation"),
    "dadaptsgd": _Spec("dadaptation", "DAdaptSGD", "dadaptation"),
    "prodigy": _Spec("prodigyopt", "Prodigy", "prodigyopt"),
    "adamwschedulefree": _Spec("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "radamschedulefree": _Spec("schedulefree", "RAdamScheduleFree", "schedulefree"),
    "sgdschedulefree": _Spec("schedulefree", "SGDScheduleFree", "schedulefree"),
}
# Lion: the lion-pytorch package when installed (what sd-scripts uses), else bitsandbytes' Lion
# (32-bit state, same update rule), which is a requirement of ours on Linux.
_LION_SOURCES = (("lion_pytorch", "Lion"), ("bitsandbytes.optim", "Lion"))

KNOWN_OPTIMIZER_NAMES = (
    "AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion", "Lion8bit",
    "PagedLion8bit", "SGDNesterov", "SGDNesterov8bit", "Adafactor", "DAdaptation", "DAdaptAdamPreprint",
    "DAdaptAdaGrad", "DAdaptAdam", "DAdaptAdan", "DAdaptAdanIP", "DAdaptLion", "DAdaptSGD", "Prodigy",
    "AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree",
)  # fmt: skip


def _import(module: str, optimizer_type: str, pip: str | None):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = f"pip install {pip}" if pip else "check your installation"
        raise ConfigError(
            f"--optimizer_type {optimizer_type} needs the Python package {pip or module!r}, which could not be "
            f"imported ({e}). Fix: {hint}"
        ) from None


def _torch_optim_classes() -> dict[str, type]:
    return {
        name.lower(): cls
        for name, cls in vars(torch.optim).items()
        if inspect.isclass(cls) and issubclass(cls, Optimizer) and cls is not Optimizer
    }


def _resolve_class(optimizer_type: str) -> tuple[type, _Spec | None]:
    key = optimizer_type.lower()
    if key == "lion":
        for module, attr in _LION_SOURCES:
            try:
                return getattr(importlib.import_module(module), attr), None
            except (ImportError, AttributeError):
                continue
        raise ConfigError("--optimizer_type Lion needs lion-pytorch or bitsandbytes. Fix: pip install lion-pytorch")
    spec = _SPECS.get(key)
    if spec is not None:
        module = _import(spec.module, optimizer_type, spec.pip)
        cls = getattr(module, spec.attr, None)
        if cls is None:
            raise ConfigError(
                f"--optimizer_type {optimizer_type}: {spec.module}.{spec.attr} does not exist in the installed "
                f"version. Fix: pip install -U {spec.pip or spec.module.split('.')[0]}"
            )
        return cls, spec
    if "." in optimizer_type:  # a full path, case-sensitive
        module_name, _, attr = optimizer_type.rpartition(".")
        module = _import(module_name, optimizer_type, module_name.split(".")[0])
        cls = getattr(module, attr, None)
        if cls is None:
            raise ConfigError(f"--optimizer_type {optimizer_type}: module {module_name!r} has no {attr!r}.")
        return cls, None
    torch_classes = _torch_optim_classes()
    if key in torch_classes:
        return torch_classes[key], None
    candidates = {c.lower(): c for c in [*KNOWN_OPTIMIZER_NAMES, *(c.__name__ for c in torch_classes.values())]}
    suggestion = candidates[difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.0)[0]]
    raise ConfigError(
        f"--optimizer_type {optimizer_type!r} is unknown. Did you mean {suggestion!r}? Known: "
        f"{', '.join(KNOWN_OPTIMIZER_NAMES)}, any torch.optim class, or 'package.module.Class'."
    )


def _is_param_groups(params: list) -> bool:
    return len(params) > 0 and isinstance(params[0], dict)


def _warn_about_adaptive_lr(params: list, lr: float) -> None:
    group_lrs = {g.get("lr", lr) for g in params} if _is_param_groups(params) else {lr}
    first = params[0].get("lr", lr) if _is_param_groups(params) else lr
    if first <= 0.1:
        logger.warning("D-Adaptation/Prodigy expect a learning rate around 1.0 (got %s).", first)
    if len(group_lrs) > 1:
        logger.warning("D-Adaptation/Prodigy with several learning rates: only the first (%s) takes effect.", first)


def _prepare_adafactor(kwargs: dict[str, Any], params: list, lr: float) -> float | None:
    """sd-scripts' Adafactor rules. Returns the lr to pass (None with relative_step)."""
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("Adafactor: warmup_init=True needs relative_step=True; setting relative_step=True.")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        return lr
    logger.warning(
        "Adafactor with relative_step=True computes its own learning rate: --learning_rate (%s) is only "
        "the initial value shown in logs, and the lr scheduler is Adafactor's own. Pass "
        '--optimizer_args "relative_step=False" "scale_parameter=False" "warmup_init=False" to use yours.',
        lr,
    )
    if _is_param_groups(params):
        if any(group.pop("lr", None) is not None for group in params):
            logger.warning("Adafactor with relative_step=True ignores the per-group learning rates.")
    return None


def is_schedule_free(optimizer: Optimizer) -> bool:
    """Schedule-free optimizers (schedulefree package or any *ScheduleFree* class)."""
    cls = type(optimizer)
    return "schedulefree" in f"{cls.__module__}.{cls.__name__}".lower()


def computes_own_lr(optimizer: Optimizer) -> bool:
    """Adafactor with relative_step=True: its lr lives inside the optimizer."""
    return type(optimizer).__name__ == "Adafactor" and bool(optimizer.defaults.get("relative_step"))


def build_optimizer(
    optimizer_type: str | None,
    optimizer_args: list[str] | None,
    params: list,
    lr: float,
    *,
    use_8bit_adam: bool = False,
    use_lion_optimizer: bool = False,
    capturable: bool = False,
) -> BuiltOptimizer:
    """Create the optimizer for `params` (tensors or param-group dicts) at learning rate `lr`.

    `optimizer_type` None or "" means AdamW (or what a deprecated alias flag asks for).
    Param-group dicts may carry their own "lr" (removed for Adafactor with relative_step,
    which cannot use them). `capturable`: PyTorch's Adam/AdamW with their step counts on the GPU,
    so that the step can be recorded in a CUDA graph (--cuda_graph).
    """
    optimizer_type = resolve_optimizer_type(
        optimizer_type, use_8bit_adam=use_8bit_adam, use_lion_optimizer=use_lion_optimizer
    )
    params = list(params)
    if not params:
        raise ConfigError("there are no trainable parameters to optimize (check --network_* options).")
    kwargs = parse_key_value_args(optimizer_args, "--optimizer_args")
    cls, spec = _resolve_class(optimizer_type)
    key = optimizer_type.lower()
    if spec is not None:
        for name, value in spec.default_kwargs:
            kwargs.setdefault(name, value)
    adapts_lr = key.startswith("dadapt") or key == "prodigy"
    if adapts_lr:
        _warn_about_adaptive_lr(params, lr)
    lr_to_pass: float | None = lr
    if key == "adafactor":
        lr_to_pass = _prepare_adafactor(kwargs, params, lr)

    shown = ",".join(f"{k}={v}" for k, v in kwargs.items())
    fixed = dict(spec.fixed_kwargs) if spec is not None else {}
    if key == "adamw" and not {"fused", "foreach"} & kwargs.keys() and _all_on_cuda(params):
        # PyTorch's fused AdamW: the same update in a few kernels for all tensors (the default
        # multi-tensor version took 14 ms per FLUX LoRA step on an H200). Not part of the
        # optimizer's description, which stays sd-scripts' string.
        fixed["fused"] = True
    if capturable:
        if cls not in (torch.optim.Adam, torch.optim.AdamW):
            raise ConfigError(f"--cuda_graph needs PyTorch's AdamW or Adam, not --optimizer_type {optimizer_type}")
        fixed["capturable"] = True
    try:
        optimizer = cls(params, lr=lr_to_pass, **fixed, **kwargs)
    except TypeError as e:  # an unknown keyword in --optimizer_args, typically
        raise ConfigError(f"--optimizer_type {optimizer_type} rejected --optimizer_args {shown or '(none)'}: {e}") from None

    name = f"{cls.__module__}.{cls.__name__}"
    schedule_free = is_schedule_free(optimizer)
    if schedule_free:
        optimizer.train()  # the loop switches to eval() around sampling, validation and saving
    return BuiltOptimizer(
        name=name,
        description=name + (f"({shown})" if shown else ""),
        optimizer=optimizer,
        needs_train_eval_mode=schedule_free,
        adapts_lr=adapts_lr,
        computes_own_lr=key == "adafactor" and lr_to_pass is None,
    )


def _all_on_cuda(params: list) -> bool:
    groups = [p["params"] if isinstance(p, dict) else [p] for p in params]
    if not all(isinstance(g, (list, tuple)) for g in groups):
        return False   # a generator would be used up by looking
    tensors = [t for g in groups for t in g]
    return bool(tensors) and all(isinstance(t, torch.Tensor) and t.is_cuda and t.is_floating_point() for t in tensors)


def build_optimizer_from_args(args: Any, params: list, lr: float) -> BuiltOptimizer:
    """build_optimizer with --optimizer_type (and its deprecated aliases) and --optimizer_args."""
    return build_optimizer(
        getattr(args, "optimizer_type", None),
        getattr(args, "optimizer_args", None),
        params,
        lr,
        use_8bit_adam=bool(getattr(args, "use_8bit_adam", False)),
        use_lion_optimizer=bool(getattr(args, "use_lion_optimizer", False)),
    )

