"""Anima text step: Qwen3 from a single file or an HF folder equals transformers' own Qwen3Model,
the encoding conventions (max-length padding, zeroed padding, T5 ids for the adapter), the bundled
config, the cache entries and refusals."""

from __future__ import annotations

import pytest
import torch

from library.anima.text import (AnimaTextCacheEncoder, AnimaTextEncoding, AnimaTextOutputs, load_anima_t5_tokenizer,
                                load_qwen3, load_qwen3_tokenizer, qwen3_config)
from library.errors import ModelFileError
from library.text_encoders import bundled_config
from library.tiny import anima as tiny
from library.tiny import tokenizers as tiny_tok
from library.tiny.flux import write_t5xxl

CAPTIONS = ["a photo of a cat", "red dog sitting on a chair, anime style", ""]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("anima_text")
    qwen3_file = tiny.write_qwen3(d / "qwen3.safetensors", seed=4)
    cache = tiny_tok.write_anima_tokenizer_cache(d / "tokenizers")
    reference = tiny.random_qwen3(seed=4)
    return dict(dir=d, file=qwen3_file, cache=cache, reference=reference)


def test_bundled_config_is_qwen3_06b():
    c = bundled_config("qwen3_06b")
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"],
            c["head_dim"], c["intermediate_size"], c["rope_theta"], c["vocab_size"], c["tie_word_embeddings"]) == \
        (1024, 28, 16, 8, 128, 3072, 1000000, 151936, True)


