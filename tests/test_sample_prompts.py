"""Sample-prompt files: .txt options and comments, .toml subsets, .json."""

import json

import pytest

from library.errors import ConfigError
from library.training.sample_prompts import load_sample_prompts, parse_prompt_line


def test_txt_options_comments_and_indented_hash(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# a comment\n\nA cat --w 768 --H 512 --d 42 --s 2000 --l 4.0 --g 0.0 "
                 "--n low quality, blurry\n  # indented is a prompt\n")
    prompts = load_sample_prompts(str(f))
    assert len(prompts) == 2
    p = prompts[0]
    assert (p.prompt, p.width, p.height, p.seed, p.scale, p.guidance_scale) == ("A cat", 768, 512, 42, 4.0, 0.0)
    assert p.sample_steps == 1000                    # clamped to 1..1000
    assert p.negative_prompt == "low quality, blurry"
    assert prompts[1].prompt == "# indented is a prompt" and prompts[1].index == 1


def test_bad_option_value_is_an_error():
    with pytest.raises(ConfigError, match="'--w big' is not a valid int"):
        parse_prompt_line("a dog --w big", 0)
    with pytest.raises(ConfigError, match="unknown option '--zz'"):
        parse_prompt_line("a dog --zz 3", 0)


def test_toml_and_json(tmp_path):
    t = tmp_path / "p.toml"
    t.write_text('[prompt]\nwidth = 512\nsample_steps = 4\n[[prompt.subset]]\nprompt = "one"\n'
                 '[[prompt.subset]]\nprompt = "two"\nwidth = 256\n')
    a, b = load_sample_prompts(str(t))
    assert (a.prompt, a.width, a.sample_steps, b.width, b.index) == ("one", 512, 4, 256, 1)
    j = tmp_path / "p.json"
    j.write_text(json.dumps(["three --h 320", {"prompt": "four", "seed": 7}]))
    c, d = load_sample_prompts(str(j))
    assert (c.prompt, c.height, d.prompt, d.seed) == ("three", 320, "four", 7)
