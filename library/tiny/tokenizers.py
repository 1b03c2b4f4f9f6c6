"""Tiny CLIP-style and T5-style tokenizers built offline with the `tokenizers` library.

They follow the real tokenizers' conventions where tests can notice them:
- CLIP: byte-level BPE with the "</w>" end-of-word suffix, lower-casing, `<|startoftext|>` and
  `<|endoftext|>` as the two LAST ids (the real 49406/49407), pad = eos = `<|endoftext|>`, so
  CLIPTextModel's legacy pooling (argmax of the ids = first eos) picks the right token.
- T5: unigram with the "▁" word marker, `<pad>`=0, `</s>`=1, `<unk>`=2, `</s>` appended to
  every sequence, and `<extra_id_N>` sentinels at the end in reverse order.
Each is written in the folder layout `save_pretrained` produces, so transformers'
CLIPTokenizer(Fast) / T5TokenizerFast load them, and into a tokenizer cache dir under the real
hub-id folder names, so `--tokenizer_cache_dir` finds them.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram

CLIP_TOKENIZER_ID = "openai/clip-vit-large-patch14"
T5_TOKENIZER_ID = "google/t5-v1_1-xxl"

# Words that get whole-word tokens; anything else falls back to smaller pieces.
_WORDS = (
    "a an the of on in with and at to is by for from photo picture painting drawing illustration "
    "cat cats dog dogs man woman girl boy person people tree trees forest river mountain city street "
    "house car sky sun moon night day red green blue black white yellow orange purple pink brown "
    "big small tall sitting standing running walking wearing holding hat dress shirt table chair "
    "style anime realistic detailed high quality portrait landscape beautiful old young"
).split()
_T5_EXTRA_IDS = 100


def cache_folder_name(hub_id: str) -> str:
    """The folder name sd-scripts uses for a hub id inside --tokenizer_cache_dir."""
    return hub_id.replace("/", "_")


# ---------------------------------------------------------------------------------------------
# CLIP

def _byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the others to 256+n."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _clip_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(
            Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
            behavior="removed", invert=True,
        ),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])


def _learned_merges() -> list[tuple[str, str]]:
    """Plain BPE learning on the word list until every word is one token: repeatedly merge the
    most frequent adjacent pair (ties broken alphabetically, so the result is deterministic).
    Hand-written per-word merges conflict ("t o</w>" from "to" would split "photo")."""
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in _WORDS]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in words:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for i, symbols in enumerate(words):
            merged, j = [], 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
                    merged.append(symbols[j] + symbols[j + 1])
                    j += 2
                else:
                    merged.append(symbols[j])
                    j += 1
            words[i] = merged


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    # Real CLIP order: 256 byte symbols, the same with "</w>", merge results, then the two specials.
    alphabet = list(_byte_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = _learned_merges()
    known = set(tokens)
    for a, b in merges:
        if a + b not in known:
            tokens.append(a + b)
            known.add(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer() -> Tokenizer:
    vocab, merges = _clip_vocab_and_merges()
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False, unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = _clip_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    tok.post_processor = processors.RobertaProcessing(
        ("<|endoftext|>", vocab["<|endoftext|>"]), ("<|startoftext|>", vocab["<|startoftext|>"]),
        trim_offsets=False, add_prefix_space=False,
    )
    return tok


def write_clip_tokenizer(folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab_and_merges()
    build_clip_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>"}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "errors": "replace", **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return folder


def clip_vocab_size() -> int:
    return len(_clip_vocab_and_merges()[0])


# ---------------------------------------------------------------------------------------------
# T5

def _t5_pieces() -> list[tuple[str, float]]:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {p for p, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    for i, word in enumerate(_WORDS):
        add("▁" + word, -4.0 - 0.01 * i)
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()"
    for c in chars:
        add(c, -8.0)
        add("▁" + c, -9.0)
    return pieces


def build_t5_tokenizer() -> Tokenizer:
    pieces = _t5_pieces()
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    # Sentinels follow the vocabulary in reverse order, as in the real T5 (<extra_id_0> is last).
    tok.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(_T5_EXTRA_IDS))])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return tok


def write_t5_tokenizer(folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_t5_tokenizer().save(str(folder / "tokenizer.json"))
    extra = [f"<extra_id_{i}>" for i in range(_T5_EXTRA_IDS)]
    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "additional_special_tokens": extra}
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": _T5_EXTRA_IDS, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return folder


def t5_vocab_size() -> int:
    return len(_t5_pieces()) + _T5_EXTRA_IDS


def write_tokenizer_cache(cache_dir: str | Path) -> Path:
    """Write both tiny tokenizers under their hub-id folder names; returns the cache dir."""
    cache_dir = Path(cache_dir)
    write_clip_tokenizer(cache_dir / cache_folder_name(CLIP_TOKENIZER_ID))
    write_t5_tokenizer(cache_dir / cache_folder_name(T5_TOKENIZER_ID))
    return cache_dir
