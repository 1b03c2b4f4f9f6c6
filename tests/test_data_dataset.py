"""Scanning, repeats, regularisation balancing, validation split, skipped images, report, metadata."""

from __future__ import annotations

import json
import math
import os

import pytest

from library.data import build_datasets, group_metadata, group_report
from library.data.dataset import balance_reg_repeats, split_for_validation
from library.data.items import ImageItem
from library.data.report import main as report_main
from tests.test_data_helpers import make_folder, make_image, parse_args, write_toml


def build(tmp_path, toml_text: str, *argv: str, multiple: int = 8):
    cfg = write_toml(tmp_path / "d.toml", toml_text)
    return build_datasets(parse_args("--dataset_config", cfg, *argv), reso_step_multiple=multiple)


def test_balance_reg_repeats_matches_sd_scripts():
    # 10 train samples, reg images with 1 repeat each: the first 10 reg images are used once
    assert balance_reg_repeats(10, [(i, 1) for i in range(15)]) == {i: 1 for i in range(10)}
    # 7 train samples, 3 reg images x2 repeats: first pass gives 6, then one more round-robin repeat
    assert balance_reg_repeats(7, [(0, 2), (1, 2), (2, 2)]) == {0: 3, 1: 2, 2: 2}
    # 3 reg images x1 for 8 train samples: 3, then 4, 5, 6, 7, 8 round-robin
    assert balance_reg_repeats(8, [(0, 1), (1, 1), (2, 1)]) == {0: 3, 1: 3, 2: 2}
    assert balance_reg_repeats(0, [(0, 1)]) == {}


def test_validation_split_counts_and_no_overlap():
    items = [ImageItem(f"{i:02d}.png", (8, 8), "", 0, "none") for i in range(10)]
    train, val = split_for_validation(items, 0.1, seed=3)
    # 10 * 0.9 is 9.000000000000002 in floats: still 9 train images
    assert len(train) == 9 and len(val) == 1
    train, val = split_for_validation(items, 0.15, seed=3)
    assert len(train) == math.ceil(10 * 0.85) == 9 and len(val) == 1
    assert not {i.path for i in train} & {i.path for i in val}
    t2, v2 = split_for_validation(items, 0.15, seed=3)
    assert [i.path for i in v2] == [i.path for i in val]
    _, v3 = split_for_validation(items, 0.5, seed=4)
    assert len(v3) == 5
    assert split_for_validation(items, 1.0, seed=0)[0] == []


def test_repeats_reg_and_counts(tmp_path):
    make_folder(tmp_path / "train", [(64, 64)] * 3)
    make_folder(tmp_path / "reg", [(64, 64)] * 10)
    train, val = build(tmp_path, f"""
[[datasets]]
resolution = 64
batch_size = 4
[[datasets.subsets]]
image_dir = "{tmp_path / 'train'}"
num_repeats = 3
[[datasets.subsets]]
image_dir = "{tmp_path / 'reg'}"
is_reg = true
class_tokens = "dog"
""", "--prior_loss_weight", "0.5")
    ds = train.datasets[0]
    assert train.num_train_images == 9 and train.num_reg_images == 10
    # 9 train samples -> the first 9 reg images once each (sd-scripts balancing)
    assert sorted(ds.repeats) == [1] * 9 + [3] * 3
    assert len(ds.bucket_slots[(64, 64)]) == 18
    assert train.num_batches_per_epoch == math.ceil(18 / 4)
    assert any("1 regularisation images are unused" in n for n in train.notes)
    report = group_report(train)
    assert "subset 0 [train]" in report and "3 images x 3 repeats = 9" in report
    assert "subset 1 [reg]" in report and "10 images x 1 repeats = 10" in report
    assert "64x64: 18 samples, 5 batches" in report
    assert "Totals: 9 training images (x repeats), 10 regularisation images, 5 batches per epoch" in report
    assert val is None


