"""Lumina text encoding: Gemma's tokenizer from the embedded sentencepiece model (or a folder),
the system prompt, and Gemma2 hidden_states[-2] equal to calling transformers directly."""

from __future__ import annotations

import argparse

import pytest
import torch

from library.errors import ConfigError, ModelFileError
from library.lumina.gemma2 import load_gemma2, load_gemma2_tokenizer, tokenizer_from_spiece
from library.lumina.text import (RECOMMENDED_SYSTEM_PROMPTS, LuminaTextCacheEncoder, LuminaTextEncoding,
                                 LuminaTextOutputs, add_text_arguments, with_system_prompt)
from library.safetensors_io import load_file
from library.tiny.lumina import write_gemma2, write_gemma2_tokenizer_cache
from library.tiny.tokenizers import build_gemma_spiece_model

SYSTEM = RECOMMENDED_SYSTEM_PROMPTS[0]
TEXTS = ["a photo of a cat", "Zebra émoji 😀 at night", "", f"{SYSTEM} <Prompt Start> a red dog"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma")
    return {"gemma2": write_gemma2(out / "gemma_2_2b_fp16.safetensors", seed=4),
            "bare": write_gemma2(out / "bare.safetensors", seed=4, with_tokenizer=False),
            "cache": write_gemma2_tokenizer_cache(out / "tokenizers")}


@pytest.fixture(scope="module")
def encoding(paths):
    return LuminaTextEncoding.from_files(gemma2_path=paths["gemma2"], max_length=32, system_prompt=SYSTEM)


def test_embedded_tokenizer_matches_sentencepiece(paths):
    from sentencepiece import SentencePieceProcessor

    spm = SentencePieceProcessor(model_proto=build_gemma_spiece_model())
    tokenizer = load_gemma2_tokenizer(paths["gemma2"])
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    assert tokenizer.padding_side == "right"
    for text in TEXTS:
        assert tokenizer(text).input_ids == [2] + spm.encode(text), text
    batch = tokenizer(["a cat", "a photo of a cat"], padding="max_length", max_length=8, truncation=True,
                      pad_to_multiple_of=8, return_tensors="pt")
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1] * 6 + [0, 0]]
    assert batch.input_ids[0, 3:].eq(0).all()


def test_tokenizer_sources_and_their_order(tmp_path, paths):
    from_file = load_gemma2_tokenizer(paths["gemma2"])
    from_cache = load_gemma2_tokenizer(paths["bare"], cache_dir=paths["cache"], offline=True)
    local = load_gemma2_tokenizer(paths["gemma2"], local_path=paths["cache"] / "google_gemma-2-2b")
    for tokenizer in (from_cache, local):
        assert tokenizer.padding_side == "right"
        for text in TEXTS:
            assert tokenizer(text).input_ids == from_file(text).input_ids
    with pytest.raises(ModelFileError, match="google/gemma-2-2b.*--tokenizer_cache_dir"):
        load_gemma2_tokenizer(paths["bare"], cache_dir=tmp_path, offline=True)
    with pytest.raises(ModelFileError, match="cannot read the Gemma tokenizer"):
        tokenizer_from_spiece(b"not a sentencepiece model")


def test_system_prompt_is_joined_to_every_caption(encoding):
    assert with_system_prompt("a cat", "") == "a cat"
    assert with_system_prompt("a cat", SYSTEM) == f"{SYSTEM} <Prompt Start> a cat"
    tokenizer = encoding.tokenizer
    out = encoding.encode(["a cat", "a red dog"])
    system_ids = tokenizer(f"{SYSTEM} <Prompt Start>", add_special_tokens=False).input_ids
    for row, mask in zip(out.input_ids.tolist(), out.attention_mask.tolist()):
        assert row[0] == tokenizer.bos_token_id
        assert row[1:1 + len(system_ids)] == system_ids, "the system prompt opens every caption"
        assert tokenizer.decode(row[:sum(mask)], skip_special_tokens=True).startswith(SYSTEM + " <Prompt Start> a ")
    negative = encoding.encode(["a cat"], add_system_prompt=False)
    assert negative.attention_mask.sum() == 3 and negative.input_ids[0, :3].tolist() == tokenizer("a cat").input_ids


def test_encoding_equals_calling_transformers_directly(paths, encoding):
    from transformers import Gemma2Model

    from library.lumina.gemma2 import gemma2_config

    state = {k.removeprefix("model."): v for k, v in load_file(paths["gemma2"]).items() if k != "spiece_model"}
    loaded = load_gemma2(paths["gemma2"])
    direct = Gemma2Model(gemma2_config(**{k: getattr(loaded.config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim")})).eval()
    direct.load_state_dict(state, strict=True)

    captions = ["a photo of a cat", "a big red dog running in the forest with a hat"]
    with torch.no_grad():
        out = encoding.encode(captions)
        tokens = encoding.tokenizer([with_system_prompt(c, SYSTEM) for c in captions], padding="max_length",
                                    max_length=32, truncation=True, return_tensors="pt")
        expected = direct(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                          output_hidden_states=True).hidden_states[-2]
    assert torch.equal(out.input_ids, tokens.input_ids) and torch.equal(out.attention_mask, tokens.attention_mask)
    assert out.hidden_state.shape == (2, 32, 128)
    assert out.attention_mask[0].sum() < out.attention_mask[1].sum() <= 32
    assert (out.hidden_state - expected).abs().max() <= 1e-5
    assert out.hidden_state.std() > 0.1


def test_padding_length_does_not_change_the_real_tokens(paths, encoding):
    longer = LuminaTextEncoding(encoding.tokenizer, encoding.gemma2, max_length=64, system_prompt=SYSTEM)
    with torch.no_grad():
        a, b = encoding.encode(["a cat"]), longer.encode(["a cat"])
    n = int(a.attention_mask.sum())
    assert (a.hidden_state[0, :n] - b.hidden_state[0, :n]).abs().max() <= 1e-5


def test_cache_entries_identity_and_options(encoding):
    entries = LuminaTextCacheEncoder(encoding).encode(["a cat", "a dog"])
    assert [sorted(e) for e in entries] == [sorted(LuminaTextOutputs.CACHE_KEYS)] * 2
    assert entries[0]["hidden_state"].dtype == torch.float32 and entries[0]["hidden_state"].shape == (32, 128)
    stacked = {k: torch.stack([e[k] for e in entries]) for k in LuminaTextOutputs.CACHE_KEYS}
    assert LuminaTextOutputs.from_cache(stacked).attention_mask.shape == (2, 32)

    other_prompt = LuminaTextEncoding(encoding.tokenizer, encoding.gemma2, max_length=32, system_prompt="")
    other_length = LuminaTextEncoding(encoding.tokenizer, encoding.gemma2, max_length=40, system_prompt=SYSTEM)
    assert len({encoding.identity, other_prompt.identity, other_length.identity}) == 3
    assert encoding.weights_identity in encoding.identity

    for bad in (0, 100, 300):
        with pytest.raises(ConfigError, match=f"--gemma2_max_token_length {bad}: use a multiple of 8"):
            LuminaTextEncoding(encoding.tokenizer, encoding.gemma2, max_length=bad)

    parser = argparse.ArgumentParser()
    add_text_arguments(parser)
    args = parser.parse_args([])
    assert (args.system_prompt, args.gemma2_max_token_length) == ("", 256)
    help_text = " ".join(parser.format_help().split())
    assert "<Prompt Start>" in help_text and help_text.count("You are an assistant designed to generate") == 2
