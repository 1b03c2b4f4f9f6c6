"""Dataset config: schema, validation messages, precedence, seed examples parsed verbatim."""

from __future__ import annotations

import json
import os

import pytest

from library.data import build_datasets, group_metadata
from library.data.build import cli_values_from_args, parse_resolution
from library.data.config import load_config_file, resolve_config
from library.data.config_schema import KEYS
from library.data.folders import parse_folder_name
from library.errors import ConfigError, DatasetError
from tests.test_data_helpers import make_folder, parse_args, write_toml

try:
    import tomllib
except ImportError:  # pragma: no cover
    import toml as tomllib


def resolve(text: str, *argv: str, multiple: int = 64, check_paths: bool = False):
    raw = tomllib.loads(text)
    return resolve_config(raw, "x.toml", cli=cli_values_from_args(parse_args(*argv)), reso_step_multiple=multiple,
                          default_resolution=1024, check_paths=check_paths)


def problems(text: str, *argv: str, multiple: int = 64, check_paths: bool = False) -> str:
    with pytest.raises(DatasetError) as e:
        resolve(text, *argv, multiple=multiple, check_paths=check_paths)
    return str(e.value)


# ------------------------------------------------------------------------------ seed examples

FLUX_MULTI_RES = """\
[general]
# Common settings
flip_aug = true
color_aug = false
keep_tokens_separator= "|||"
shuffle_caption = false
caption_tag_dropout_rate = 0
caption_extension = ".txt"

[[datasets]]
# First resolution settings
batch_size = 2
enable_bucket = true
resolution = [1024, 1024]

  [[datasets.subsets]]
  image_dir = "path/to/image/directory"
  num_repeats = 1

[[datasets]]
# Second resolution settings
batch_size = 3
enable_bucket = true
resolution = [768, 768]

  [[datasets.subsets]]
  image_dir = "path/to/image/directory"
  num_repeats = 1
"""

FLUX_VALIDATION = """\
[[datasets]]
enable_bucket = true
resolution = [1024, 1024]
validation_seed = 42 # [Optional] Validation seed, otherwise uses training seed for validation split .

  [[datasets.subsets]]
  image_dir = "path/to/image/directory"
  validation_split = 0.1 # Split between 0.0 and 1.0 where 1.0 will use the full subset as a validation dataset

  [[datasets.subsets]]
  image_dir = "path/to/image/full_validation"
  validation_split = 1.0 # Will use this full subset as a validation subset. 
"""

FLUX_INTERPOLATION = """\
[[datasets]]
resolution = [1024, 1024]
enable_bucket = true
interpolation_type = "lanczos" # Example: Use Lanczos interpolation
# ...
"""

README_MULTI_RES = """\
[general]
# define common settings here
flip_aug = true
color_aug = false
keep_tokens_separator= "|||"
shuffle_caption = false
caption_tag_dropout_rate = 0
caption_extension = ".txt"

[[datasets]]
# define the first resolution here
batch_size = 2
enable_bucket = true
resolution = [1024, 1024]

  [[datasets.subsets]]
  image_dir = "path/to/image/dir"
  num_repeats = 1

[[datasets]]
# define the second resolution here
batch_size = 3
enable_bucket = true
resolution = [768, 768]

  [[datasets.subsets]]
  image_dir = "path/to/image/dir"
  num_repeats = 1

[[datasets]]
# define the third resolution here
batch_size = 4
enable_bucket = true
resolution = [512, 512]

  [[datasets.subsets]]
  image_dir = "path/to/image/dir"
  num_repeats = 1
"""


