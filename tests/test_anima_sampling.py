"""Anima sampling (shifted schedule, Euler, CFG) and the family's command-line options."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from library import attention
from library.anima.arguments import add_anima_arguments, apply_attention_options, check_anima_arguments
from library.anima.loading import load_anima_dit
from library.anima.sampling import AnimaConditioning, denoise, flow_shift_sigmas, generate_image, round_image_size
from library.anima.text import AnimaTextEncoding
from library.anima.vae import load_qwen_image_vae
from library.errors import ConfigError
from library.tiny.anima import write_tiny_anima_set


def test_schedule_is_shifted_linspace():
    sigmas = flow_shift_sigmas(4, 3.0)
    assert len(sigmas) == 5 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert sigmas[2] == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))
    assert flow_shift_sigmas(4, 1.0) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert round_image_size(1000, 50) == (992, 64)


class _Velocity(nn.Module):
    """v = context mean (per sample) everywhere: the Euler result is known in closed form."""

    def forward(self, x, t, context):
        return torch.ones_like(x) * context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_euler_and_cfg():
    noise = torch.zeros(1, 16, 2, 2)
    pos, neg = AnimaConditioning(torch.full((1, 3, 4), 2.0)), AnimaConditioning(torch.full((1, 3, 4), 0.5))
    sigmas = flow_shift_sigmas(5, 3.0)
    plain = denoise(_Velocity(), noise, pos, sigmas, progress=False)
    assert torch.allclose(plain, torch.full_like(noise, -2.0))  # x += (0 - 1) * v
    guided = denoise(_Velocity(), noise, pos, sigmas, neg=neg, cfg_scale=4.0, progress=False)
    assert torch.allclose(guided, torch.full_like(noise, -(0.5 + 4.0 * (2.0 - 0.5))))
    assert torch.equal(denoise(_Velocity(), noise, pos, sigmas, neg=neg, cfg_scale=1.0, progress=False), plain)
    with pytest.raises(ValueError, match="negative conditioning"):
        denoise(_Velocity(), noise, pos, sigmas, cfg_scale=2.0, progress=False)


def test_generate_image_with_tiny_models(tmp_path):
    paths = write_tiny_anima_set(tmp_path)
    model, _ = load_anima_dit(paths.dit)
    vae = load_qwen_image_vae(paths.vae)
    enc = AnimaTextEncoding.from_files(paths.qwen3, tokenizer_cache_dir=paths.tokenizer_cache_dir,
                                       qwen3_max_length=8, t5_max_length=8)
    cond = AnimaConditioning.from_text(model, enc.encode(["a photo of a cat"]))
    neg = AnimaConditioning.from_text(model, enc.encode([""]))
    assert cond.context.shape == (1, 512, 128)
    kwargs = dict(width=72, height=40, steps=2, seed=3, progress=False)
    a = generate_image(model, vae, cond, neg=neg, **kwargs)
    b = generate_image(model, vae, cond, neg=neg, **kwargs)
    c = generate_image(model, vae, cond, neg=neg, cfg_scale=1.0, **kwargs)
    assert a.size == (64, 64) and a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_anima_arguments(parser)
    return parser.parse_args(["--qwen3", "q", "--vae", "v", *argv])


def test_option_defaults():
    args = _args()
    assert (args.attn_mode, args.split_attn, args.qwen3_max_token_length, args.t5_max_token_length,
            args.vae_chunk_size, args.vae_disable_cache) == ("torch", False, 512, 512, None, False)
    check_anima_arguments(args, training=True)


def test_option_checks_report_every_problem():
    with pytest.raises(ConfigError) as e:
        check_anima_arguments(_args("--attn_mode", "xformers", "--vae_chunk_size", "0"), training=True)
    assert "--attn_mode xformers needs --split_attn" in str(e.value) and "--vae_chunk_size" in str(e.value)
    with pytest.raises(ConfigError, match="sageattn has no backward pass"):
        check_anima_arguments(_args("--attn_mode", "sageattn"), training=True)
    check_anima_arguments(_args("--attn_mode", "sageattn"), training=False)
    with pytest.raises(ConfigError, match="--qwen3 is required"):
        check_anima_arguments(argparse.Namespace(**{**vars(_args()), "qwen3": None}), training=True)


def test_attention_options_reach_the_model(tmp_path):
    class Model(nn.Module):
        split = None

        def set_split_attn(self, enabled):
            self.split = enabled

    model = Model()
    try:
        apply_attention_options(_args("--split_attn"), model)
        assert model.split is True and attention.get_attention_backend() == "sdpa"
        if __import__("importlib").util.find_spec("sageattention") is None:
            with pytest.raises(ConfigError, match="needs the `sageattention` package"):
                apply_attention_options(_args("--attn_mode", "sageattn"), model)
    finally:
        attention.set_attention_backend("sdpa")
