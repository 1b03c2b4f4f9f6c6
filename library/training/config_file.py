"""`--config_file args.toml`: any command-line option from a TOML file, strictly checked.

sd-scripts flattens the file's tables and silently keeps unknown keys. We flatten the same way
(so existing files work) but refuse unknown keys and wrong types, naming every problem at once.
The command line overrides the file.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path

import toml

from library.errors import ConfigError

# Options that only steer the config mechanism itself; never read from or written to the file.
_META_OPTIONS = {"config_file", "output_config"}


def _flatten(table: dict, where: str = "") -> list[tuple[str, object, str]]:
    """[(key, value, section)] with sub-tables flattened (sd-scripts ignores section names)."""
    out = []
    for key, value in table.items():
        if isinstance(value, dict):
            out.extend(_flatten(value, f"{where}[{key}]" if not where else f"{where}.{key}"))
        else:
            out.append((key, value, where or "top level"))
    return out


def _check_value(action: argparse.Action, value: object) -> tuple[object, str | None]:
    """Return (converted value, error or None) for one option's TOML value."""
    name = "--" + action.dest
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            return value, f"{name} is a flag: write true or false (got {value!r})"
        return value, None
    many = action.nargs in ("*", "+") or isinstance(action.nargs, int)
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not many:
        return value, f"{name} takes one value, not a list (got {value!r})"
    converted = []
    for v in values:
        if action.type is int and (isinstance(v, bool) or not isinstance(v, int)):
            return value, f"{name} must be an integer (got {v!r})"
        if action.type is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return value, f"{name} must be a number (got {v!r})"
        if action.type in (None, str) and not isinstance(v, str):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and action.choices is None:
                v = str(v)  # e.g. `resolution = 512` for a string-typed option
            else:
                return value, f"{name} must be a string (got {v!r})"
        if action.type is float:
            v = float(v)
        elif callable(action.type) and action.type not in (int, float, str):
            try:
                v = action.type(v if isinstance(v, str) else str(v))
            except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
                return value, f"{name}: {e}"
        if action.choices is not None and v not in action.choices:
            return value, f"{name} must be one of {', '.join(map(str, action.choices))} (got {v!r})"
        converted.append(v)
    return (converted if many else converted[0]), None


def read_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, object]:
    """Read and check a config TOML against the parser; returns {dest: value}."""
    p = Path(path)
    if p.suffix.lower() != ".toml":
        p = p.with_suffix(".toml") if not p.exists() else p
    if not p.is_file():
        raise ConfigError(f"--config_file {path}: file not found.")
    try:
        data = toml.load(p)
    except (toml.TomlDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config_file {p}: not valid TOML ({e}).") from e

    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    values, problems = {}, []
    for key, value, section in _flatten(data):
        if key in _META_OPTIONS:
            problems.append(f"{section}: '{key}' cannot be set inside a config file")
            continue
        action = actions.get(key)
        if action is None:
            near = difflib.get_close_matches(key, list(actions), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            problems.append(f"{section}: unknown option '{key}'{hint}")
            continue
        converted, err = _check_value(action, value)
        if err:
            problems.append(f"{section}: {err}")
        else:
            values[key] = converted
    if problems:
        raise ConfigError(f"--config_file {p} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return values


def write_config_file(args: argparse.Namespace, parser: argparse.ArgumentParser, path: str) -> Path:
    """Write the options that differ from their defaults (what `--output_config` does)."""
    p = Path(path)
    if p.suffix.lower() != ".toml":
        p = p.with_suffix(".toml")
    out = {}
    for action in parser._actions:
        if action.dest in _META_OPTIONS or action.dest == "help":
            continue
        value = getattr(args, action.dest, None)
        if value is None or value == action.default:
            continue
        out[action.dest] = value
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(toml.dumps(out))
    return p


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; defaults come from `--config_file` when given; CLI wins."""
    pre, _ = parser.parse_known_args(argv)
    config_path = getattr(pre, "config_file", None)
    if config_path and not getattr(pre, "output_config", False):
        parser.set_defaults(**read_config_file(config_path, parser))
    return parser.parse_args(argv)
