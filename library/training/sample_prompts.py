"""Sample-prompt files (.txt, .toml, .json) as sd-scripts reads them.

A `.txt` line is `prompt --w 512 --h 512 --d 42 --s 20 --l 4.0 --g 3.5 --n negative ...`.
Empty lines and lines whose FIRST character is '#' are skipped (an indented '#' is a prompt).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import toml

from library.errors import ConfigError


@dataclass
class SamplePrompt:
    index: int
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    sample_steps: int | None = None
    scale: float | None = None            # --l: classifier-free guidance scale
    guidance_scale: float | None = None   # --g: FLUX embedded guidance
    sample_sampler: str | None = None     # --ss (SD only)
    controlnet_image: str | None = None   # --cn
    cfg_trunc_ratio: float | None = None  # --ctr (Lumina)
    renorm_cfg: float | None = None       # --rcfg (Lumina)
    flow_shift: float | None = None       # --fs (Anima)
    extra: dict = field(default_factory=dict)


# option letter -> (field, converter); sd-scripts matches the letters case-insensitively.
_OPTIONS = {
    "w": ("width", int), "h": ("height", int), "d": ("seed", int), "s": ("sample_steps", int),
    "l": ("scale", float), "g": ("guidance_scale", float), "n": ("negative_prompt", str),
    "ss": ("sample_sampler", str), "cn": ("controlnet_image", str), "ctr": ("cfg_trunc_ratio", float),
    "rcfg": ("renorm_cfg", float), "fs": ("flow_shift", float),
}
_DICT_KEYS = {f for f, _ in _OPTIONS.values()} | {"prompt"}


def parse_prompt_line(line: str, index: int, source: str = "") -> SamplePrompt:
    pieces = line.split(" --")
    sp = SamplePrompt(index=index, prompt=pieces[0].strip())
    for piece in pieces[1:]:
        m = re.match(r"^([a-zA-Z]+)\s*(.*)$", piece.strip(), re.DOTALL)
        if not m:
            continue
        letter, value = m.group(1).lower(), m.group(2).strip()
        if letter not in _OPTIONS:
            raise ConfigError(f"{source}prompt {index}: unknown option '--{letter}' in {line!r}. "
                              f"Known: {', '.join('--' + k for k in _OPTIONS)}")
        name, conv = _OPTIONS[letter]
        try:
            setattr(sp, name, conv(value) if conv is not str else value)
        except ValueError:
            raise ConfigError(f"{source}prompt {index}: '--{letter} {value}' is not a valid {conv.__name__}") from None
    if sp.sample_steps is not None:
        sp.sample_steps = min(max(sp.sample_steps, 1), 1000)
    return sp


def _from_dict(d: dict, index: int, source: str) -> SamplePrompt:
    unknown = set(d) - _DICT_KEYS
    if unknown:
        raise ConfigError(f"{source}prompt {index}: unknown key(s) {sorted(unknown)}. Known: {sorted(_DICT_KEYS)}")
    if "prompt" not in d:
        raise ConfigError(f"{source}prompt {index}: has no 'prompt'")
    sp = SamplePrompt(index=index, prompt=str(d["prompt"]))
    for name, conv in _OPTIONS.values():
        if d.get(name) is not None:
            setattr(sp, name, conv(d[name]))
    if sp.sample_steps is not None:
        sp.sample_steps = min(max(sp.sample_steps, 1), 1000)
    return sp


def load_sample_prompts(path: str) -> list[SamplePrompt]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--sample_prompts {path}: file not found.")
    src = f"{p.name}: "
    suffix = p.suffix.lower()
    if suffix == ".txt":
        lines = [ln.rstrip("\r\n") for ln in p.read_text(encoding="utf-8").splitlines()]
        lines = [ln for ln in lines if ln.strip() and not ln.startswith("#")]
        return [parse_prompt_line(ln, i, src) for i, ln in enumerate(lines)]
    if suffix == ".toml":
        data = toml.load(p)
        common = {k: v for k, v in data.get("prompt", {}).items() if k != "subset"}
        subsets = data.get("prompt", {}).get("subset", [])
        return [_from_dict({**common, **s}, i, src) for i, s in enumerate(subsets)]
    if suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ConfigError(f"{src}a JSON prompt file holds a list of prompts (strings or objects)")
        return [parse_prompt_line(d, i, src) if isinstance(d, str) else _from_dict(d, i, src)
                for i, d in enumerate(data)]
    raise ConfigError(f"--sample_prompts {path}: use a .txt, .toml or .json file")
