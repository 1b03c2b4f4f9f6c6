"""CLIP-L and T5-XXL from single files, tokenizer loading, and the FLUX text-encoding step."""

from __future__ import annotations

import pytest
import torch

from library import text_encoders as te
from library.errors import ModelFileError
from library.flux.text import FluxTextCacheEncoder, FluxTextEncoding, FluxTextOutputs
from library.safetensors_io import load_file, save_file_atomic
from library.tiny import tokenizers as tiny_tok
from library.tiny.flux import TINY_CLIP_WIDTH, TINY_T5_WIDTH, write_ae, write_clip_l, write_t5xxl

CAPTIONS = ["a photo of a cat", "A red dog sitting on the table, anime style!"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("te")
    return {
        "clip": write_clip_l(d / "clip_l.safetensors", seed=1),
        "t5": write_t5xxl(d / "t5xxl.safetensors", seed=2),
        "t5_fp8": write_t5xxl(d / "t5xxl_fp8_e4m3fn.safetensors", seed=2, dtype=torch.float8_e4m3fn),
        "ae": write_ae(d / "ae.safetensors"),
        "tokenizers": tiny_tok.write_tokenizer_cache(d / "tokenizers"),
    }


@pytest.fixture(scope="module")
def tokenizers(paths):
    return (te.load_clip_l_tokenizer(paths["tokenizers"], offline=True),
            te.load_t5xxl_tokenizer(paths["tokenizers"], offline=True))


@pytest.fixture(scope="module")
def encoders(paths):
    return te.load_clip_l(paths["clip"]), te.load_t5xxl(paths["t5"])


def _reference_clip(path):
    """transformers' CLIPTextModel built and filled directly, without our loader."""
    from transformers import CLIPTextModel

    model = CLIPTextModel(te.clip_l_config(vocab_size=tiny_tok.clip_vocab_size(), hidden_size=TINY_CLIP_WIDTH,
                                           num_attention_heads=2, intermediate_size=256, num_hidden_layers=2))
    state = load_file(path)
    state.pop("text_projection.weight")
    if not hasattr(model, "text_model"):  # transformers 5 has no text_model level
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_clip_l_loads_with_sizes_from_the_file(encoders, paths):
    clip, _ = encoders
    cfg = clip.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.intermediate_size) == (128, 2, 2, 256)
    assert cfg.vocab_size == tiny_tok.clip_vocab_size() and cfg.max_position_embeddings == 77
    assert cfg.hidden_act == "quick_gelu"
    # The file's keys (text_model.*) are the model's keys, so LoRA names come out as sd-scripts'.
    file_keys = set(load_file(paths["clip"])) - {"text_projection.weight"}
    assert set(clip.state_dict()) == file_keys
    assert "text_model.encoder.layers.0.self_attn.q_proj" in dict(clip.named_modules())


