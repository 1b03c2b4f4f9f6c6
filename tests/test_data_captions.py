"""Caption processing order, each option's effect, reproducibility, and caption files."""

from __future__ import annotations

import random

import pytest

from library.data.captions import (
    CaptionOptions, count_tags, fixed_caption, process_caption, read_caption_file, resolve_token_warmup_step,
    wildcard_choice_count,
)
from library.errors import DatasetError


def run(caption: str, seed: int = 0, epoch: int = 1, step: int = 0, **kw) -> str:
    return process_caption(caption, CaptionOptions(**kw), random.Random(seed), epoch=epoch, step=step)


def many(caption: str, n: int = 200, **kw) -> list[str]:
    return [run(caption, seed=s, **kw) for s in range(n)]


def test_plain_caption_unchanged_and_first_line_only():
    assert run("a cat, on a mat") == "a cat, on a mat"
    assert run("line one\nline two") == "line one"


def test_prefix_and_suffix_are_joined_with_a_space():
    assert run("cat", prefix="photo of", suffix="4k") == "photo of cat 4k"


def test_prefix_suffix_apply_to_every_wildcard_line():
    outs = set(many("cat\ndog", enable_wildcard=True, prefix="p", suffix="s", n=50))
    assert outs == {"p cat s", "p dog s"}


def test_caption_dropout_rate_and_every_n_epochs():
    assert run("cat", dropout_rate=1.0, prefix="p") == ""
    assert set(many("cat", dropout_rate=0.0)) == {"cat"}
    drops = sum(c == "" for c in many("cat", n=2000, dropout_rate=0.25))
    assert 400 < drops < 600
    assert [run("cat", epoch=e, dropout_every_n_epochs=2) for e in (1, 2, 3, 4)] == ["cat", "", "cat", ""]


def test_dropout_happens_before_replacements():
    assert run("cat", dropout_rate=1.0, replacements=(("", "forced"),)) == ""
    assert run("a cat", replacements=(("cat", "dog"),)) == "a dog"
    assert run("a cat", replacements=(("", "whole"),)) == "whole"


def test_wildcards_choose_each_option_and_keep_escaped_braces():
    outs = set(many("a {red|green|blue} car", enable_wildcard=True))
    assert outs == {"a red car", "a green car", "a blue car"}
    assert run("literal {{x}} and {a}", enable_wildcard=True) == "literal {x} and a"
    # without enable_wildcard the braces stay
    assert run("a {red|green} car") == "a {red|green} car"


def test_wildcard_multi_line_picks_one_line():
    assert set(many("one\ntwo\nthree", enable_wildcard=True)) == {"one", "two", "three"}


def test_shuffle_keeps_tags_and_keep_tokens_fixed():
    outs = many("first, b, c, d, e", shuffle=True, keep_tokens=1)
    assert all(o.startswith("first, ") for o in outs)
    assert all(sorted(o.split(", ")) == ["b", "c", "d", "e", "first"] for o in outs)
    assert len(set(outs)) == 24  # every order of the 4 flexible tags shows up


def test_shuffle_normalises_separator_spacing_to_comma_space():
    assert run("a,b ,  c", shuffle=True, keep_tokens=3) == "a, b, c"


def test_keep_tokens_separator_fixed_prefix_and_suffix():
    outs = many("a, b ||| c, d, e ||| z, y", shuffle=True, keep_tokens_separator="|||")
    assert all(o.startswith("a, b, ") and o.endswith(", z, y") for o in outs)
    assert {tuple(sorted(o.split(", ")[2:5])) for o in outs} == {("c", "d", "e")}
    assert len(set(outs)) == 6


def test_keep_tokens_separator_is_removed_even_without_shuffle():
    # sd-scripts leaves "|||" in the caption when nothing is shuffled (docs/compatibility_data.md).
    assert run("a, b ||| c, d", keep_tokens_separator="|||") == "a, b, c, d"


