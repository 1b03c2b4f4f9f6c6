"""Caption files and per-sample caption processing.

`process_caption` applies the sd-scripts order (FORMATS 5.2): prefix/suffix, caption dropout,
wildcards / multi-line choice, keep-tokens split + token warm-up + shuffle + tag dropout,
secondary separator, replacements. All randomness comes from the `random.Random` passed in, which
the caller seeds from (seed, epoch, sample), so a run is reproducible and resumable.
"""

from __future__ import annotations

import math
import os
import random
import re
from dataclasses import dataclass, replace
from typing import Iterable

from library.errors import DatasetError

_WILDCARD = re.compile(r"\{([^}]+)\}")


@dataclass(frozen=True)
class CaptionOptions:
    prefix: str | None = None
    suffix: str | None = None
    dropout_rate: float = 0.0
    dropout_every_n_epochs: int = 0
    enable_wildcard: bool = False
    shuffle: bool = False
    separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: int = 0  # absolute steps (fractions resolved by the caller)
    replacements: tuple[tuple[str, str], ...] = ()

    @property
    def splits_tags(self) -> bool:
        """Whether the caption is split into tags at all (step 4)."""
        return self.shuffle or self.token_warmup_step > 0 or self.tag_dropout_rate > 0

    @property
    def may_drop(self) -> bool:
        return self.dropout_rate > 0 or self.dropout_every_n_epochs > 0


def resolve_token_warmup_step(value: float, max_train_steps: int | None) -> int:
    """token_warmup_step < 1 is a fraction of max_train_steps (sd-scripts); >= 1 is a step count."""
    if value <= 0:
        return 0
    if value < 1:
        if max_train_steps is None:
            raise DatasetError(
                f"token_warmup_step = {value} is a fraction of the training steps, but the number of "
                "training steps is not known here; give token_warmup_step as a step count instead"
            )
        return math.floor(value * max_train_steps)
    return int(value)


# ------------------------------------------------------------------------------------ processing

def _add_prefix_suffix(caption: str, opts: CaptionOptions) -> str:
    # Applied to every line so a multi-line caption keeps them whichever line is chosen.
    if not opts.prefix and not opts.suffix:
        return caption
    lines = caption.split("\n")
    if opts.prefix:
        lines = [opts.prefix + " " + line for line in lines]
    if opts.suffix:
        lines = [line + " " + opts.suffix for line in lines]
    return "\n".join(lines)


def _brace_markers(caption: str) -> tuple[str, str]:
    """Placeholders for the escaped braces `{{` / `}}`, chosen so they do not occur in the caption."""
    open_m, close_m = "\u2985", "\u2986"
    while open_m in caption or close_m in caption:
        open_m += "\u2985"
        close_m += "\u2986"
    return open_m, close_m


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    lines = caption.split("\n")
    if len(lines) > 1:
        caption = rng.choice(lines)
    open_m, close_m = _brace_markers(caption)
    caption = caption.replace("{{", open_m).replace("}}", close_m)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_m, "{").replace(close_m, "}")


def _split_tags(text: str, sep: str) -> list[str]:
    return [t.strip() for t in text.split(sep) if t.strip()]


@dataclass
class _TagParts:
    fixed: list[str]
    flexible: list[str]
    fixed_suffix: list[str]


def _split_fixed_flexible(caption: str, opts: CaptionOptions) -> _TagParts:
    sep = opts.separator
    kts = opts.keep_tokens_separator
    if kts and kts in caption:
        fixed_part, flex_part = caption.split(kts, 1)
        suffix: list[str] = []
        if kts in flex_part:
            flex_part, suffix_part = flex_part.split(kts, 1)
            suffix = _split_tags(suffix_part, sep)
        return _TagParts(_split_tags(fixed_part, sep), _split_tags(flex_part, sep), suffix)
    tags = _split_tags(caption, sep)
    k = opts.keep_tokens
    return _TagParts(tags[:k], tags[k:], [])


def _warmup_length(n_flexible: int, opts: CaptionOptions, step: int) -> int:
    if opts.token_warmup_step <= 0 or step >= opts.token_warmup_step:
        return n_flexible
    n = math.floor(step * ((n_flexible - opts.token_warmup_min) / opts.token_warmup_step)) + opts.token_warmup_min
    return max(0, n)


