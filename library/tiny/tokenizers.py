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

import functools
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram

CLIP_TOKENIZER_ID = "openai/clip-vit-large-patch14"
T5_TOKENIZER_ID = "google/t5-v1_1-xxl"
CLIP_G_TOKENIZER_ID = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"

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


def write_clip_g_tokenizer(cache_dir: str | Path) -> Path:
    """The CLIP-G (OpenCLIP bigG) tokenizer folder in a cache dir: the same BPE as CLIP-L, saved
    with CLIP-L's pad token so that the loader's forcing of pad id 0 (SD3) is what tests see."""
    cache_dir = Path(cache_dir)
    write_clip_tokenizer(cache_dir / cache_folder_name(CLIP_G_TOKENIZER_ID))
    return cache_dir


# ---------------------------------------------------------------------------------------------
# Qwen3 (Anima's text encoder)

QWEN3_TOKENIZER_ID = "Qwen/Qwen3-0.6B"
# Qwen2/Qwen3 pre-tokenizer split (contractions, letters, single digits, punctuation, spaces).
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN3_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _bpe_merges(words: list[list[str]]) -> list[tuple[str, str]]:
    """Plain BPE learning until every word is one symbol (most frequent pair first, ties
    alphabetical, so the result is deterministic)."""
    words = [list(w) for w in words]
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


def _qwen3_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    # Byte-level symbols ("Ġ" is the space byte), then merge results, then the specials at the end
    # (the real vocabulary also keeps <|endoftext|> = 151643 after the BPE tokens).
    alphabet = list(_byte_to_unicode().values())
    space = _byte_to_unicode()[ord(" ")]
    merges = _bpe_merges([list(w) for w in _WORDS] + [[space, *w] for w in _WORDS])
    tokens, known = list(alphabet), set(alphabet)
    for a, b in merges:
        if a + b not in known:
            tokens.append(a + b)
            known.add(a + b)
    tokens += list(QWEN3_SPECIALS)
    return {t: i for i, t in enumerate(tokens)}, merges


def build_qwen3_tokenizer() -> Tokenizer:
    vocab, merges = _qwen3_vocab_and_merges()
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(QWEN3_SPECIALS))
    # Qwen adds no BOS/EOS to plain text.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def write_qwen3_tokenizer(folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _qwen3_vocab_and_merges()
    build_qwen3_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    config = {"tokenizer_class": "Qwen2Tokenizer", "model_max_length": 131072, "bos_token": None,
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
              "add_prefix_space": False, "errors": "replace"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def qwen3_vocab_size() -> int:
    return len(_qwen3_vocab_and_merges()[0])


def write_anima_tokenizer_cache(cache_dir: str | Path) -> Path:
    """Qwen3 and T5 tiny tokenizers under their hub-id folder names; returns the cache dir."""
    cache_dir = Path(cache_dir)
    write_qwen3_tokenizer(cache_dir / cache_folder_name(QWEN3_TOKENIZER_ID))
    write_t5_tokenizer(cache_dir / cache_folder_name(T5_TOKENIZER_ID))
    return cache_dir


# ---------------------------------------------------------------------------------------------
# Gemma (Lumina's Gemma2): a sentencepiece BPE model, written as the serialized proto that
# Comfy-Org's gemma_2_2b_fp16.safetensors embeds as `spiece_model`.

GEMMA_TOKENIZER_ID = "google/gemma-2-2b"
# Words of Lumina's recommended system prompts, so tiny encodings stay short.
_GEMMA_EXTRA_WORDS = (
    "You are assistant designed generate high-quality images based on user prompts. with highest degree "
    "image-text alignment textual <Prompt Start>"
).split()
_GEMMA_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()<>_"
# Gemma's fixed ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3; then a few user-defined specials.
_GEMMA_SPECIALS = (("<pad>", "CONTROL"), ("<eos>", "CONTROL"), ("<bos>", "CONTROL"), ("<unk>", "UNKNOWN"),
                   ("<mask>", "USER_DEFINED"), ("<start_of_turn>", "USER_DEFINED"), ("<end_of_turn>", "USER_DEFINED"))


@functools.lru_cache(maxsize=1)
def build_gemma_spiece_model() -> bytes:
    """A tiny Gemma-style sentencepiece model: BPE with byte fallback, no dummy prefix, spaces as
    "▁" at the start of the following word, <bos> 2 / <eos> 1 / <pad> 0 / <unk> 3."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb

    model = spm_pb.ModelProto()
    kinds = spm_pb.ModelProto.SentencePiece.Type

    def add(piece: str, score: float, kind: str) -> None:
        entry = model.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, getattr(kinds, kind)

    for piece, kind in _GEMMA_SPECIALS:
        add(piece, 0.0, kind)
    for byte in range(256):
        add(f"<0x{byte:02X}>", 0.0, "BYTE")
    words = list(dict.fromkeys([*_WORDS, *_GEMMA_EXTRA_WORDS]))
    merges = _bpe_merges([list(w) for w in words] + [["▁", *w] for w in words])
    seen: set[str] = set()
    for rank, (a, b) in enumerate(merges):  # sentencepiece BPE merges the best-scored piece first
        if a + b not in seen:
            seen.add(a + b)
            add(a + b, -float(rank), "NORMAL")
    for char in "▁" + _GEMMA_CHARS:
        if char not in seen:
            seen.add(char)
            add(char, -1e4, "NORMAL")

    trainer = model.trainer_spec
    trainer.model_type = spm_pb.TrainerSpec.BPE
    trainer.vocab_size = len(model.pieces)
    trainer.byte_fallback = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 3, 2, 1, 0
    trainer.unk_piece, trainer.bos_piece, trainer.eos_piece, trainer.pad_piece = "<unk>", "<bos>", "<eos>", "<pad>"
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = False
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return model.SerializeToString()


def gemma_vocab_size() -> int:
    from sentencepiece import SentencePieceProcessor

    return SentencePieceProcessor(model_proto=build_gemma_spiece_model()).get_piece_size()


def write_gemma_tokenizer(folder: str | Path) -> Path:
    """The tiny Gemma tokenizer in save_pretrained's layout (tokenizer.json + config), as in a
    --tokenizer_cache_dir folder for google/gemma-2-2b."""
    import tempfile

    from transformers import GemmaTokenizer

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(build_gemma_spiece_model())
        tokenizer = GemmaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False)
    tokenizer.save_pretrained(str(folder))
    return folder