def test_flux_multi_resolution_example_verbatim(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_folder("path/to/image/directory", [(96, 64), (64, 64), (64, 96)],
                captions=["a, b ||| c, d", "x", None])
    cfg = write_toml("dataset.toml", FLUX_MULTI_RES)
    train, val = build_datasets(parse_args("--dataset_config", cfg))
    assert val is None
    d0, d1 = train.datasets
    assert (d0.spec.resolution, d0.spec.batch_size, d0.spec.enable_bucket) == ((1024, 1024), 2, True)
    assert (d1.spec.resolution, d1.spec.batch_size) == ((768, 768), 3)
    for ds in (d0, d1):
        s = ds.subsets[0].spec
        assert s.flip_aug is True and s.color_aug is False and s.shuffle_caption is False
        assert s.keep_tokens_separator == "|||" and s.caption_extension == ".txt"
        assert s.caption_tag_dropout_rate == 0.0 and isinstance(s.caption_tag_dropout_rate, float)
        assert ds.subsets[0].img_count == 3
    assert train.num_train_images == 6
    # The same images appear at both resolutions; 96x64 (ratio 1.5) goes to the nearest ratio of each
    # grid: 1024x704 (1.4545) at 1024; at 768 the grid has 896x640 (1.4) and 960x576 (1.667).
    assert d0.items[0].bucket == (1024, 704) and d1.items[0].bucket == (896, 640)


def test_readme_multi_resolution_example_verbatim(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_folder("path/to/image/dir", [(64, 64)] * 5)
    train, _ = build_datasets(parse_args("--dataset_config", write_toml("d.toml", README_MULTI_RES)))
    assert [ds.spec.resolution for ds in train.datasets] == [(1024, 1024), (768, 768), (512, 512)]
    assert [ds.spec.batch_size for ds in train.datasets] == [2, 3, 4]
    # 5 images per dataset, all square: ceil(5/2) + ceil(5/3) + ceil(5/4)
    assert train.num_batches_per_epoch == 3 + 2 + 2


def test_flux_validation_example_verbatim(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_folder("path/to/image/directory", [(64, 64)] * 10)
    make_folder("path/to/image/full_validation", [(64, 64)] * 4, prefix="v")
    train, val = build_datasets(parse_args("--dataset_config", write_toml("d.toml", FLUX_VALIDATION)))
    assert train.datasets[0].spec.validation_seed == 42
    infos = train.datasets[0].subsets
    assert [i.img_count for i in infos] == [9, 0]
    assert [i.img_count for i in val.datasets[0].subsets] == [1, 4]
    assert train.num_train_images == 9 and val.num_train_images == 5
    train_paths = {it.path for it in train.datasets[0].items}
    val_paths = {it.path for it in val.datasets[0].items}
    assert not train_paths & val_paths
    # validation_seed makes the split reproducible
    train2, val2 = build_datasets(parse_args("--dataset_config", "d.toml"))
    assert {it.path for it in val2.datasets[0].items} == val_paths
    assert group_metadata(train)["ss_num_validation_images"] == "5"


def test_flux_interpolation_type_example_verbatim_plus_subset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_folder("imgs", [(64, 64)])
    # The guide's fragment has no subsets ("# ..."): verbatim it is an error saying so.
    msg = problems(FLUX_INTERPOLATION)
    assert "datasets[0]: has no [[datasets.subsets]]" in msg
    train, _ = build_datasets(parse_args("--dataset_config", write_toml(
        "d.toml", FLUX_INTERPOLATION + '\n  [[datasets.subsets]]\n  image_dir = "imgs"\n')))
    assert train.datasets[0].spec.resize_interpolation == "lanczos"
    assert train.datasets[0].subsets[0].spec.resize_interpolation == "lanczos"


def test_anima_caption_dropout_per_subset(tmp_path):
    cfg = resolve('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\ncaption_dropout_rate = 0.1\n'
                  '[[datasets.subsets]]\nimage_dir = "b"\n')
    s0, s1 = cfg.datasets[0].subsets
    assert s0.caption_dropout_rate == 0.1 and s1.caption_dropout_rate == 0.0


# ------------------------------------------------------------------------------ precedence

def test_precedence_subset_dataset_general_cli_default():
    cfg = resolve("""
[general]
num_repeats = 2
caption_prefix = "gen"
[[datasets]]
num_repeats = 3
[[datasets.subsets]]
image_dir = "a"
num_repeats = 4
[[datasets.subsets]]
image_dir = "b"
[[datasets]]
[[datasets.subsets]]
image_dir = "c"
""", "--dataset_repeats", "7", "--caption_suffix", "cli", "--train_batch_size", "5")
    a, b = cfg.datasets[0].subsets
    (c,) = cfg.datasets[1].subsets
    assert (a.num_repeats, b.num_repeats, c.num_repeats) == (4, 3, 2)
    assert a.caption_prefix == "gen" and a.caption_suffix == "cli"
    assert cfg.datasets[0].batch_size == 5
    assert a.keep_tokens == 0 and a.caption_separator == "," and a.caption_extension == ".caption"
    assert cfg.datasets[0].resolution == (1024, 1024)  # the family default


def test_toml_value_beats_cli_flag():
    cfg = resolve('[general]\nflip_aug = false\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n'
                  '[[datasets.subsets]]\nimage_dir = "b"\nflip_aug = true\n', "--flip_aug", "--alpha_mask")
    a, b = cfg.datasets[0].subsets
    assert a.flip_aug is False and b.flip_aug is True
    assert a.alpha_mask is True  # subset-only key falls back to the CLI


def test_cli_only_fallbacks_and_resolution_string():
    cfg = resolve('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n', "--resolution", "512,768",
                  "--enable_bucket", "--min_bucket_reso", "320", "--max_bucket_reso", "1000")
    ds = cfg.datasets[0]
    assert ds.resolution == (512, 768) and ds.enable_bucket
    assert (ds.min_bucket_reso, ds.max_bucket_reso) == (320, 1024)  # max rounded up to the step
    assert any("max_bucket_reso 1000 rounded up to 1024" in w for w in cfg.warnings)
    assert parse_resolution("1024") == (1024, 1024)
    with pytest.raises(ConfigError, match="not 'SIZE' or 'WIDTH,HEIGHT'"):
        parse_resolution("big")


def test_every_key_has_a_level_and_kind():
    for name, spec in KEYS.items():
        assert spec.levels and spec.kind, name


def test_json_config_is_accepted(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"datasets": [{"subsets": [{"image_dir": "x"}]}]}))
    assert load_config_file(p)["datasets"][0]["subsets"][0]["image_dir"] == "x"


# ------------------------------------------------------------------------------ error messages

def test_misspelled_key_names_file_section_and_suggests():
    msg = problems('[[datasets]]\nbucket_reso_step = 64\n[[datasets.subsets]]\nimage_dir = "a"\n')
    assert msg.startswith("x.toml: 1 problem in the dataset config:")
    assert "datasets[0]: unknown key 'bucket_reso_step' (did you mean bucket_reso_steps?)" in msg


def test_misspelled_subset_key_suggests_nearest():
    msg = problems('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n[[datasets.subsets]]\nimage_dir = "b"\n'
                   'num_repeat = 3\n')
    assert "datasets[0].subsets[1]: unknown key 'num_repeat' (did you mean num_repeats?)" in msg


def test_key_in_the_wrong_section_says_where_it_belongs():
    msg = problems('[general]\nimage_dir = "a"\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n'
                   'batch_size = 2\n')
    assert "general: 'image_dir' is not allowed in [general]; it belongs in [[datasets.subsets]]" in msg
    assert ("datasets[0].subsets[0]: 'batch_size' is not allowed in [[datasets.subsets]]; it belongs in "
            "[general] or [[datasets]]") in msg


def test_wrong_types_say_what_is_allowed():
    msg = problems('[[datasets]]\nenable_bucket = "true"\nresolution = "512,512"\n[[datasets.subsets]]\n'
                   'image_dir = "a"\nnum_repeats = "20"\ncaption_dropout_rate = "x"\n')
    assert ("'num_repeats' must be an integer, got the string '20' (write num_repeats = 20 without quotes)"
            in msg)
    assert "'enable_bucket' must be true or false, got the string 'true' (write enable_bucket = true" in msg
    assert "'resolution' must be an integer or [width, height], got the string '512,512' " \
           "(write resolution = [512, 512])" in msg
    assert "'caption_dropout_rate' must be a number, got the string 'x'" in msg
    assert msg.startswith("x.toml: 4 problems")


def test_bool_is_not_an_int():
    assert "'batch_size' must be an integer, got the boolean true" in problems(
        '[[datasets]]\nbatch_size = true\n[[datasets.subsets]]\nimage_dir = "a"\n')


def test_out_of_range_values():
    msg = problems("""
[[datasets]]
resolution = 1000
validation_split = 1.5
[[datasets.subsets]]
image_dir = "a"
num_repeats = -1
keep_tokens = -2
resize_interpolation = "fancy"
caption_extension = "txt"
""")
    assert "'num_repeats' = -1 must be 1 or more" in msg
    assert "'keep_tokens' = -2 must be 0 or more" in msg
    assert "'validation_split' = 1.5 must be between 0.0 and 1.0" in msg
    assert "resolution 1000x1000 is not a multiple of bucket_reso_steps = 64; use [960, 960]" in msg
    assert "'resize_interpolation' = 'fancy' must be one of lanczos, nearest, bilinear" in msg
    assert "'caption_extension' = 'txt' has no '.'" in msg and 'write ".txt"' in msg


def test_bucket_limits_checked():
    msg = problems('[[datasets]]\nenable_bucket = true\nresolution = 512\nmin_bucket_reso = 1024\n'
                   'max_bucket_reso = 512\n[[datasets.subsets]]\nimage_dir = "a"\n')
    assert "min_bucket_reso 1024 is larger than max_bucket_reso 512" in msg
    msg = problems('[[datasets]]\nenable_bucket = true\nresolution = 1024\nmax_bucket_reso = 768\n'
                   '[[datasets.subsets]]\nimage_dir = "a"\n')
    assert "max_bucket_reso 768 is smaller than the resolution's long side 1024" in msg


def test_bucket_reso_steps_must_suit_the_family():
    text = '[[datasets]]\nbucket_reso_steps = 32\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "a"\n'
    assert "bucket_reso_steps = 32 must be a multiple of 64 for this model family" in problems(text)
    assert resolve(text, multiple=16).datasets[0].bucket_reso_steps == 32


def test_all_problems_reported_at_once_with_cli_problems():
    msg = problems('[general]\nflipaug = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n'
                   'prior_loss_weight = 1.0\nface_crop_aug_range = [2.0, 4.0]\nsample_ratio = 0.5\n',
                   "--caption_dropout_rate", "1.5")
    assert "5 problems" in msg
    assert "general: unknown key 'flipaug' (did you mean flip_aug?)" in msg
    assert "'prior_loss_weight' is a command-line option, not a dataset-config key; pass --prior_loss_weight" in msg
    assert "'face_crop_aug_range': face-centred crop augmentation is not supported yet" in msg
    assert "'sample_ratio' not supported yet" in msg
    assert "command line: --caption_dropout_rate 1.5 must be between 0.0 and 1.0" in msg


def test_structure_errors():
    assert "unknown section 'dataset' (did you mean [datasets]?)" in problems('[[dataset]]\nimage_dir = "a"\n')
    assert "no [[datasets]] section" in problems("[general]\nflip_aug = true\n")
    assert "'resolution' is outside any section; it belongs in [general] or [[datasets]]" in problems(
        'resolution = 512\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n')
    assert "datasets: must be an array of tables: write [[datasets]] (two brackets)" in problems(
        '[datasets]\nresolution = 512\n')
    assert "'interpolation_type' and 'resize_interpolation' are the same setting; keep one" in problems(
        '[[datasets]]\nresize_interpolation = "area"\ninterpolation_type = "area"\n[[datasets.subsets]]\n'
        'image_dir = "a"\n') or "'resize_interpolation' and 'interpolation_type'" in problems(
        '[[datasets]]\nresize_interpolation = "area"\ninterpolation_type = "area"\n[[datasets.subsets]]\n'
        'image_dir = "a"\n')


def test_styles_and_required_keys():
    msg = problems('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n[[datasets.subsets]]\n'
                   'metadata_file = "m.json"\n[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n')
    assert "datasets[0]: mixes DreamBooth subsets" in msg
    assert "datasets[1].subsets[0]: needs image_dir" in msg


def test_conditioning_data_dir_must_be_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    msg = problems('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nconditioning_data_dir = "masks"\n',
                   check_paths=True)
    assert "conditioning_data_dir 'masks' is not a folder" in msg


def test_missing_folder_is_reported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = problems('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "nope"\n', check_paths=True)
    assert "image_dir 'nope' is not a folder (relative paths start from the current directory" in msg


def test_invalid_toml_syntax(tmp_path):
    p = write_toml(tmp_path / "bad.toml", '[[datasets]]\nimage_dir = C:\\x\n')
    with pytest.raises(DatasetError, match="invalid TOML"):
        load_config_file(p)


# ------------------------------------------------------------------------------ folder layout

def test_folder_name_parsing():
    assert parse_folder_name("10_sks dog") == (10, "sks dog")
    assert parse_folder_name("3_a_b") == (3, "a_b")
    assert parse_folder_name("images") is None


def test_dreambooth_folder_layout(tmp_path):
    make_folder(tmp_path / "train" / "10_sks dog", [(64, 64), (64, 64)], captions=["own caption", None])
    make_folder(tmp_path / "train" / "2_cat", [(64, 64)])
    make_folder(tmp_path / "train" / "junk", [(64, 64)])
    make_folder(tmp_path / "reg" / "1_dog", [(64, 64)] * 30)
    train, _ = build_datasets(parse_args("--train_data_dir", str(tmp_path / "train"), "--reg_data_dir",
                                         str(tmp_path / "reg"), "--resolution", "64", "--caption_extension", ".txt"))
    ds = train.datasets[0]
    specs = [i.spec for i in ds.subsets]
    assert [(s.num_repeats, s.class_tokens, s.is_reg) for s in specs] == [(10, "sks dog", False), (2, "cat", False),
                                                                        (1, "dog", True)]
    assert sorted(it.caption for it in ds.items if not ds.subsets[it.subset_index].spec.is_reg) == \
        ["cat", "own caption", "sks dog"]
    assert train.num_train_images == 22 and train.num_reg_images == 30
    assert any("junk" in n and "is not used" in n for n in train.notes)
    meta = group_metadata(train)
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_sks dog": {"n_repeats": 10, "img_count": 2},
                                                   "2_cat": {"n_repeats": 2, "img_count": 1}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_dog": {"n_repeats": 1, "img_count": 30}}
    assert meta["ss_resolution"] == "(64, 64)"


def test_no_dataset_given_is_an_error():
    with pytest.raises(ConfigError, match="pass --dataset_config"):
        build_datasets(parse_args())


def test_config_and_train_dir_together_warns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_folder("imgs", [(64, 64)])
    cfg = write_toml("d.toml", '[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "imgs"\n')
    train, _ = build_datasets(parse_args("--dataset_config", cfg, "--train_data_dir", "imgs"))
    assert any("--train_data_dir/--reg_data_dir are not used" in n for n in train.notes)


def test_empty_dataset_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("imgs")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG broken")
    cfg = write_toml("d.toml", '[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "imgs"\n')
    with pytest.raises(DatasetError, match=r"no training images found \(1 images were skipped as unreadable\)"):
        build_datasets(parse_args("--dataset_config", cfg))
