"""SD3 text encoding: CLIP-L / CLIP-G with projection from single files, the CLIP-G tokenizer,
and the encoding step against transformers called directly (penultimate states, projected
pooled outputs, padding and joining with T5, masks, per-encoder dropout, caching)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from library import text_encoders as te
from library.errors import ModelFileError
from library.safetensors_io import load_file, save_file_atomic
from library.sd3.text import SD3TextCacheEncoder, SD3TextEncoding, SD3TextOutputs, TextDropout
from library.tiny import tokenizers as tiny_tok
from library.tiny.sd3 import (TINY_CLIP_G_WIDTH, TINY_CLIP_L_WIDTH, TINY_T5_WIDTH, write_clip_g, write_clip_l,
                              write_sd3_checkpoint, write_t5xxl, write_tokenizer_cache)

CAPTIONS = ["a photo of a cat", "A red dog sitting on the table, anime style!", "tree"]
T5_LENGTH = 12
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd3_te")
    return {
        "clip_l": write_clip_l(d / "clip_l.safetensors", seed=1),
        "clip_g": write_clip_g(d / "clip_g.safetensors", seed=2),
        "t5": write_t5xxl(d / "t5xxl.safetensors", seed=3),
        "tokenizers": write_tokenizer_cache(d / "tokenizers"),
        "checkpoint": write_sd3_checkpoint(d / "sd3.safetensors", "medium", seed=0, include_vae=False),
    }


@pytest.fixture(scope="module")
def encoding(paths):
    return SD3TextEncoding.from_files(checkpoint=paths["checkpoint"], clip_l_path=paths["clip_l"],
                                      clip_g_path=paths["clip_g"], t5xxl_path=paths["t5"], t5_max_length=T5_LENGTH,
                                      tokenizer_cache_dir=paths["tokenizers"])


def _reference_clip(path, config_fn, width):
    """transformers' CLIPTextModelWithProjection built and filled directly, without our loader."""
    from transformers import CLIPTextModelWithProjection

    config = config_fn(vocab_size=tiny_tok.clip_vocab_size(), hidden_size=width, num_attention_heads=width // 64,
                       intermediate_size=load_file(path)["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                       num_hidden_layers=2, projection_dim=width)
    model = CLIPTextModelWithProjection(config)
    model.load_state_dict(load_file(path), strict=True)
    return model.eval()


def _reference_t5(path):
    from transformers import T5EncoderModel

    state = load_file(path)
    config = te.t5xxl_config(vocab_size=state["shared.weight"].shape[0], d_model=TINY_T5_WIDTH, num_heads=6, d_kv=64,
                             d_ff=state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
                             num_layers=2, num_decoder_layers=2)
    model = T5EncoderModel(config)
    model.load_state_dict(state | {"encoder.embed_tokens.weight": state["shared.weight"]}, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Loaders and tokenizers.

def test_clip_g_loads_with_projection_and_sizes_from_the_file(paths):
    clip_g = te.load_clip_g(paths["clip_g"])
    cfg = clip_g.config
    assert type(clip_g).__name__ == "CLIPTextModelWithProjection"
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.projection_dim) == (192, 3, 2, 192)
    assert cfg.hidden_act == "gelu"
    assert set(clip_g.state_dict()) == set(load_file(paths["clip_g"]))
    assert "text_model.encoder.layers.0.self_attn.q_proj" in dict(clip_g.named_modules())
    full = te.clip_g_config()
    assert (full.hidden_size, full.num_hidden_layers, full.num_attention_heads, full.projection_dim,
            full.intermediate_size, full.hidden_act) == (1280, 32, 20, 1280, 5120, "gelu")


def test_clip_l_projection_from_the_file_or_identity(paths, tmp_path):
    clip_l = te.load_clip_l_with_projection(paths["clip_l"])
    assert torch.equal(clip_l.text_projection.weight, load_file(paths["clip_l"])["text_projection.weight"])
    without = {k: v for k, v in load_file(paths["clip_l"]).items() if k != "text_projection.weight"}
    save_file_atomic(without, tmp_path / "clip_l_no_projection.safetensors")
    identity = te.load_clip_l_with_projection(tmp_path / "clip_l_no_projection.safetensors")
    assert torch.equal(identity.text_projection.weight, torch.eye(TINY_CLIP_L_WIDTH))
    save_file_atomic({k: v for k, v in load_file(paths["clip_g"]).items() if k != "text_projection.weight"},
                     tmp_path / "clip_g_no_projection.safetensors")
    with pytest.raises(ModelFileError, match="no text_projection.weight"):
        te.load_clip_g(tmp_path / "clip_g_no_projection.safetensors")
    with pytest.raises(ModelFileError, match="expected a CLIP-G text encoder .* looks like a T5 text encoder"):
        te.load_clip_g(paths["t5"])


def test_clip_g_tokenizer_pads_with_id_0(paths):
    tok = te.load_clip_g_tokenizer(paths["tokenizers"], offline=True)
    assert tok.pad_token_id == 0 and tok.convert_ids_to_tokens(0) == "!"
    ids = tok(["a cat"], padding="max_length", max_length=10, return_tensors="pt").input_ids[0].tolist()
    assert ids[-1] == 0 and ids.count(tok.eos_token_id) == 1
    clip_l_ids = te.load_clip_l_tokenizer(paths["tokenizers"], offline=True)(
        ["a cat"], padding="max_length", max_length=10).input_ids[0]
    assert clip_l_ids[:4] == ids[:4] and clip_l_ids[-1] == tok.eos_token_id


# ---------------------------------------------------------------------------------------------
# The encoding step.

@torch.no_grad()
def test_encoding_matches_transformers_called_directly(encoding, paths):
    out = encoding.encode(CAPTIONS)
    ref_l = _reference_clip(paths["clip_l"], te.clip_l_config, TINY_CLIP_L_WIDTH)
    ref_g = _reference_clip(paths["clip_g"], te.clip_g_config, TINY_CLIP_G_WIDTH)
    ref_t5 = _reference_t5(paths["t5"])
    l_ids = encoding.clip_l_tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True,
                                      return_tensors="pt").input_ids
    g_ids = encoding.clip_g_tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True,
                                      return_tensors="pt").input_ids
    assert (g_ids == 0).any() and not torch.equal(l_ids, g_ids), "CLIP-G pads with id 0, CLIP-L with EOS"
    t5_tokens = encoding.t5_tokenizer(CAPTIONS, padding="max_length", max_length=T5_LENGTH, truncation=True,
                                      return_tensors="pt")
    l = ref_l(l_ids, output_hidden_states=True)
    g = ref_g(g_ids, output_hidden_states=True)
    t5 = ref_t5(t5_tokens.input_ids).last_hidden_state

    assert torch.allclose(out.lg_out, torch.cat((l.hidden_states[-2], g.hidden_states[-2]), -1), atol=1e-5)
    assert torch.allclose(out.lg_pooled, torch.cat((l.text_embeds, g.text_embeds), -1), atol=1e-5)
    assert torch.allclose(out.t5_out, t5, atol=1e-5)
    assert torch.equal(out.t5_attn_mask, t5_tokens.attention_mask)
    assert out.lg_out.shape == (3, 77, TINY_CLIP_L_WIDTH + TINY_CLIP_G_WIDTH)

    cond = out.conditioning()
    lg_width = TINY_CLIP_L_WIDTH + TINY_CLIP_G_WIDTH
    assert cond.context.shape == (3, 77 + T5_LENGTH, TINY_T5_WIDTH)
    assert torch.equal(cond.context[:, :77, :lg_width], out.lg_out)
    assert not cond.context[:, :77, lg_width:].any(), "CLIP states are zero-padded to the T5 width"
    assert torch.equal(cond.context[:, 77:], out.t5_out) and torch.equal(cond.y, out.lg_pooled)
    # The penultimate state is not the last one (no final layer norm applied).
    assert not torch.allclose(out.lg_out[..., :TINY_CLIP_L_WIDTH], l.last_hidden_state, atol=1e-3)