def test_skipped_images_are_counted_and_listed(tmp_path):
    make_folder(tmp_path / "imgs", [(64, 64)] * 2)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    imgs = tmp_path / "imgs"
    train, _ = build(tmp_path, f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{imgs}"\n')
    assert train.num_train_images == 2
    assert [os.path.basename(s.path) for s in train.skipped] == ["broken.jpg"]
    report = group_report(train)
    assert "Images skipped: 1 (1 x not a readable image)" in report and "broken.jpg" in report
    assert "2 images x 1 repeats = 2; 2 without caption, 1 skipped" in report


def test_no_upscale_too_small_image_is_skipped_with_reason(tmp_path):
    make_folder(tmp_path / "imgs", [(64, 64), (20, 30)])
    train, _ = build(tmp_path, f'[[datasets]]\nresolution = 64\nenable_bucket = true\nbucket_no_upscale = true\n'
                               f'min_bucket_reso = 32\nbucket_reso_steps = 32\n'
                               f'[[datasets.subsets]]\nimage_dir = "{tmp_path / "imgs"}"\n')
    assert train.num_train_images == 1
    assert "smaller than bucket_reso_steps 32 with bucket_no_upscale" in train.skipped[0].reason


def test_missing_and_empty_captions_in_report(tmp_path):
    make_folder(tmp_path / "imgs", [(64, 64)] * 3, captions=["a", "", None])
    imgs = tmp_path / "imgs"
    train, _ = build(tmp_path, f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{imgs}"\n'
                               'caption_extension = ".txt"\nclass_tokens = "sks"\n')
    info = train.datasets[0].subsets[0]
    assert (info.missing_captions, info.empty_captions) == (1, 1)
    assert "1 without caption (class_tokens 'sks' used), 1 empty captions" in group_report(train)


def test_metadata_for_config_runs(tmp_path):
    make_folder(tmp_path / "a", [(64, 64), (96, 64)], captions=["Red, car", "red, Sky"])
    make_folder(tmp_path / "r", [(64, 64)])
    train, _ = build(tmp_path, f"""
[general]
caption_extension = ".txt"
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
[[datasets.subsets]]
image_dir = "{tmp_path / 'r'}"
is_reg = true
[[datasets]]
resolution = 32
bucket_reso_steps = 32
[[datasets.subsets]]
image_dir = "{tmp_path / 'a'}"
""")
    meta = group_metadata(train)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_num_train_images"] == "6" and meta["ss_num_reg_images"] == "1"
    datasets = json.loads(meta["ss_datasets"])
    d0 = datasets[0]
    assert d0["is_dreambooth"] is True and d0["batch_size_per_device"] == 2 and d0["resolution"] == [64, 64]
    assert d0["tag_frequency"] == {"a": {"red": 2, "car": 1, "sky": 1}, "r": {}}
    assert d0["bucket_info"]["buckets"]  # indexes into the sorted bucket grid
    assert sum(b["count"] for b in d0["bucket_info"]["buckets"].values()) == 4 + 4
    assert d0["subsets"][0] == {"img_count": 2, "num_repeats": 2, "color_aug": False, "flip_aug": False,
                                "random_crop": False, "shuffle_caption": False, "keep_tokens": 0,
                                "keep_tokens_separator": "", "secondary_separator": None,
                                "enable_wildcard": False, "caption_prefix": None, "caption_suffix": None,
                                "resize_interpolation": None, "image_dir": "a", "class_tokens": None,
                                "is_reg": False}
    assert d0["subsets"][1]["is_reg"] is True
    assert datasets[1]["bucket_info"] is None and datasets[1]["min_bucket_reso"] is None
    assert json.loads(meta["ss_dataset_dirs"]) == {"a": {"n_repeats": 2, "img_count": 2},
                                                   "a (2)": {"n_repeats": 1, "img_count": 2}}
    assert json.loads(meta["ss_tag_frequency"]) == {"a": {"red": 2, "car": 1, "sky": 1}, "r": {}}
    assert meta["ss_prior_loss_weight"] == "1.0" and meta["ss_caption_dropout_rate"] == "0.0"


def test_finetuning_metadata_json_and_jsonl(tmp_path):
    make_folder(tmp_path / "ft", [(64, 64)] * 3)
    (tmp_path / "meta.json").write_text(json.dumps({
        "img0": {"caption": "a photo", "tags": "tag1, tag2"},
        str(tmp_path / "ft" / "img1.png"): {"tags": "only tags"},
        "missing": {"caption": "x"},
    }))
    (tmp_path / "meta.jsonl").write_text(
        json.dumps({"image_path": str(tmp_path / "ft" / "img2.png"), "caption": "line"}) + "\n")
    train, _ = build(tmp_path, f"""
[[datasets]]
resolution = 64
[[datasets.subsets]]
metadata_file = "{tmp_path / 'meta.json'}"
image_dir = "{tmp_path / 'ft'}"
[[datasets.subsets]]
metadata_file = "{tmp_path / 'meta.jsonl'}"
""")
    ds = train.datasets[0]
    assert not ds.spec.is_dreambooth
    assert [it.caption for it in ds.items] == ["a photo,tag1, tag2", "only tags", "line"]
    assert [s.path for s in train.skipped] == ["missing"]
    assert json.loads(group_metadata(train)["ss_datasets"])[0]["subsets"][0]["metadata_file"] == "meta.json"


def test_cache_info_writes_and_reuses_metadata_cache(tmp_path, monkeypatch):
    make_folder(tmp_path / "imgs", [(64, 48)], captions=["cap"])
    text = f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "imgs"}"\n' \
           'cache_info = true\ncaption_extension = ".txt"\n'
    build(tmp_path, text)
    cache = json.loads((tmp_path / "imgs" / "metadata_cache.json").read_text())
    assert list(cache.values()) == [{"caption": "cap", "resolution": [64, 48]}]
    # Second run: no probing and no caption reading needed.
    import library.data.items as items

    monkeypatch.setattr(items, "probe_image", lambda p: pytest.fail("probed although cached"))
    monkeypatch.setattr(items, "read_caption_file", lambda *a: pytest.fail("read caption although cached"))
    train, _ = build(tmp_path, text)
    assert train.datasets[0].items[0].caption == "cap" and train.datasets[0].items[0].size == (64, 48)


