"""A1111-style prompt weighting for SD 1.x / 2.x (sample prompts, inference, --weighted_captions).

Syntax, as AUTOMATIC1111's webui parses it (and sd-scripts' long-prompt pipeline, which copies it):

- `(text)` multiplies the weight of `text` by 1.1; `((text))` by 1.1² = 1.21, and so on.
- `[text]` divides it by 1.1.
- `(text:1.5)` sets the factor of that parenthesis to 1.5 instead of 1.1 (nested factors still
  multiply: `((a:2))` = 2.2). The number is `[+-]?[0-9.]+` written right before the `)`.
  A number that does not parse as a float (`(a:1.2.3)`) is kept as literal text `:1.2.3)` and
  the parenthesis stays open (A1111 raises an error there).
- `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are the literal characters. A backslash before anything
  else is dropped, as in A1111.
- Unbalanced brackets are tolerated as A1111 does: a `)` or `]` with nothing of its kind open is
  literal text; a `(` or `[` never closed applies its factor up to the end of the prompt;
  `:1.5)` with no `(` open is literal text; `[a:1.5]` is `a:1.5` divided by 1.1 (explicit weights
  belong to parentheses only). A lone `:` is literal text. `BREAK` is not a keyword here.
- Neighbouring pieces of equal weight are joined; an empty prompt is one piece ("", 1.0).

Tokens: each piece is tokenized on its own (no start/end tokens) and all its tokens get its
weight; the pieces are concatenated and cut to 75·chunks tokens, then laid out as one row of
75·chunks + 2 ids (start, tokens, end, padding), exactly as the tokenizer lays out a whole
caption, so SDTextEncoding chunks it with its usual rules. Start, end and padding weigh 1.0.
A prompt without any weighting syntax gives the same ids as tokenizing it whole.
"""

from __future__ import annotations

import re

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1

_PIECE = re.compile(
    r"\\[()\[\]\\]"            # an escaped bracket or backslash
    r"|\\"                     # any other backslash (dropped)
    r"|\("
    r"|\["
    r"|:(?P<weight>[+-]?[.\d]+)\)"  # an explicit weight closing a parenthesis
    r"|\)"
    r"|\]"
    r"|[^\\()\[\]:]+"          # plain text
    r"|:"
)


def parse_prompt_weights(prompt: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) pieces; see the module docstring for the syntax."""
    pieces: list[list] = []       # [text, weight], weights multiplied in place as brackets close
    open_round: list[int] = []    # index in `pieces` where each still-open bracket started
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _PIECE.finditer(prompt):
        token = m.group(0)
        weight = m.group("weight")
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            try:
                factor = float(weight)
            except ValueError:
                pieces.append([token, 1.0])
                continue
            scale_from(open_round.pop(), factor)
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_FACTOR)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_FACTOR)
        else:
            pieces.append([token, 1.0])

    for start in open_round:
        scale_from(start, ROUND_FACTOR)
    for start in open_square:
        scale_from(start, SQUARE_FACTOR)

    merged: list[tuple[str, float]] = []
    for text, w in pieces:
        if not text:
            continue
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + text, w)
        else:
            merged.append((text, w))
    return merged or [("", 1.0)]


def weighted_tokens(tokenizer, prompt: str, max_tokens: int) -> tuple[list[int], list[float]]:
    """Token ids (no start/end) and their weights, cut to `max_tokens`."""
    ids: list[int] = []
    weights: list[float] = []
    for text, w in parse_prompt_weights(prompt):
        if len(ids) >= max_tokens:
            break
        piece = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_tokens).input_ids
        ids += piece
        weights += [w] * len(piece)
    return ids[:max_tokens], weights[:max_tokens]


def weighted_row(tokenizer, prompt: str, total: int) -> tuple[list[int], list[float]]:
    """One row of `total` ids laid out as the tokenizer pads a whole caption to `total`
    (start, up to total−2 tokens, end, padding), and the weight of every position."""
    ids, weights = weighted_tokens(tokenizer, prompt, total - 2)
    rest = total - 2 - len(ids)
    row = [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * rest
    row_weights = [1.0] + weights + [1.0] * (rest + 1)
    return row, row_weights


def has_weights(prompt: str) -> bool:
    return any(w != 1.0 for _, w in parse_prompt_weights(prompt))


__all__ = ["ROUND_FACTOR", "SQUARE_FACTOR", "parse_prompt_weights", "weighted_tokens", "weighted_row", "has_weights"]
