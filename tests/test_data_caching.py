"""Latent and text-output caches: contents, keys (what re-encodes and what does not), corrupt
files, --skip_cache_check, refusals, and batches served from the cache."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from library.data import build_datasets
from library.data.cache_files import inspect_cache_file
from library.errors import ConfigError
from library.safetensors_io import load_file, read_metadata
from tests.test_data_helpers import (
    FakeLatentEncoder, FakeTextEncoder, caption_vector, expected_latent, make_folder, make_image, parse_args,
    write_toml,
)


def config(tmp_path, body: str = "", dataset: str = "", general: str = "") -> str:
    return write_toml(tmp_path / "d.toml", f"""
[general]
caption_extension = ".txt"
{general}
[[datasets]]
resolution = 32
bucket_reso_steps = 16
batch_size = 2
{dataset}
[[datasets.subsets]]
image_dir = "{tmp_path / 'imgs'}"
{body}
""")


def build(cfg: str, *argv: str):
    return build_datasets(parse_args("--dataset_config", cfg, *argv), reso_step_multiple=8)


@pytest.fixture
def images(tmp_path):
    return make_folder(tmp_path / "imgs", [(48, 32), (32, 32), (40, 40)], captions=["red car", "blue sky", "tree"])


def center_pixels(path: str) -> torch.Tensor:
    """Reference: cover 32x32 and centre-crop, normalised to [-1, 1] (independent of the pipeline)."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = 32 / min(w, h)
    rw, rh = int(w * scale + 0.5), int(h * scale + 0.5)
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), Image.Resampling.LANCZOS)
    arr = np.asarray(img)
    left, top = (rw - 32) // 2, (rh - 32) // 2
    arr = arr[top:top + 32, left:left + 32]
    return torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1)


# ------------------------------------------------------------------------------------ latents

def test_latents_in_memory_match_the_encoded_pixels(tmp_path, images):
    train, _ = build(config(tmp_path, 'resize_interpolation = "lanczos"', general="flip_aug = true"))
    enc = FakeLatentEncoder()
    stats = train.cache_latents(enc, to_disk=False, batch_size=2, progress=False)
    assert stats.encoded == 3 and enc.images_encoded == 6  # each image and its flipped copy
    assert train.uses_cached_latents
    assert not list((tmp_path / "imgs").glob("*.safetensors"))
    seen_flip = set()
    for epoch in (1, 2, 3, 4):
        for b in train.loader(seed=0).epoch(epoch):
            assert "images" not in b and b["latents"].shape == (len(b["captions"]), 4, 4, 4)
            for lat, path, flipped in zip(b["latents"], b["image_paths"], b["flipped"]):
                px = center_pixels(path)
                ref = expected_latent(torch.flip(px, dims=[2]) if flipped else px)
                torch.testing.assert_close(lat, ref, atol=1e-5, rtol=0)
                seen_flip.add(flipped)
    assert seen_flip == {True, False}


def test_disk_cache_names_and_reuse(tmp_path, images):
    cfg = config(tmp_path)
    train, _ = build(cfg)
    enc = FakeLatentEncoder()
    train.cache_latents(enc, to_disk=True, progress=False)
    files = sorted(p.name for p in (tmp_path / "imgs").glob("*.safetensors"))
    assert files == ["img0_0048x0032_fake.safetensors", "img1_0032x0032_fake.safetensors",
                     "img2_0040x0040_fake.safetensors"]
    meta = read_metadata(tmp_path / "imgs" / files[0])
    assert meta["identity"] == "fake-vae-1" and meta["source_size"] == str(os.path.getsize(images[0]))
    first = [b["latents"] for b in train.loader(seed=1).epoch(1)]

    again, _ = build(cfg)
    enc2 = FakeLatentEncoder()
    stats = again.cache_latents(enc2, to_disk=True, progress=False)
    assert enc2.images_encoded == 0 and stats.reused == 3
    second = [b["latents"] for b in again.loader(seed=1).epoch(1)]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    # memory mode reuses valid disk entries instead of encoding
    mem, _ = build(cfg)
    enc3 = FakeLatentEncoder()
    mem.cache_latents(enc3, to_disk=False, progress=False)
    assert enc3.images_encoded == 0