def process_caption(caption: str, opts: CaptionOptions, rng: random.Random, *, epoch: int, step: int = 0) -> str:
    """One sample's caption for this epoch/step (FORMATS 5.2 order)."""
    caption = _add_prefix_suffix(caption, opts)

    dropped = opts.dropout_rate > 0 and rng.random() < opts.dropout_rate
    if opts.dropout_every_n_epochs > 0 and epoch % opts.dropout_every_n_epochs == 0:
        dropped = True
    if dropped:
        return ""

    if opts.enable_wildcard:
        caption = _expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    # The keep_tokens_separator is dataset markup, never caption text: split on it even when no
    # shuffling happens so it does not reach the text encoder.
    has_kts = bool(opts.keep_tokens_separator) and opts.keep_tokens_separator in caption
    if opts.splits_tags or has_kts:
        parts = _split_fixed_flexible(caption, opts)
        flexible = parts.flexible[:_warmup_length(len(parts.flexible), opts, step)]
        if opts.shuffle:
            rng.shuffle(flexible)
        if opts.tag_dropout_rate > 0:
            flexible = [t for t in flexible if rng.random() >= opts.tag_dropout_rate]
        caption = ", ".join(parts.fixed + flexible + parts.fixed_suffix)

    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.separator)

    for old, new in opts.replacements:
        caption = new if old == "" else caption.replace(old, new)
    return caption


def wildcard_choice_count(caption: str, opts: CaptionOptions) -> int:
    """How many different texts the wildcard step can produce (1 means deterministic)."""
    if not opts.enable_wildcard:
        return 1
    lines = _add_prefix_suffix(caption, opts).split("\n")
    total = len(set(lines))
    for line in set(lines):
        open_m, close_m = _brace_markers(line)
        escaped = line.replace("{{", open_m).replace("}}", close_m)
        for m in _WILDCARD.finditer(escaped):
            total *= len(set(m.group(1).split("|")))
    return total


def fixed_caption(caption: str, opts: CaptionOptions) -> str | None:
    """The one caption this template always produces when not dropped, or None if it varies
    (shuffle, warm-up, tag dropout, or several wildcard choices)."""
    if opts.splits_tags or wildcard_choice_count(caption, opts) > 1:
        return None
    no_drop = replace(opts, dropout_rate=0.0, dropout_every_n_epochs=0)
    return process_caption(caption, no_drop, random.Random(0), epoch=1, step=0)


# ------------------------------------------------------------------------------------ caption files

@dataclass(frozen=True)
class CaptionFile:
    """What was found for one image: the text (None when no caption file exists) and its path."""

    text: str | None
    path: str | None


def caption_candidates(image_path: str, extension: str) -> list[str]:
    """`<stem><ext>`, then the stem without its last 4 `_` parts (face-crop tool outputs)."""
    base = os.path.splitext(image_path)[0]
    out = [base + extension]
    head, name = os.path.split(base)
    tokens = name.split("_")
    if len(tokens) >= 5:
        out.append(os.path.join(head, "_".join(tokens[:-4])) + extension)
    return out


def read_caption_file(image_path: str, extension: str, enable_wildcard: bool) -> CaptionFile:
    """Read an image's caption (UTF-8, BOM tolerated). With wildcards the non-empty lines are
    kept (joined by newlines); otherwise only the first line."""
    for path in caption_candidates(image_path, extension):
        if not os.path.isfile(path):
            continue
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DatasetError(f"caption file {path} is not UTF-8 ({e.reason} at byte {e.start}); "
                               "re-save it as UTF-8") from e
        except OSError as e:
            raise DatasetError(f"caption file {path} cannot be read ({e.strerror})") from e
        lines = text.splitlines()
        if enable_wildcard:
            caption = "\n".join(line.strip() for line in lines if line.strip())
        else:
            caption = lines[0].strip() if lines else ""
        return CaptionFile(caption, path)
    return CaptionFile(None, None)


def count_tags(captions: Iterable[str]) -> dict[str, int]:
    """Tag frequency as sd-scripts records it in ss_tag_frequency: split on ",", strip, lower-case."""
    freq: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                freq[tag] = freq.get(tag, 0) + 1
    return freq