def test_validation_group_uses_one_repeat_and_skips_reg(tmp_path):
    make_folder(tmp_path / "t", [(64, 64)] * 10)
    make_folder(tmp_path / "r", [(64, 64)] * 4)
    train, val = build(tmp_path, f"""
[[datasets]]
resolution = 64
validation_split = 0.2
[[datasets.subsets]]
image_dir = "{tmp_path / 't'}"
num_repeats = 5
[[datasets.subsets]]
image_dir = "{tmp_path / 'r'}"
is_reg = true
""", "--seed", "1")
    assert train.num_train_images == 8 * 5 and train.num_reg_images == 4
    assert val.num_train_images == 2 and val.num_reg_images == 0
    assert val.datasets[0].repeats == [1, 1]
    assert "Validation totals: 2 images, 2 batches" in group_report(train)


def test_report_command_line(tmp_path, capsys):
    make_folder(tmp_path / "imgs", [(64, 64)] * 2)
    cfg = write_toml(tmp_path / "d.toml", f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n'
                                          f'image_dir = "{tmp_path / "imgs"}"\n')
    assert report_main(["--dataset_config", cfg, "--reso_step_multiple", "8", "--debug_dataset"]) == 0
    out = capsys.readouterr().out
    assert "Totals: 2 training images" in out and "First 20 batches of epoch 1" in out
    bad = write_toml(tmp_path / "bad.toml", '[[datasets]]\nresolutoin = 64\n[[datasets.subsets]]\nimage_dir = "x"\n')
    assert report_main(["--dataset_config", bad]) == 2
    assert "did you mean resolution?" in capsys.readouterr().err


def test_non_utf8_caption_is_an_error_naming_the_file(tmp_path):
    make_folder(tmp_path / "imgs", [(64, 64)])
    (tmp_path / "imgs" / "img0.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(Exception, match=r"img0\.txt is not UTF-8"):
        build(tmp_path, f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "imgs"}"\n'
                        'caption_extension = ".txt"\n')


def test_exif_rotated_image_gets_the_rotated_bucket(tmp_path):
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 8
    os.makedirs(tmp_path / "imgs")
    make_image(tmp_path / "imgs" / "r.jpg", (128, 64), exif=exif)
    train, _ = build(tmp_path, f'[[datasets]]\nresolution = 64\nenable_bucket = true\nmin_bucket_reso = 32\n'
                               f'max_bucket_reso = 128\nbucket_reso_steps = 32\n'
                               f'[[datasets.subsets]]\nimage_dir = "{tmp_path / "imgs"}"\n')
    item = train.datasets[0].items[0]
    assert item.size == (64, 128) and item.bucket[0] < item.bucket[1]