def test_changed_inputs_are_re_encoded_and_nothing_else(tmp_path, images):
    cfg = config(tmp_path)
    train, _ = build(cfg)
    train.cache_latents(FakeLatentEncoder(), to_disk=True, progress=False)

    def encode_count(cfg_path=cfg, encoder=None) -> int:
        g, _ = build(cfg_path)
        enc = encoder or FakeLatentEncoder()
        g.cache_latents(enc, to_disk=True, progress=False)
        return enc.images_encoded

    assert encode_count() == 0
    # same bytes, new mtime (a copy): verified by hash, not re-encoded
    st = os.stat(images[1])
    os.utime(images[1], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert encode_count() == 0
    # new content, same size: only that image
    make_image(images[1], (32, 32), seed=99)
    assert encode_count() == 1
    assert encode_count() == 0
    # another encoder identity: everything
    assert encode_count(encoder=FakeLatentEncoder(identity="fake-vae-2")) == 3
    # a different bucket (resolution) adds entries next to the old ones
    cfg64 = write_toml(tmp_path / "d64.toml", open(cfg).read().replace("resolution = 32", "resolution = 48"))
    assert encode_count(cfg64, FakeLatentEncoder(identity="fake-vae-2")) == 3
    names = inspect_cache_file(str(tmp_path / "imgs" / "img1_0032x0032_fake.safetensors")).tensor_names
    assert {n.split(":")[1].split("_")[0] for n in names} == {"32x32", "48x48"}
    assert encode_count(encoder=FakeLatentEncoder(identity="fake-vae-2")) == 0
    # flip_aug on needs the flipped latent: re-encoded (image + flipped copy)
    cfg_flip = write_toml(tmp_path / "dflip.toml", open(cfg).read().replace("[general]", "[general]\nflip_aug = true"))
    assert encode_count(cfg_flip, FakeLatentEncoder(identity="fake-vae-2")) == 6


def test_corrupt_cache_file_is_rebuilt_with_a_warning(tmp_path, images, caplog):
    cfg = config(tmp_path)
    train, _ = build(cfg)
    train.cache_latents(FakeLatentEncoder(), to_disk=True, progress=False)
    f0 = tmp_path / "imgs" / "img0_0048x0032_fake.safetensors"
    f1 = tmp_path / "imgs" / "img1_0032x0032_fake.safetensors"
    f0.write_bytes(f0.read_bytes()[:-10])  # truncated
    f1.write_bytes(b"garbage")
    g, _ = build(cfg)
    enc = FakeLatentEncoder()
    with caplog.at_level(logging.WARNING):
        stats = g.cache_latents(enc, to_disk=True, progress=False)
    assert enc.images_encoded == 2 and stats.corrupt_files == 2
    assert "is corrupt; it will be re-encoded" in caplog.text
    assert inspect_cache_file(str(f0)).status == "ok" and load_file(f1)


def test_skip_cache_check_trusts_existing_files(tmp_path, images):
    cfg = config(tmp_path)
    train, _ = build(cfg)
    train.cache_latents(FakeLatentEncoder(), to_disk=True, progress=False)
    make_image(images[0], (48, 32), seed=123)  # the image changes, the cache file stays
    g, _ = build(cfg)
    enc = FakeLatentEncoder()
    g.cache_latents(enc, to_disk=True, skip_check=True, progress=False)
    assert enc.images_encoded == 0
    g2, _ = build(cfg)
    enc2 = FakeLatentEncoder()
    g2.cache_latents(enc2, to_disk=True, progress=False)
    assert enc2.images_encoded == 1


def test_identity_derived_suffix_and_alpha_mask(tmp_path):
    (tmp_path / "imgs").mkdir()
    arr = np.zeros((32, 32, 4), np.uint8)
    arr[:, 16:, 3] = 255
    Image.fromarray(arr, "RGBA").save(tmp_path / "imgs" / "a.png")
    train, _ = build(config(tmp_path, "alpha_mask = true\nflip_aug = true"))
    train.cache_latents(FakeLatentEncoder(file_suffix=None), to_disk=True, progress=False)
    (name,) = [p.name for p in (tmp_path / "imgs").glob("*.safetensors")]
    assert name.startswith("a_0032x0032_latents_") and len(name) == len("a_0032x0032_latents_12345678.safetensors")
    for epoch in range(1, 6):
        (b,) = list(train.loader(seed=0).epoch(epoch))
        mask = b["alpha_masks"][0]
        left, right = (mask[:, 16:], mask[:, :16]) if b["flipped"][0] else (mask[:, :16], mask[:, 16:])
        assert float(left.max()) == 0.0 and float(right.min()) == 1.0


def test_latent_caching_refused_with_random_crop_or_color_aug(tmp_path, images):
    cfg = config(tmp_path, "random_crop = true", general="color_aug = true")
    with pytest.raises(ConfigError) as e:
        build(cfg, "--cache_latents")
    msg = str(e.value)
    assert msg.startswith("latent caching (--cache_latents / --cache_latents_to_disk) cannot be used")
    assert "datasets[0].subsets[0]: random_crop = true" in msg and "color_aug = true" in msg
    train, _ = build(cfg)
    with pytest.raises(ConfigError, match="random_crop"):
        train.cache_latents(FakeLatentEncoder(), to_disk=False, progress=False)


def test_cached_latents_through_workers(tmp_path, images):
    train, _ = build(config(tmp_path, general="flip_aug = true"))
    train.cache_latents(FakeLatentEncoder(), to_disk=False, progress=False)
    plain = [b["latents"] for b in train.loader(seed=4).epoch(2)]
    workers = [b["latents"] for b in train.loader(seed=4, num_workers=2).epoch(2)]
    assert all(torch.equal(x, y) for x, y in zip(plain, workers))


# ------------------------------------------------------------------------------------ text outputs

def test_text_outputs_in_memory_with_caption_dropout(tmp_path, images):
    train, _ = build(config(tmp_path, "caption_dropout_rate = 0.5\ncaption_prefix = \"photo of\""))
    enc = FakeTextEncoder()
    train.cache_text_outputs(enc, to_disk=False, progress=False)
    assert sorted(enc.captions_encoded) == ["", "photo of blue sky", "photo of red car", "photo of tree"]
    captions = []
    for epoch in range(1, 5):
        for b in train.loader(seed=0).epoch(epoch):
            assert b["text"]["emb"].shape == (len(b["captions"]), 2, 4)
            for cap, emb, length in zip(b["captions"], b["text"]["emb"], b["text"]["length"]):
                assert torch.equal(emb, caption_vector(cap).reshape(2, 4)) and int(length) == len(cap)
                captions.append(cap)
    assert "" in captions and "photo of tree" in captions


def test_text_outputs_on_disk_reuse_and_stale_captions(tmp_path, images):
    cfg = config(tmp_path, "caption_dropout_rate = 0.1")
    train, _ = build(cfg)
    enc = FakeTextEncoder()
    train.cache_text_outputs(enc, to_disk=True, batch_size=2, progress=False)
    names = sorted(p.name for p in (tmp_path / "imgs").glob("*.safetensors"))
    assert names == ["__empty_caption___fake_te.safetensors", "img0_fake_te.safetensors",
                     "img1_fake_te.safetensors", "img2_fake_te.safetensors"]
    assert sorted(enc.captions_encoded) == ["", "blue sky", "red car", "tree"]
    b = next(iter(train.loader(seed=0).epoch(1)))
    assert torch.equal(b["text"]["emb"][0], caption_vector(b["captions"][0]).reshape(2, 4))

    again, _ = build(cfg)
    enc2 = FakeTextEncoder()
    again.cache_text_outputs(enc2, to_disk=True, progress=False)
    assert enc2.captions_encoded == []

    (tmp_path / "imgs" / "img2.txt").write_text("oak tree")
    g, _ = build(cfg)
    enc3 = FakeTextEncoder()
    g.cache_text_outputs(enc3, to_disk=True, progress=False)
    assert enc3.captions_encoded == ["oak tree"]
    meta = read_metadata(tmp_path / "imgs" / "img2_fake_te.safetensors")
    assert [v for k, v in meta.items() if k.startswith("caption:")] == ["oak tree"]  # the stale one is gone
    assert len(load_file(tmp_path / "imgs" / "img2_fake_te.safetensors")) == 2

    g2, _ = build(cfg)
    enc4 = FakeTextEncoder(identity="fake-te-2")
    g2.cache_text_outputs(enc4, to_disk=True, progress=False)
    assert sorted(enc4.captions_encoded) == ["", "blue sky", "oak tree", "red car"]


def test_text_caching_refusals(tmp_path, images):
    for body, expected in [("shuffle_caption = true", "shuffle_caption = true"),
                           ("token_warmup_step = 10", "token_warmup_step = 10"),
                           ("token_warmup_step = 0.5", "token_warmup_step = 0.5"),
                           ("caption_tag_dropout_rate = 0.1", "caption_tag_dropout_rate = 0.1"),
                           ("enable_wildcard = true\ncaption_prefix = \"{a|b}\"",
                            "3 captions have several wildcard choices or lines")]:
        cfg = config(tmp_path, body)
        with pytest.raises(ConfigError) as e:
            build(cfg, "--cache_text_encoder_outputs")
        assert "text-encoder output caching (--cache_text_encoder_outputs[_to_disk]) cannot be used" in str(e.value)
        assert expected in str(e.value), body
    # a wildcard with one choice, keep_tokens_separator and caption dropout are fine
    ok = config(tmp_path, 'enable_wildcard = true\ncaption_prefix = "{a} |||"\nkeep_tokens_separator = "|||"\n'
                          "caption_dropout_every_n_epochs = 3")
    train, _ = build(ok, "--cache_text_encoder_outputs")
    enc = FakeTextEncoder()
    train.cache_text_outputs(enc, to_disk=False, progress=False)
    assert sorted(enc.captions_encoded) == ["", "a, blue sky", "a, red car", "a, tree"]
    assert {c for b in train.loader(seed=0).epoch(3) for c in b["captions"]} == {""}