@torch.no_grad()
def test_attention_masks_are_passed_to_the_encoders_only(paths, encoding):
    masked = SD3TextEncoding(encoding.clip_l_tokenizer, encoding.clip_g_tokenizer, encoding.t5_tokenizer,
                             encoding.clip_l, encoding.clip_g, encoding.t5, t5_max_length=T5_LENGTH,
                             apply_lg_attn_mask=True, apply_t5_attn_mask=True)
    out = masked.encode(CAPTIONS)
    plain = encoding.encode(CAPTIONS)
    ref_g = _reference_clip(paths["clip_g"], te.clip_g_config, TINY_CLIP_G_WIDTH)
    g_tokens = masked.clip_g_tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True,
                                       return_tensors="pt")
    g = ref_g(g_tokens.input_ids, attention_mask=g_tokens.attention_mask, output_hidden_states=True)
    assert torch.allclose(out.lg_out[..., TINY_CLIP_L_WIDTH:], g.hidden_states[-2], atol=1e-5)
    t5_tokens = masked.t5_tokenizer(CAPTIONS, padding="max_length", max_length=T5_LENGTH, return_tensors="pt")
    t5 = _reference_t5(paths["t5"])(t5_tokens.input_ids, attention_mask=t5_tokens.attention_mask).last_hidden_state
    assert torch.allclose(out.t5_out, t5, atol=1e-5)
    assert (out.t5_out - plain.t5_out).abs().max() > 1e-4, "the T5 mask changes the states of padded captions"
    assert masked.identity != encoding.identity


