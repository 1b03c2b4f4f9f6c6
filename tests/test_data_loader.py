"""Batches: contents, deterministic order, skipping without decoding, workers, sharding."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import library.data.batches as batches_module
from library.data import build_datasets
from tests.test_data_helpers import make_folder, make_image, parse_args, write_toml


def build(tmp_path, text: str, *argv: str):
    cfg = write_toml(tmp_path / "d.toml", text)
    return build_datasets(parse_args("--dataset_config", cfg, *argv), reso_step_multiple=8)


@pytest.fixture
def two_datasets(tmp_path):
    make_folder(tmp_path / "a", [(64, 64), (96, 64), (64, 96), (64, 64), (80, 80)],
                captions=["a0, x, y, z", "a1, x, y", "a2, x", "a3", "a4, q, r"])
    make_folder(tmp_path / "r", [(64, 64)] * 3)
    train, _ = build(tmp_path, f"""
[general]
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1
flip_aug = true
[[datasets]]
resolution = 64
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32
batch_size = 2
[[datasets.subsets]]
image_dir = "{tmp_path / 'a'}"
num_repeats = 2
custom_attributes = {{ diff_output_preservation = true }}
[[datasets.subsets]]
image_dir = "{tmp_path / 'r'}"
is_reg = true
class_tokens = "reg"
[[datasets]]
resolution = 32
bucket_reso_steps = 32
batch_size = 3
network_multiplier = 0.5
[[datasets.subsets]]
image_dir = "{tmp_path / 'a'}"
""", "--prior_loss_weight", "0.25")
    return train


def signature(batch) -> tuple:
    return (tuple(batch["image_paths"]), tuple(batch["captions"]), tuple(batch["flipped"]), batch["bucket_reso"])


def test_batch_contents(two_datasets):
    loader = two_datasets.loader(seed=3)
    # dataset 0, grid (32x96, 32x128, 64x64, 96x32, 128x32): 64x96 (0.667) ties between 32x96 (0.333)
    # and 64x64 (1.0) and takes the first, 32x96: 2 samples = 1 batch; the rest go to 64x64:
    # 4 images x 2 repeats + reg balanced to 10 = 18 samples = 9 batches. Dataset 1 (single bucket
    # 32x32): 5 images / batch 3 = 2 batches.
    assert len(loader) == two_datasets.num_batches_per_epoch == 10 + 2
    seen = list(loader.epoch(1))
    assert len(seen) == len(loader)
    for b in seen:
        n = len(b["captions"])
        w, h = b["bucket_reso"]
        assert b["images"].shape == (n, 3, h, w) and b["images"].dtype == torch.float32
        assert -1.0 <= float(b["images"].min()) and float(b["images"].max()) <= 1.0
        assert b["loss_weights"].shape == (n,) and b["network_multipliers"].shape == (n,)
        assert "latents" not in b and "text" not in b and "alpha_masks" not in b
        assert len(b["original_sizes"]) == len(b["crop_ltrb"]) == len(b["image_paths"]) == n
        for path, weight, attrs, cap in zip(b["image_paths"], b["loss_weights"], b["custom_attributes"],
                                            b["captions"]):
            is_reg = "/r/" in path
            assert float(weight) == (0.25 if is_reg else 1.0)
            if is_reg:
                assert cap == "reg" and attrs == {}
            else:  # keep_tokens = 1: the first tag of imgN's caption "aN, ..." stays first
                assert cap.split(", ")[0] == "a" + os.path.basename(path)[3]
        mult = 0.5 if (w, h) == (32, 32) else 1.0
        assert torch.all(b["network_multipliers"] == mult)
    a_attrs = [a for b in seen for p, a in zip(b["image_paths"], b["custom_attributes"]) if "/a/" in p
               and b["bucket_reso"] != (32, 32)]
    assert a_attrs and all(a == {"diff_output_preservation": True} for a in a_attrs)
    assert sorted({b["bucket_reso"] for b in seen}) == [(32, 32), (32, 96), (64, 64)]


def test_pixels_match_resize_crop_and_flip(tmp_path):
    make_image(tmp_path / "i" / "x.png", (96, 64), seed=7)
    train, _ = build(tmp_path, f'[general]\nflip_aug = true\n[[datasets]]\nresolution = 64\nbucket_reso_steps = 32\n'
                               f'[[datasets.subsets]]\nimage_dir = "{tmp_path / "i"}"\n')
    src = np.asarray(Image.open(tmp_path / "i" / "x.png").convert("RGB"))
    # bucketing off: covering 64x64 needs no resize (height 64 already), centre crop 16 px each side
    expected = src[:, 16:80].astype(np.float32) / 127.5 - 1
    loader = train.loader(seed=0)
    flips = []
    for epoch in range(1, 9):
        (b,) = list(loader.epoch(epoch))
        img = b["images"][0].permute(1, 2, 0).numpy()
        ref = expected[:, ::-1] if b["flipped"][0] else expected
        np.testing.assert_allclose(img, ref, atol=1e-6)
        flips.append(b["flipped"][0])
    assert any(flips) and not all(flips)
    # the fitted box: height 64 / 1.5 = 42.67, top (64 - 42.67) // 2 = 10, bottom int(52.67)
    assert b["crop_ltrb"] == [(0, 10, 64, 52)] and b["original_sizes"] == [(96, 64)]


def test_same_seed_epoch_same_batches_and_epochs_differ(two_datasets):
    a = [signature(b) for b in two_datasets.loader(seed=5).epoch(2)]
    b = [signature(b) for b in two_datasets.loader(seed=5).epoch(2)]
    assert a == b
    assert a != [signature(x) for x in two_datasets.loader(seed=5).epoch(3)]
    assert a != [signature(x) for x in two_datasets.loader(seed=6).epoch(2)]
    # every slot appears exactly once per epoch
    paths = sorted(p for s in a for p in s[0])
    ds = two_datasets.datasets
    assert len(paths) == sum(sum(d.repeats) for d in ds)


def test_skip_equals_iterating_and_discarding_and_does_not_decode(two_datasets, monkeypatch):
    loader = two_datasets.loader(seed=1)
    full = list(loader.epoch(4))
    decoded = []
    real = batches_module.decode_image
    monkeypatch.setattr(batches_module, "decode_image", lambda path, **kw: decoded.append(path) or real(path, **kw))
    tail = list(loader.epoch(4, skip_batches=5))
    assert [signature(b) for b in tail] == [signature(b) for b in full[5:]]
    for x, y in zip(tail, full[5:]):
        assert torch.equal(x["images"], y["images"])
    assert len(decoded) == sum(len(b["captions"]) for b in full[5:])  # nothing before batch 5 decoded


def test_workers_give_identical_batches_across_epochs(two_datasets):
    plain = two_datasets.loader(seed=2)
    workers = two_datasets.loader(seed=2, num_workers=2, persistent_workers=True)
    for epoch in (1, 2):
        expected = list(plain.epoch(epoch))
        got = list(workers.epoch(epoch))
        assert [signature(b) for b in got] == [signature(b) for b in expected]
        assert all(torch.equal(x["images"], y["images"]) for x, y in zip(got, expected))
    # an epoch abandoned half way does not disturb the next one
    it = workers.epoch(3)
    next(it)
    assert [signature(b) for b in workers.epoch(3, skip_batches=2)] == [signature(b) for b in plain.epoch(3)][2:]


def test_caption_dropout_every_n_epochs_and_token_warmup(tmp_path):
    make_folder(tmp_path / "i", [(64, 64)] * 2, captions=["a, b, c, d, e"] * 2)
    train, _ = build(tmp_path, f'[[datasets]]\nresolution = 64\nbucket_reso_steps = 32\n[[datasets.subsets]]\n'
                               f'image_dir = "{tmp_path / "i"}"\ncaption_extension = ".txt"\n'
                               'caption_dropout_every_n_epochs = 2\ntoken_warmup_step = 4\ntoken_warmup_min = 1\n')
    loader = train.loader(seed=0)
    e1 = [c for b in loader.epoch(1) for c in b["captions"]]
    assert e1 == ["a", "a, b"]  # steps 0 and 1: floor(step * 4 / 4) + 1 tags
    assert [c for b in loader.epoch(2) for c in b["captions"]] == ["", ""]
    assert [c for b in loader.epoch(3) for c in b["captions"]] == ["a, b, c, d, e"] * 2


def test_fractional_token_warmup_needs_max_train_steps(tmp_path):
    make_folder(tmp_path / "i", [(64, 64)], captions=["a, b, c"])
    train, _ = build(tmp_path, f'[[datasets]]\nresolution = 64\nbucket_reso_steps = 32\n[[datasets.subsets]]\n'
                               f'image_dir = "{tmp_path / "i"}"\ncaption_extension = ".txt"\ntoken_warmup_step = 0.5\n')
    with pytest.raises(Exception, match="fraction of the training steps"):
        train.loader(seed=0)
    train.set_max_train_steps(4)  # warm-up over 2 steps
    loader = train.loader(seed=0)
    assert [next(iter(loader.epoch(e)))["captions"][0] for e in (1, 2, 3)] == ["a", "a, b", "a, b, c"]


def test_alpha_masks_in_batch(tmp_path):
    arr = np.zeros((64, 64, 4), np.uint8)
    arr[..., 3] = 255
    arr[:, :32, 3] = 0
    (tmp_path / "i").mkdir()
    Image.fromarray(arr, "RGBA").save(tmp_path / "i" / "a.png")
    train, _ = build(tmp_path, f'[[datasets]]\nresolution = 64\nbucket_reso_steps = 32\n[[datasets.subsets]]\n'
                               f'image_dir = "{tmp_path / "i"}"\nalpha_mask = true\n')
    (b,) = list(train.loader(seed=0).epoch(1))
    m = b["alpha_masks"]
    assert m.shape == (1, 64, 64) and m.dtype == torch.float32
    assert float(m[0, :, :32].max()) == 0.0 and float(m[0, :, 32:].min()) == 1.0


def test_sharding_covers_every_batch_once(two_datasets):
    total = [signature(b) for b in two_datasets.loader(seed=9).epoch(1)]
    p0 = two_datasets.loader(seed=9, num_processes=2, process_index=0)
    p1 = two_datasets.loader(seed=9, num_processes=2, process_index=1)
    s0, s1 = [signature(b) for b in p0.epoch(1)], [signature(b) for b in p1.epoch(1)]
    assert len(p0) == len(p1) == 6 == len(s0) == len(s1)
    assert sorted(s0 + s1) == sorted(total)


def test_epochs_are_numbered_from_one(two_datasets):
    with pytest.raises(ValueError, match="numbered from 1"):
        list(two_datasets.loader(seed=0).epoch(0))