def test_sizes_from_full_size_shapes_give_the_bundled_config(tmp_path):
    from transformers import Qwen3Model

    from library.text_encoders import _build_without_weights

    from transformers import Qwen3Config

    config = Qwen3Config(**{k: v for k, v in bundled_config("qwen3_06b").items()
                            if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        model = _build_without_weights(Qwen3Model, config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = qwen3_config(tmp_path / "qwen3.safetensors", shapes)
    for key in ("vocab_size", "hidden_size", "head_dim", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size"):
        assert getattr(got, key) == getattr(config, key), key


def _reference_states(reference, tokenizer, captions, length):
    tokens = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = reference(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return hidden, tokens.attention_mask


def test_single_file_qwen3_equals_transformers(setup):
    model = load_qwen3(setup["file"])
    ref = setup["reference"]
    assert type(model).__name__ == "Qwen3Model"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.state_dict().keys() == ref.state_dict().keys()
    ids = torch.tensor([[5, 9, 77, 301], [8, 1, 2, 3]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state,
                           ref(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_hf_folder_with_lm_head_loads_with_its_tokenizer(setup):
    from transformers import Qwen3ForCausalLM

    folder = setup["dir"] / "Qwen3-0.6B"
    causal = Qwen3ForCausalLM(setup["reference"].config)
    causal.model.load_state_dict(setup["reference"].state_dict())
    causal.save_pretrained(folder)
    tiny_tok.write_qwen3_tokenizer(folder)
    model = load_qwen3(folder, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert torch.equal(model.embed_tokens.weight.float(),
                       setup["reference"].embed_tokens.weight.to(torch.bfloat16).float())
    tokenizer = load_qwen3_tokenizer(folder)  # from the folder: no cache dir, no hub
    assert tokenizer("a photo").input_ids == tiny_tok.build_qwen3_tokenizer().encode("a photo").ids


def test_encoding_conventions(setup):
    enc = AnimaTextEncoding.from_files(setup["file"], tokenizer_cache_dir=setup["cache"], qwen3_max_length=12,
                                       t5_max_length=10)
    out = enc.encode(CAPTIONS)
    assert out.prompt_embeds.shape == (3, 12, tiny.TINY_QWEN3_WIDTH)
    assert out.t5_input_ids.shape == out.t5_attn_mask.shape == (3, 10)
    expected, mask = _reference_states(setup["reference"], enc.qwen3_tokenizer, CAPTIONS, 12)
    assert torch.equal(out.attn_mask, mask)
    real = mask.bool()
    assert torch.equal(out.prompt_embeds[real], expected[real])
    assert out.prompt_embeds[~real].abs().max() == 0  # padding zeroed (and the empty caption has no tokens)
    # Qwen3: no BOS, pad = <|endoftext|>; T5: </s> appended, pad 0. The empty caption is [1, 0, ...].
    pad = enc.qwen3_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert out.attn_mask[0].sum() == 5 and (enc.tokenize(CAPTIONS)[0][0, 5:] == pad).all()
    assert out.t5_input_ids[2].tolist() == [1] + [0] * 9 and out.t5_attn_mask[2].tolist() == [1] + [0] * 9
    t5_ids = enc.t5_tokenizer(CAPTIONS[0]).input_ids
    assert out.t5_input_ids[0, : len(t5_ids)].tolist() == t5_ids and t5_ids[-1] == 1
    assert out.attn_mask[2].sum() == 0


def test_truncation_to_the_max_lengths(setup):
    enc = AnimaTextEncoding.from_files(setup["file"], tokenizer_cache_dir=setup["cache"], qwen3_max_length=4,
                                       t5_max_length=3)
    out = enc.encode([CAPTIONS[1]])
    assert out.attn_mask.tolist() == [[1, 1, 1, 1]] and out.t5_attn_mask.tolist() == [[1, 1, 1]]


def test_cache_entries_and_identity(setup):
    enc = AnimaTextEncoding.from_files(setup["file"], tokenizer_cache_dir=setup["cache"], qwen3_max_length=8,
                                       t5_max_length=8)
    cache_encoder = AnimaTextCacheEncoder(enc)
    entries = cache_encoder.encode(CAPTIONS[:2])
    assert len(entries) == 2 and set(entries[0]) == set(AnimaTextOutputs.CACHE_KEYS)
    assert entries[0]["prompt_embeds"].dtype == torch.float32 and entries[0]["prompt_embeds"].shape == (8, 256)
    batch = {k: torch.stack([e[k] for e in entries]) for k in AnimaTextOutputs.CACHE_KEYS}
    restored = AnimaTextOutputs.from_cache(batch)
    assert torch.equal(restored.prompt_embeds, enc.encode(CAPTIONS[:2]).prompt_embeds)
    kwargs = restored.dit_kwargs(torch.bfloat16)
    assert kwargs["context"].dtype == torch.bfloat16 and set(kwargs) == {"context", "t5_input_ids", "t5_attn_mask",
                                                                         "qwen3_attn_mask"}
    other = AnimaTextEncoding(enc.qwen3_tokenizer, enc.t5_tokenizer, enc.qwen3, qwen3_max_length=8, t5_max_length=16,
                              weights_identity=enc.weights_identity)
    assert other.identity != enc.identity and "qwen3.safetensors" in enc.identity


def test_tokenizers_by_explicit_folder(setup):
    t5 = load_anima_t5_tokenizer(setup["cache"] / tiny_tok.cache_folder_name(tiny_tok.T5_TOKENIZER_ID))
    assert t5("a cat").input_ids[-1] == 1


def test_missing_qwen3_tokenizer_says_where_to_put_it(setup, tmp_path):
    with pytest.raises(ModelFileError, match=r"(?s)Qwen/Qwen3-0\.6B.*Qwen_Qwen3-0\.6B.*--tokenizer_cache_dir"):
        load_qwen3_tokenizer(setup["file"], cache_dir=tmp_path, offline=True)


def test_other_files_are_refused(setup):
    t5 = write_t5xxl(setup["dir"] / "t5.safetensors")
    with pytest.raises(ModelFileError, match=r"expected the Qwen3-0\.6B text encoder.*a T5 text encoder.*--qwen3"):
        load_qwen3(t5)
    with pytest.raises(ModelFileError, match="no such file or folder"):
        load_qwen3(setup["dir"] / "missing.safetensors")
