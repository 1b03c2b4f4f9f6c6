"""A1111 prompt weighting for SD 1.x/2.x (library/sd/prompt_weighting.py, SDTextEncoding.encode_weighted):
the parser on hand-computed cases, unweighted prompts encoded exactly as before, weighted states
scaled then rescaled to the unweighted mean, weights on the right tokens across 75-token chunks,
and --weighted_captions (live, cached, cache identity, sample prompts)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from library.sd.prompt_weighting import parse_prompt_weights, weighted_row, weighted_tokens
from library.sd.text import CACHE_KEY, SDTextCacheEncoder, SDTextEncoding, apply_token_weights, load_sd_tokenizer
from library.tiny import sd as tiny_sd

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

R, S = 1.1, 1 / 1.1
LONG = " ".join(("a red cat sitting on a blue chair with a green hat " * 20).split()[:200])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    base = tmp_path_factory.mktemp("sd_tok")
    return {v2: load_sd_tokenizer(v2, cache_dir=tiny_sd.write_tokenizer_cache(base / f"v{int(v2)}", v2))
            for v2 in (False, True)}


@pytest.fixture(scope="module")
def text_encoder():
    return tiny_sd.random_text_encoder(False, seed=5)


def approx(pieces):
    return [(t, pytest.approx(w, rel=1e-12)) for t, w in pieces]


# ---------------------------------------------------------------------------------------------
# The parser.

@pytest.mark.parametrize("prompt, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("a (cat)", [("a ", 1.0), ("cat", R)]),
    ("((cat)) dog", [("cat", R * R), (" dog", 1.0)]),
    ("(((cat)))", [("cat", R ** 3)]),
    ("[cat]", [("cat", S)]),
    ("[[cat]]", [("cat", S * S)]),
    ("(cat:1.5) dog", [("cat", 1.5), (" dog", 1.0)]),
    ("((cat:2) dog)", [("cat", 2.0 * R), (" dog", R)]),
    ("[(cat:1.5)]", [("cat", 1.5 * S)]),
    ("(a [b] c)", [("a ", R), ("b", R * S), (" c", R)]),
    ("(cat:.5)", [("cat", 0.5)]),
    ("(cat:-1)", [("cat", -1.0)]),
    ("(cat:1)", [("cat", 1.0)]),
    # escapes: the literal characters; a backslash before anything else is dropped
    (r"\(cat\) \[dog\]", [("(cat) [dog]", 1.0)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    (r"a\b", [("ab", 1.0)]),
    (r"(\(cat\))", [("(cat)", R)]),
    # unbalanced or stray brackets
    ("a (cat", [("a ", 1.0), ("cat", R)]),
    ("a [cat", [("a ", 1.0), ("cat", S)]),
    ("cat) dog", [("cat) dog", 1.0)]),
    ("a ]b[ c", [("a ]b", 1.0), (" c", S)]),
    ("cat:1.5) dog", [("cat:1.5) dog", 1.0)]),
    ("[cat:1.5]", [("cat:1.5", S)]),
    ("smile :) ok", [("smile :) ok", 1.0)]),
    ("time: 10:30", [("time: 10:30", 1.0)]),
    ("(a:1.2.3)", [("a:1.2.3)", R)]),          # not a number: literal text, the ( closes at the end
    ("((a) b", [("a", R * R), (" b", R)]),
    # joined pieces and empty prompts
    ("(a)(b)", [("ab", R)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
])
def test_parser(prompt, expected):
    assert parse_prompt_weights(prompt) == approx(expected)


def test_tokens_get_their_piece_weight(tokenizers):
    tok = tokenizers[False]
    ids, weights = weighted_tokens(tok, "a (red cat:1.5) [sitting]", 75)
    pieces = [tok(t, add_special_tokens=False).input_ids for t in ("a ", "red cat", " sitting")]
    assert ids == pieces[0] + pieces[1] + pieces[2]
    assert weights == [1.0] * len(pieces[0]) + [1.5] * len(pieces[1]) + [pytest.approx(S)] * len(pieces[2])
    row, row_w = weighted_row(tok, "a (red cat:1.5) [sitting]", 77)
    assert len(row) == len(row_w) == 77
    assert row[0] == tok.bos_token_id and row[len(ids) + 1] == tok.eos_token_id
    assert row[1:len(ids) + 1] == ids and row_w[1:len(ids) + 1] == weights
    assert row_w[0] == 1.0 and set(row_w[len(ids) + 1:]) == {1.0}


# ---------------------------------------------------------------------------------------------
# Encoding.

@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("max_len", [None, 150, 225])
@torch.no_grad()
def test_unweighted_prompts_encode_exactly_as_before(tokenizers, text_encoder, v2, max_len):
    prompts = ["a red cat", "", "a photo: of a cat, smiling :) 10:30", LONG, " ".join(LONG.split()[:90])]
    enc = SDTextEncoding(tokenizers[v2], text_encoder, max_token_length=max_len)
    ids, weights = enc.tokenize_weighted(prompts)
    assert torch.equal(ids, enc.tokenize(prompts))
    assert (weights == 1).all() and weights.shape == (len(prompts), enc.sequence_length)
    assert torch.equal(enc.encode_weighted(prompts), enc.encode(prompts))
    skip = SDTextEncoding(tokenizers[v2], text_encoder, max_token_length=max_len, clip_skip=2)
    assert torch.equal(skip.encode_weighted(prompts), skip.encode(prompts))


@torch.no_grad()
def test_weighted_states_are_scaled_then_mean_rescaled(tokenizers, text_encoder):
    tok = tokenizers[False]
    enc = SDTextEncoding(tok, text_encoder)
    ids, weights = enc.tokenize_weighted(["a (red:1.5) [cat] sitting"])
    assert torch.equal(ids, enc.tokenize(["a red cat sitting"]))   # same tokens as the literal text
    n_a, n_red, n_cat = (len(tok(t, add_special_tokens=False).input_ids) for t in ("a ", "red", " cat"))
    red = slice(1 + n_a, 1 + n_a + n_red)
    cat = slice(red.stop, red.stop + n_cat)
    expected_w = torch.ones(77)
    expected_w[red] = 1.5
    expected_w[cat] = S
    assert torch.allclose(weights[0], expected_w)

    plain = enc.encode(["a red cat sitting"])[0]
    out = enc.encode_weighted(["a (red:1.5) [cat] sitting"])[0]
    scaled = plain * expected_w[:, None]
    c = plain.mean() / scaled.mean()                      # one factor for the whole sequence
    assert torch.allclose(out, scaled * c, atol=1e-6, rtol=1e-5)
    assert torch.allclose(out.mean(), plain.mean(), atol=1e-7, rtol=1e-5)    # the mean is preserved
    # before the rescale the red tokens are 1.5x and the cat token 1/1.1 x the others
    assert torch.allclose(out[red] / c, plain[red] * 1.5, atol=1e-5, rtol=1e-5)
    assert torch.allclose(out[cat] / c, plain[cat] * S, atol=1e-5, rtol=1e-5)
    assert torch.allclose(out[0] / c, plain[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, plain)


def test_apply_token_weights_rows_and_gradients():
    states = torch.randn(2, 5, 3, requires_grad=True)
    weights = torch.tensor([[1.0] * 5, [1.0, 2.0, 1.0, 0.5, 1.0]])
    out = apply_token_weights(states, weights)
    assert torch.equal(out[0], states[0])                    # an all-1 row is untouched
    w = weights[1][:, None]
    expected = states[1] * w * states[1].mean() / (states[1] * w).mean()
    assert torch.allclose(out[1], expected, atol=1e-6)
    out.sum().backward()
    assert states.grad is not None and torch.isfinite(states.grad).all()
    half = apply_token_weights(states.detach().half(), weights)
    assert half.dtype == torch.float16


@pytest.mark.parametrize("v2", [False, True])
@torch.no_grad()
def test_long_prompts_keep_weights_on_the_right_tokens(tokenizers, text_encoder, v2):
    tok = tokenizers[v2]
    words = LONG.split()[:100]
    k = 90                                                  # a word in the second chunk
    literal = " ".join(words)
    weighted = " ".join(words[:k] + [f"({words[k]}:2.0)"] + words[k + 1:])
    enc = SDTextEncoding(tok, text_encoder, max_token_length=225)
    ids, weights = enc.tokenize_weighted([weighted])
    assert torch.equal(ids, enc.tokenize([literal]))
    before = len(tok(" ".join(words[:k]), add_special_tokens=False).input_ids)
    n = len(tok(words[k], add_special_tokens=False).input_ids)
    assert before > 75                                       # the weighted word is in chunk 2
    positions = list(range(1 + before, 1 + before + n))     # positions in the 227 joined states
    assert (weights[0, positions] == 2.0).all()
    assert (weights[0].sum() - 2.0 * n) == pytest.approx(227 - n)
    word_ids = tok(words[k], add_special_tokens=False).input_ids
    for p, token in zip(positions, word_ids):
        chunk, index = (p - 1) // 75, (p - 1) % 75 + 1
        assert ids[0, chunk, index] == token

    plain = enc.encode([literal])[0]
    out = enc.encode_weighted([weighted])[0]
    c = plain.mean() / (plain * weights[0][:, None]).mean()
    assert torch.allclose(out[positions] / c, 2.0 * plain[positions], atol=1e-5, rtol=1e-5)
    others = [p for p in range(227) if p not in positions]
    assert torch.allclose(out[others] / c, plain[others], atol=1e-5, rtol=1e-5)
    assert torch.allclose(out.mean(), plain.mean(), atol=1e-7, rtol=1e-5)


def test_weights_past_the_limit_are_cut(tokenizers):
    tok = tokenizers[False]
    words = LONG.split()
    prompt = " ".join(words[:70]) + " (" + " ".join(words[70:]) + ":1.3)"
    row, row_w = weighted_row(tok, prompt, 77)
    assert len(row) == len(row_w) == 77 and row[-1] == tok.eos_token_id and row_w[-1] == 1.0
    assert row == tok(" ".join(words), padding="max_length", truncation=True, max_length=77).input_ids
    assert 1.3 in row_w


# ---------------------------------------------------------------------------------------------
# --weighted_captions, the cache identity and sample prompts.

@torch.no_grad()
def test_weighted_captions_encode_cache_and_identity(tokenizers, text_encoder):
    tok = tokenizers[False]
    plain = SDTextEncoding(tok, text_encoder, max_token_length=150)
    weighted = SDTextEncoding(tok, text_encoder, max_token_length=150, weighted_captions=True)
    assert "weighted" not in plain.identity                     # unchanged: existing caches stay valid
    assert weighted.identity != plain.identity
    assert SDTextCacheEncoder(weighted).identity == weighted.identity
    captions = ["a (red) cat", "a blue dog"]
    assert torch.equal(weighted.encode(captions), plain.encode_weighted(captions))
    assert not torch.allclose(weighted.encode(captions)[0], plain.encode(captions)[0])
    assert torch.equal(weighted.encode(captions)[1], plain.encode(captions)[1])
    cached = SDTextCacheEncoder(weighted).encode(captions)
    assert torch.equal(cached[0][CACHE_KEY], plain.encode_weighted(captions)[0].float())
    # captions as written without the option
    assert torch.equal(SDTextCacheEncoder(plain).encode(captions)[0][CACHE_KEY], plain.encode(captions)[0])


def test_trainer_accepts_weighted_captions_and_weights_sample_prompts(tokenizers, text_encoder, tmp_path):
    from train_network import SDNetworkTrainer

    model = tmp_path / "model.ckpt"
    model.write_bytes(b"")
    trainer = SDNetworkTrainer()
    args = trainer.build_parser().parse_args(["--pretrained_model_name_or_path", str(model), "--output_dir", "out",
                                              "--network_module", "networks.lora", "--weighted_captions",
                                              "--network_train_unet_only", "--cache_text_encoder_outputs"])
    trainer.check_args(args)       # no longer refused
    enc = SDTextEncoding(tokenizers[False], text_encoder)
    models = SimpleNamespace(text_encoders=[text_encoder], extra={"text": enc})
    prompts = [SimpleNamespace(prompt="a (red:1.4) cat", negative_prompt="[blurry]"),
               SimpleNamespace(prompt="a dog", negative_prompt=None)]
    conds = trainer.encode_prompts_for_sampling(args, models, prompts, torch.device("cpu"))
    assert set(conds) == {"a (red:1.4) cat", "[blurry]", "a dog", ""}
    with torch.no_grad():
        assert torch.equal(conds["a (red:1.4) cat"][CACHE_KEY], enc.encode_weighted(["a (red:1.4) cat"])[0])
        assert torch.equal(conds["a dog"][CACHE_KEY], enc.encode(["a dog"])[0])
        assert not torch.allclose(conds["[blurry]"][CACHE_KEY], enc.encode(["blurry"])[0])