@torch.no_grad()
def test_clip_pooled_output_is_the_eos_state_after_final_norm(encoders, tokenizers, paths):
    clip, _ = encoders
    clip_tok, _ = tokenizers
    ids = clip_tok(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    out = clip(ids)
    eos_pos = (ids == clip_tok.eos_token_id).int().argmax(dim=1)
    assert torch.equal(out.pooler_output, out.last_hidden_state[torch.arange(2), eos_pos])
    reference = _reference_clip(paths["clip"])(ids)
    assert torch.allclose(out.pooler_output, reference.pooler_output, atol=1e-6)
    assert out.pooler_output.shape == (2, TINY_CLIP_WIDTH)


def test_t5_loads_with_sizes_from_the_file(encoders):
    _, t5 = encoders
    cfg = t5.config
    assert (cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.num_layers, cfg.d_ff) == (TINY_T5_WIDTH, 2, 64, 2, 256)
    assert cfg.feed_forward_proj == "gated-gelu" and cfg.relative_attention_num_buckets == 32
    assert t5.shared.weight.data_ptr() == t5.encoder.embed_tokens.weight.data_ptr()


@torch.no_grad()
def test_t5_mask_makes_outputs_independent_of_padding(encoders, tokenizers):
    _, t5 = encoders
    _, t5_tok = tokenizers
    short = t5_tok(CAPTIONS[:1], padding="max_length", max_length=16, return_tensors="pt")
    long = t5_tok(CAPTIONS[:1], padding="max_length", max_length=48, return_tensors="pt")
    n = int(short.attention_mask.sum())
    assert short.input_ids[0, n - 1] == 1, "T5 sequences end with </s> (id 1)"
    assert (short.input_ids[0, n:] == 0).all(), "and are padded with <pad> (id 0)"
    masked_short = t5(short.input_ids, attention_mask=short.attention_mask).last_hidden_state[:, :n]
    masked_long = t5(long.input_ids, attention_mask=long.attention_mask).last_hidden_state[:, :n]
    assert torch.allclose(masked_short, masked_long, atol=1e-5)
    unmasked_short = t5(short.input_ids).last_hidden_state[:, :n]
    unmasked_long = t5(long.input_ids).last_hidden_state[:, :n]
    assert (unmasked_short - unmasked_long).abs().max() > 1e-3, "without the mask, padding is attended"


@torch.no_grad()
def test_fp8_t5_upcast_or_kept(paths, encoders, tokenizers):
    upcast = te.load_t5xxl(paths["t5_fp8"])
    assert {p.dtype for p in upcast.parameters()} == {torch.bfloat16}
    kept = te.load_t5xxl(paths["t5_fp8"], fp8_storage=True)
    block = kept.encoder.block[0]
    assert block.layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    assert block.layer[1].DenseReluDense.wo.weight.dtype == torch.float8_e4m3fn
    assert block.layer[0].layer_norm.weight.dtype == torch.bfloat16
    assert kept.shared.weight.dtype == torch.bfloat16
    assert type(block.layer[1].DenseReluDense).__name__ == "T5DenseGatedActDense", "class names stay for LoRA"
    tokens = tokenizers[1](CAPTIONS, padding="max_length", max_length=24, return_tensors="pt")
    a = upcast(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    b = kept(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    assert b.dtype == torch.bfloat16 and torch.isfinite(b).all()
    assert torch.equal(a, b), "per-layer upcast computes exactly what the upcast model computes"
    full = encoders[1](tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    similarity = torch.nn.functional.cosine_similarity(a.float().flatten(), full.flatten(), dim=0)
    assert similarity > 0.95, "fp8 weights stay close to the fp32 model"


def test_fp16_t5_keeps_wo_in_fp32(paths):
    t5 = te.load_t5xxl(paths["t5"], dtype=torch.float16)
    assert t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert t5.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float16


def test_prefixed_text_encoder_files_load(tmp_path, paths):
    prefixed = tmp_path / "clip_prefixed.safetensors"
    state = load_file(paths["clip"])
    save_file_atomic({"text_encoders.clip_l.transformer." + k: v for k, v in state.items()}, prefixed)
    assert te.load_clip_l(prefixed).config.num_hidden_layers == 2
    both = tmp_path / "two_clips.safetensors"  # an SD3-style all-in-one file holds CLIP-L and CLIP-G
    save_file_atomic({**{"text_encoders.clip_l.transformer." + k: v for k, v in state.items()},
                      **{"text_encoders.clip_g.transformer." + k: v.clone() for k, v in state.items()}}, both)
    assert te.load_clip_l(both).config.num_hidden_layers == 2
    with pytest.raises(ModelFileError, match="found no tensors of a CLIP-L text encoder.*under the prefix"):
        te.load_clip_l(both, prefix="clip.")
    assert te.load_clip_l(both, prefix="text_encoders.clip_g.transformer.").config.hidden_size == TINY_CLIP_WIDTH
    prefixed = tmp_path / "t5_prefixed.safetensors"
    save_file_atomic({"text_encoders.t5xxl.transformer." + k: v for k, v in load_file(paths["t5"]).items()}, prefixed)
    assert te.load_t5xxl(prefixed).config.num_layers == 2


def test_wrong_files_are_refused(paths):
    with pytest.raises(ModelFileError, match="expected a CLIP-L.*looks like a T5 text encoder"):
        te.load_clip_l(paths["t5"])
    with pytest.raises(ModelFileError, match="expected a T5-XXL.*looks like a CLIP text encoder"):
        te.load_t5xxl(paths["clip"])
    with pytest.raises(ModelFileError, match="looks like an autoencoder"):
        te.load_t5xxl(paths["ae"])


# ---------------------------------------------------------------------------------------------
# Tokenizers.

def test_tokenizers_load_from_cache_dir_and_local_path(paths):
    from transformers import CLIPTokenizer

    clip_tok = te.load_clip_l_tokenizer(paths["tokenizers"], offline=True)
    assert clip_tok.pad_token_id == clip_tok.eos_token_id == tiny_tok.clip_vocab_size() - 1
    local = paths["tokenizers"] / "openai_clip-vit-large-patch14"
    assert isinstance(te.load_tokenizer("any/id", CLIPTokenizer, local_path=local), CLIPTokenizer)
    with pytest.raises(ModelFileError, match="does not exist"):
        te.load_tokenizer("any/id", CLIPTokenizer, local_path=local / "missing")


def test_a_folder_without_tokenizer_files_is_refused(tmp_path):
    from transformers import T5TokenizerFast

    (tmp_path / "empty").mkdir()
    # transformers 5 would silently build an empty-vocabulary tokenizer here.
    with pytest.raises(ModelFileError, match="unknown token"):
        te.load_tokenizer("any/id", T5TokenizerFast, local_path=tmp_path / "empty")


def test_missing_tokenizer_offline_says_how_to_fix(tmp_path):
    with pytest.raises(ModelFileError, match="tokenizer_cache_dir") as e:
        te.load_t5xxl_tokenizer(None, offline=True)
    assert "google/t5-v1_1-xxl" in str(e.value)
    with pytest.raises(ModelFileError, match="google_t5-v1_1-xxl"):
        te.load_t5xxl_tokenizer(tmp_path / "empty_cache", offline=True)


def test_hub_download_is_saved_into_the_cache_dir(tmp_path, paths):
    from transformers import T5TokenizerFast

    source = paths["tokenizers"] / "google_t5-v1_1-xxl"

    class FakeHub(T5TokenizerFast):
        requested = []

        @classmethod
        def from_pretrained(cls, name, *args, **kwargs):
            cls.requested.append(name)
            return T5TokenizerFast.from_pretrained(str(source) if name == te.T5_XXL_TOKENIZER_ID else name)

    cache = tmp_path / "cache"
    te.load_tokenizer(te.T5_XXL_TOKENIZER_ID, FakeHub, cache_dir=cache)
    assert FakeHub.requested == [te.T5_XXL_TOKENIZER_ID]
    assert (cache / "google_t5-v1_1-xxl" / "tokenizer.json").is_file()
    again = te.load_tokenizer(te.T5_XXL_TOKENIZER_ID, FakeHub, cache_dir=cache)
    assert FakeHub.requested[-1] != te.T5_XXL_TOKENIZER_ID, "the second load reads the cache folder"
    assert again("a cat").input_ids[-1] == 1


# ---------------------------------------------------------------------------------------------
# The FLUX text-encoding step.

@torch.no_grad()
@pytest.mark.parametrize("apply_mask", [False, True])
def test_flux_text_encoding_equals_direct_calls(encoders, tokenizers, apply_mask):
    clip, t5 = encoders
    clip_tok, t5_tok = tokenizers
    enc = FluxTextEncoding(clip_tok, t5_tok, clip, t5, t5_max_length=32, apply_t5_attn_mask=apply_mask)
    out = enc.encode(CAPTIONS)

    clip_ids = clip_tok(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    t5_tokens = t5_tok(CAPTIONS, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    expected_t5 = t5(t5_tokens.input_ids, attention_mask=t5_tokens.attention_mask if apply_mask else None)
    assert torch.equal(out.l_pooled, clip(clip_ids).pooler_output)
    assert torch.equal(out.t5_out, expected_t5.last_hidden_state)
    assert torch.equal(out.t5_attn_mask, t5_tokens.attention_mask)
    assert out.txt_ids.shape == (2, 32, 3) and not out.txt_ids.any()

    cond = out.conditioning(apply_mask)
    assert (cond.txt_mask is not None) == apply_mask and cond.vec is out.l_pooled


@torch.no_grad()
def test_chroma_text_encoding_has_no_clip(encoders, tokenizers):
    _, t5 = encoders
    enc = FluxTextEncoding(None, tokenizers[1], None, t5, t5_max_length=16, apply_t5_attn_mask=True)
    out = enc.encode(CAPTIONS)
    assert out.l_pooled.shape == (2, 768) and not out.l_pooled.any()
    assert "clip=no" in enc.identity


@torch.no_grad()
def test_cache_entries_and_identity(encoders, tokenizers, paths):
    clip, t5 = encoders
    weights = te.file_fingerprint(paths["t5"])

    def make(length, mask):
        return FluxTextEncoding(*tokenizers, clip, t5, t5_max_length=length, apply_t5_attn_mask=mask,
                                weights_identity=weights)

    enc = make(32, True)
    identities = {enc.identity, make(64, True).identity, make(32, False).identity}
    assert len(identities) == 3, "every setting that changes the outputs changes the identity"
    assert "t5xxl.safetensors" in enc.identity

    cache_encoder = FluxTextCacheEncoder(enc)
    entries = cache_encoder.encode(CAPTIONS)
    assert cache_encoder.identity == enc.identity and len(entries) == 2
    e = entries[1]
    assert set(e) == {"l_pooled", "t5_out", "txt_ids", "t5_attn_mask", "apply_t5_attn_mask"}
    assert e["t5_out"].shape == (32, TINY_T5_WIDTH) and e["t5_out"].dtype == torch.float32
    assert e["l_pooled"].shape == (TINY_CLIP_WIDTH,) and e["txt_ids"].shape == (32, 3)
    assert bool(e["apply_t5_attn_mask"]) is True and e["t5_out"].device.type == "cpu"

    stacked = {k: torch.stack([x[k] for x in entries]) for k in FluxTextOutputs.CACHE_KEYS}
    restored = FluxTextOutputs.from_cache(stacked)
    assert torch.equal(restored.t5_out, enc.encode(CAPTIONS).t5_out)


def test_fingerprint_tracks_content(tmp_path, paths):
    a = write_t5xxl(tmp_path / "t5xxl.safetensors", seed=5)
    fp = te.file_fingerprint(a)
    write_t5xxl(tmp_path / "t5xxl.safetensors", seed=6)
    assert te.file_fingerprint(a) != fp
    assert te.file_fingerprint(paths["t5"]).startswith("t5xxl.safetensors:")


def test_from_files_builds_the_whole_step(paths):
    enc = FluxTextEncoding.from_files(clip_l_path=paths["clip"], t5xxl_path=paths["t5"], t5_max_length=16,
                                      apply_t5_attn_mask=False, tokenizer_cache_dir=paths["tokenizers"])
    with torch.no_grad():
        out = enc.encode(["a cat"])
    assert out.l_pooled.shape == (1, TINY_CLIP_WIDTH) and out.t5_out.shape == (1, 16, TINY_T5_WIDTH)
    assert "clip_l.safetensors" in enc.identity and "t5xxl.safetensors" in enc.identity
