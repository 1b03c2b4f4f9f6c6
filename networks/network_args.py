"""Parsing and validation of `--network_args` for LoRA networks.

The trainer splits each "key=value" item on its first "=" and hands the network module a
dict of strings. Each family declares the keys it accepts as a list of `ArgSpec`;
`parse_network_args` checks every key and every value in one pass and raises a single
`ConfigError` listing all problems (a typo gets the nearest valid key suggested). Values
are parsed strictly: "20" is an int only for an int key, "True"/"False" are the only
booleans, and nothing unknown is silently ignored.

Also here: the small value languages that several families share (regex rank/lr rules,
block index selections, bracketed int lists).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Generic, Mapping, Sequence, TypeVar

from library.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class ArgSpec:
    """One accepted network_args key: its parser (str -> value, raising ValueError with a
    message that says what is expected) and a one-line help text."""

    name: str
    parse: Callable[[Any], Any]
    help: str


# ----------------------------------------------------------------------------------------
# Value parsers. Each takes the raw value (normally a str; an already-typed Python value
# of the right type is accepted too, for programmatic callers) and raises ValueError.


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip() in ("True", "true"):
        return True
    if isinstance(value, str) and value.strip() in ("False", "false"):
        return False
    raise ValueError("expected True or False")


def _parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError("expected an integer such as 4")


def _parse_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            raise ValueError("expected a number such as 0.1 or 1e-4") from None
    else:
        raise ValueError("expected a number")
    if not math.isfinite(out):
        raise ValueError("expected a finite number")
    return out


def parse_rank(value: Any) -> int:
    """A LoRA rank: an integer >= 0 (0 means no LoRA on that layer)."""
    rank = _parse_int(value)
    if rank < 0:
        raise ValueError("a rank must be 0 (skip the layer) or a positive integer")
    return rank


def parse_positive_float(value: Any) -> float:
    out = _parse_float(value)
    if out <= 0:
        raise ValueError("expected a number > 0")
    return out


def parse_non_negative_float(value: Any) -> float:
    out = _parse_float(value)
    if out < 0:
        raise ValueError("expected a number >= 0")
    return out


def parse_probability(value: Any) -> float | None:
    """A dropout probability in [0, 1); 0 means off (returned as None)."""
    p = _parse_float(value)
    if not 0 <= p < 1:
        raise ValueError("expected a probability p with 0 <= p < 1")
    return p or None


def parse_choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text

    return parse


def parse_rank_list(length: int, names: Sequence[str]) -> Callable[[Any], list[int]]:
    """"[4,2,2,2,4]" (brackets optional) -> exactly `length` ranks."""

    def parse(value: Any) -> list[int]:
        if isinstance(value, (list, tuple)):
            items = list(value)
        else:
            text = str(value).strip()
            if text.startswith("[") and text.endswith("]"):
                text = text[1:-1]
            items = [t for t in text.split(",")]
        if len(items) != length:
            raise ValueError(f"expected {length} comma-separated ranks [{', '.join(names)}], e.g. "
                             f"[{','.join(['4'] * length)}]; got {len(items)}")
        try:
            return [parse_rank(i) for i in items]
        except ValueError as e:
            raise ValueError(f"{e} (in the list [{', '.join(names)}])") from None

    return parse


def refused(message: str) -> Callable[[Any], Any]:
    """A key that is recognised but refused whatever its value (message says why/what instead)."""

    def parse(value: Any) -> Any:
        raise ValueError(message)

    return parse


def false_only(message: str) -> Callable[[Any], bool]:
    """A boolean whose True is refused (not supported yet); False, the default, is accepted."""

    def parse(value: Any) -> bool:
        if parse_bool(value):
            raise ValueError(message)
        return False

    return parse


# ----------------------------------------------------------------------------------------
# Block selections: "all", "none" or "0,2,5-8".


@dataclass(frozen=True)
class BlockSelection:
    """Which blocks of one kind are trained. `indices` None means all of them. The range is
    checked against the real model by `resolve`, since block counts vary (pruned models)."""

    text: str
    indices: frozenset[int] | None

    def resolve(self, block_count: int, arg_name: str) -> frozenset[int]:
        if self.indices is None:
            return frozenset(range(block_count))
        bad = sorted(i for i in self.indices if i >= block_count)
        if bad:
            raise ConfigError(
                f"--network_args {arg_name}={self.text}: block {bad[0]} does not exist; this model has "
                f"{block_count} such blocks, so valid indices are 0-{block_count - 1}."
            )
        return self.indices


def parse_block_selection(value: Any) -> BlockSelection:
    text = str(value).strip()
    if text == "all":
        return BlockSelection(text, None)
    if text == "none":
        return BlockSelection(text, frozenset())
    if not text:
        raise ValueError('expected "all", "none" or indices like 0,2,5-8')
    chosen: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", part)
        if m is None:
            raise ValueError(f'"{part}" is not an index or a range; expected "all", "none" or indices like 0,2,5-8')
        if m.group(3) is not None:
            chosen.add(int(m.group(3)))
            continue
        start, end = int(m.group(1)), int(m.group(2))
        if start > end:
            raise ValueError(f'range "{part}" runs backwards; write {end}-{start}')
        chosen.update(range(start, end + 1))
    return BlockSelection(text, frozenset(chosen))


# ----------------------------------------------------------------------------------------
# Regex rules: "pattern=value,pattern=value" (network_reg_dims, network_reg_lrs).


@dataclass(frozen=True)
class RegexRule(Generic[T]):
    pattern: re.Pattern
    value: T


def last_match(rules: Sequence[RegexRule[T]] | None, lora_name: str) -> RegexRule[T] | None:
    """The LAST rule whose pattern `re.search`es the LoRA name (the documented rule: "the
    setting from the last matching pattern in the string will be applied")."""
    found = None
    for rule in rules or ():
        if rule.pattern.search(lora_name):
            found = rule
    return found


def _parse_regex_rules(value: Any, parse_value: Callable[[Any], T], what: str) -> list[RegexRule[T]]:
    # Split on commas, but a comma may also sit inside a pattern ("blocks_\d{1,2}_=4"), so a
    # piece without "=" is joined to the next one.
    text = str(value)
    rules: list[RegexRule[T]] = []
    pending = ""
    for piece in text.split(","):
        pending = f"{pending},{piece}" if pending else piece
        if "=" not in pending:
            continue
        pattern_text, _, value_text = pending.rpartition("=")
        try:
            parsed = parse_value(value_text)
        except ValueError as e:
            raise ValueError(f'"{pending.strip()}": the {what} "{value_text.strip()}" is invalid ({e})') from None
        pattern_text = pattern_text.strip()
        if not pattern_text:
            raise ValueError(f'"{pending.strip()}" has an empty pattern; expected pattern={what}')
        try:
            compiled = re.compile(pattern_text)
        except re.error as e:
            raise ValueError(f'"{pattern_text}" is not a valid regular expression ({e})') from None
        rules.append(RegexRule(compiled, parsed))
        pending = ""
    if pending.strip():
        raise ValueError(f'"{pending.strip()}" is not pattern={what}; expected e.g. "single_blocks=4,img_attn=8" '
                         f"(comma-separated pattern={what} pairs)")
    if not rules:
        raise ValueError(f"expected comma-separated pattern={what} pairs")
    return rules


def parse_regex_ranks(value: Any) -> list[RegexRule[int]]:
    return _parse_regex_rules(value, parse_rank, "rank")


def parse_regex_lrs(value: Any) -> list[RegexRule[float]]:
    def parse_lr(v: Any) -> float:
        lr = _parse_float(v)
        if lr < 0:
            raise ValueError("a learning rate must be >= 0")
        return lr

    return _parse_regex_rules(value, parse_lr, "lr")


# ----------------------------------------------------------------------------------------
# Keys every LoRA family accepts (each family adds its own to these).

COMMON_LORA_ARGS: tuple[ArgSpec, ...] = (
    ArgSpec("rank_dropout", parse_probability, "drop each rank with this probability while training (rescaled)"),
    ArgSpec("module_dropout", parse_probability, "skip a whole LoRA module with this probability while training"),
    ArgSpec("loraplus_lr_ratio", parse_positive_float, "LoRA+: lr of lora_up = lr x ratio (DiT and text encoders)"),
    ArgSpec("loraplus_unet_lr_ratio", parse_positive_float, "LoRA+ ratio for the DiT/U-Net only"),
    ArgSpec("loraplus_text_encoder_lr_ratio", parse_positive_float, "LoRA+ ratio for the text encoders only"),
    ArgSpec("network_reg_dims", parse_regex_ranks, "regex=rank,... ; the last matching pattern sets the rank"),
    ArgSpec("network_reg_lrs", parse_regex_lrs, "regex=lr,... ; the last matching pattern sets the learning rate"),
    ArgSpec("verbose", parse_bool, "True to list every LoRA module with its rank and alpha"),
)


def parse_network_args(raw: Mapping[str, Any] | None, specs: Sequence[ArgSpec], *,
                       network_module: str) -> dict[str, Any]:
    """Validate and parse network_args. Returns {key: parsed value} for the keys given.
    Raises one ConfigError listing every unknown key and bad value."""
    by_name = {s.name: s for s in specs}
    parsed: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in (raw or {}).items():
        spec = by_name.get(key)
        if spec is None:
            close = difflib.get_close_matches(key, list(by_name), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"'{key}' is not a network_args key of {network_module}{hint}")
            continue
        try:
            parsed[key] = spec.parse(value)
        except ValueError as e:
            problems.append(f"{key}={value}: {e}")
    if problems:
        valid = ", ".join(sorted(by_name))
        raise ConfigError(
            f"invalid --network_args for {network_module}:\n  - " + "\n  - ".join(problems)
            + f"\nValid keys: {valid}."
        )
    return parsed


def parse_bool_arg(network_args: list[str] | None, key: str) -> bool:
    """One boolean from the raw `--network_args key=value ...` list, as the network module will
    read it: for checks a trainer makes before the network exists (e.g. train_t5xxl with cached
    text outputs)."""
    value = None
    for item in network_args or []:
        name, sep, text = item.partition("=")
        if sep and name.strip() == key:
            value = text.strip()
    try:
        return value is not None and parse_bool(value)
    except ValueError as e:
        raise ConfigError(f"--network_args {key}={value}: {e}") from e