@torch.no_grad()
def test_dropout_while_encoding_zeroes_that_encoder_only(encoding):
    plain = encoding.encode(CAPTIONS)
    encoding_l = SD3TextEncoding(encoding.clip_l_tokenizer, encoding.clip_g_tokenizer, encoding.t5_tokenizer,
                                 encoding.clip_l, encoding.clip_g, encoding.t5, t5_max_length=T5_LENGTH,
                                 dropout=TextDropout(clip_l=1.0, t5=0.5))
    assert torch.allclose(encoding_l.encode(CAPTIONS).lg_out, plain.lg_out), "no dropout unless enabled"
    out = encoding_l.encode(CAPTIONS, enable_dropout=True, generator=torch.Generator().manual_seed(1))
    l = TINY_CLIP_L_WIDTH
    assert not out.lg_out[..., :l].any() and not out.lg_pooled[:, :l].any() and not out.clip_l_attn_mask.any()
    assert torch.allclose(out.lg_out[..., l:], plain.lg_out[..., l:], atol=1e-6)
    assert torch.equal(out.clip_g_attn_mask, plain.clip_g_attn_mask)
    dropped = ~out.t5_attn_mask.bool().any(dim=1)
    assert 0 < int(dropped.sum()) < 3, "seeded: some T5 samples dropped, some kept"
    assert not out.t5_out[dropped].any()
    assert torch.allclose(out.t5_out[~dropped], plain.t5_out[~dropped], atol=1e-5), "kept samples run unchanged"


def test_dropout_on_cached_outputs():
    out = SD3TextOutputs(lg_out=torch.ones(4, 77, 10), t5_out=torch.ones(4, 6, 16), lg_pooled=torch.ones(4, 9),
                         clip_l_attn_mask=torch.ones(4, 77), clip_g_attn_mask=torch.ones(4, 77),
                         t5_attn_mask=torch.ones(4, 6))
    dropped = TextDropout(clip_g=1.0).apply(out, clip_l_width=4, clip_l_pooled_width=3)
    assert dropped.lg_out[..., :4].all() and not dropped.lg_out[..., 4:].any()
    assert dropped.lg_pooled[:, :3].all() and not dropped.lg_pooled[:, 3:].any()
    assert not dropped.clip_g_attn_mask.any() and dropped.clip_l_attn_mask.all() and dropped.t5_out.all()
    assert out.lg_out.all(), "the input (a cache entry) is not modified"
    assert TextDropout().apply(out, 4) is out
    with pytest.raises(ValueError, match="--t5_dropout_rate must be in"):
        TextDropout(t5=2.0)


@torch.no_grad()
def test_without_t5_zeros_stand_in(encoding):
    no_t5 = SD3TextEncoding(encoding.clip_l_tokenizer, encoding.clip_g_tokenizer, None, encoding.clip_l,
                            encoding.clip_g, None, context_width=TINY_T5_WIDTH)
    out = no_t5.encode(CAPTIONS[:2])
    assert out.t5_out.shape == (2, 77, TINY_T5_WIDTH) and not out.t5_out.any()
    assert out.conditioning().context.shape == (2, 154, TINY_T5_WIDTH)


def test_cache_entries_and_identity(encoding, paths):
    cache = SD3TextCacheEncoder(encoding)
    entries = cache.encode(CAPTIONS[:2])
    assert set(entries[0]) == set(SD3TextOutputs.CACHE_KEYS) | {"apply_lg_attn_mask", "apply_t5_attn_mask"}
    assert entries[0]["lg_out"].dtype == torch.float32 and entries[0]["t5_out"].shape == (T5_LENGTH, TINY_T5_WIDTH)
    stacked = {k: torch.stack([e[k] for e in entries]) for k in SD3TextOutputs.CACHE_KEYS}
    restored = SD3TextOutputs.from_cache(stacked)
    assert torch.allclose(restored.lg_out, encoding.encode(CAPTIONS[:2]).lg_out)
    identity = cache.identity
    assert "t5_max_length=12" in identity and "clip_g.safetensors" in identity
    longer = SD3TextEncoding.from_files(checkpoint=paths["checkpoint"], clip_l_path=paths["clip_l"],
                                        clip_g_path=paths["clip_g"], t5xxl_path=paths["t5"], t5_max_length=20,
                                        tokenizer_cache_dir=paths["tokenizers"])
    assert longer.identity != identity


def test_clip_g_tokenizer_with_other_pad_is_refused(encoding):
    with pytest.raises(ValueError, match="pad with id 0"):
        SD3TextEncoding(encoding.clip_l_tokenizer, encoding.clip_l_tokenizer, encoding.t5_tokenizer,
                        encoding.clip_l, encoding.clip_g, encoding.t5)