def test_tag_dropout_only_touches_flexible_tags():
    assert run("keep, x, y, z", tag_dropout_rate=1.0, keep_tokens=1) == "keep"
    kept = [len(o.split(", ")) - 1 for o in many("k, a, b, c, d", n=1000, tag_dropout_rate=0.5, keep_tokens=1)]
    assert 1.7 < sum(kept) / len(kept) < 2.3


def test_token_warmup_truncates_flexible_tags():
    caption = "a, b, c, d, e"
    opts = dict(token_warmup_min=1, token_warmup_step=10)
    # n = floor(step * (5 - 1) / 10) + 1
    assert run(caption, step=0, **opts) == "a"
    assert run(caption, step=5, **opts) == "a, b, c"
    assert run(caption, step=9, **opts) == "a, b, c, d"
    assert run(caption, step=10, **opts) == caption
    assert resolve_token_warmup_step(0.5, 300) == 150
    assert resolve_token_warmup_step(20, None) == 20
    with pytest.raises(DatasetError, match="fraction of the training steps"):
        resolve_token_warmup_step(0.5, None)


def test_secondary_separator_keeps_groups_together_then_becomes_the_separator():
    outs = many("x;;;y, z", shuffle=True, secondary_separator=";;;")
    assert set(outs) == {"x,y, z", "z, x,y"}


def test_order_wildcard_then_shuffle_then_secondary():
    # the wildcard is expanded before the split, so its choice is one tag that gets shuffled
    outs = set(many("{p;;;q|r}, s", enable_wildcard=True, shuffle=True, secondary_separator=";;;"))
    assert outs == {"p,q, s", "s, p,q", "r, s", "s, r"}


def test_same_rng_seed_same_caption():
    kw = dict(shuffle=True, tag_dropout_rate=0.3, enable_wildcard=True, dropout_rate=0.2)
    cap = "a, {b|c}, d, e, f, g"
    assert [run(cap, seed=s, **kw) for s in range(30)] == [run(cap, seed=s, **kw) for s in range(30)]
    assert len({run(cap, seed=s, **kw) for s in range(30)}) > 10


def test_fixed_caption_for_text_caching():
    assert fixed_caption("a, b ||| c", CaptionOptions(keep_tokens_separator="|||", prefix="p", dropout_rate=0.5)) \
        == "p a, b, c"
    assert fixed_caption("a, b", CaptionOptions(shuffle=True)) is None
    assert fixed_caption("{a|b}", CaptionOptions(enable_wildcard=True)) is None
    assert fixed_caption("{a} {{b}}", CaptionOptions(enable_wildcard=True)) == "a {b}"
    assert wildcard_choice_count("x\ny {a|b|c}", CaptionOptions(enable_wildcard=True)) == 2 * 3
    assert wildcard_choice_count("x\ny", CaptionOptions()) == 1


def test_caption_file_reading(tmp_path):
    img = tmp_path / "photo.png"
    (tmp_path / "photo.txt").write_bytes("\ufefffirst line \nsecond\n\n third \n".encode("utf-8"))
    assert read_caption_file(str(img), ".txt", False).text == "first line"
    assert read_caption_file(str(img), ".txt", True).text == "first line\nsecond\nthird"
    assert read_caption_file(str(img), ".caption", False).text is None
    (tmp_path / "empty.txt").write_text("")
    found = read_caption_file(str(tmp_path / "empty.png"), ".txt", False)
    assert found.text == "" and found.path.endswith("empty.txt")


def test_face_crop_file_name_falls_back_to_the_base_stem(tmp_path):
    (tmp_path / "face.txt").write_text("base caption")
    assert read_caption_file(str(tmp_path / "face_1_2_3_4.png"), ".txt", False).text == "base caption"


def test_non_utf8_caption_names_the_file(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DatasetError, match=r"bad\.txt is not UTF-8"):
        read_caption_file(str(tmp_path / "bad.png"), ".txt", False)


def test_tag_frequency():
    assert count_tags(["A, b", "a,  c", ""]) == {"a": 2, "b": 1, "c": 1}
