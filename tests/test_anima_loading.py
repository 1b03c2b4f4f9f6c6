"""Anima DiT loading: `net.` prefix, sizes from shapes (depth, width, heads), the LLM adapter from the
DiT file or --llm_adapter_path, and refusals of other files with a message naming what they are."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from library.anima.loading import dit_params_from_shapes, inspect_anima_checkpoint, load_anima_dit
from library.anima.model import ANIMA_PARAMS, DEPTH_VARIANTS, Anima
from library.errors import ModelFileError
from library.safetensors_io import load_file, save_file_atomic
from library.tiny import anima as tiny
from library.tiny.flux import write_ae, write_flux_dit


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("anima_files")
    params = tiny.tiny_anima_params()
    return dict(
        params=params,
        comfy=tiny.write_anima_dit(d / "comfy.safetensors", params=params, seed=1),
        plain=tiny.write_anima_dit(d / "plain.safetensors", params=params, seed=1, prefix=""),
        deep=tiny.write_anima_dit(d / "deep.safetensors", params=tiny.tiny_anima_params(3), seed=2),
        no_adapter=tiny.write_anima_dit(d / "no_adapter.safetensors", params=params, seed=1, with_adapter=False),
        adapter=tiny.write_llm_adapter(d / "adapter.safetensors", params=params, seed=3),
        qwen3=tiny.write_qwen3(d / "qwen3.safetensors"),
        vae=tiny.write_vae(d / "vae.safetensors"),
        flux=write_flux_dit(d / "flux.safetensors"),
        ae=write_ae(d / "ae.safetensors"),
        dir=d,
    )


def test_comfy_prefix_and_plain_files_load_the_same_model(files):
    a, info_a = load_anima_dit(files["comfy"])
    b, info_b = load_anima_dit(files["plain"])
    assert (info_a.prefix, info_b.prefix) == ("net.", "")
    assert info_a.params == info_b.params == files["params"]
    expected = tiny.anima_state_dict(files["params"], seed=1)
    for model in (a, b):
        state = model.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)
        assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_sizes_come_from_the_shapes(files):
    info = inspect_anima_checkpoint(files["deep"])
    assert info.params.num_blocks == 3
    assert (info.params.model_channels, info.params.num_heads, info.params.head_dim) == (256, 2, 128)
    assert info.params.adaln_lora_dim == 64 and info.params.crossattn_emb_channels == 128
    assert info.params.llm_adapter == files["params"].llm_adapter
    assert info.adapter_path == files["deep"] and info.adapter_prefix == "net.llm_adapter."


@pytest.mark.parametrize("depth", [20, 28, 36])
def test_full_size_shapes_give_the_real_config(depth):
    with torch.device("meta"):
        model = Anima(DEPTH_VARIANTS[depth])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    adapter = {k[len("llm_adapter."):]: v for k, v in shapes.items() if k.startswith("llm_adapter.")}
    from library.anima.loading import adapter_params_from_shapes

    params = dit_params_from_shapes("x", shapes, adapter_params_from_shapes("x", adapter))
    assert params == replace(ANIMA_PARAMS, num_blocks=depth)
    assert params.head_dim == 128 and params.max_blocks_to_swap == depth - 2


def test_dtype_is_kept_or_cast(files):
    model, info = load_anima_dit(files["comfy"], dtype=torch.bfloat16)
    assert info.dtype == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_adapter_from_a_separate_file(files):
    model, info = load_anima_dit(files["no_adapter"], llm_adapter_path=files["adapter"])
    assert info.adapter_path == files["adapter"] and info.adapter_prefix == ""
    adapter = load_file(files["adapter"])
    assert all(torch.equal(model.llm_adapter.state_dict()[k], v) for k, v in adapter.items())


def test_separate_adapter_wins_over_the_one_in_the_dit(files, caplog):
    with caplog.at_level(logging.INFO):
        model, _ = load_anima_dit(files["comfy"], llm_adapter_path=files["adapter"])
    adapter = load_file(files["adapter"])
    assert torch.equal(model.llm_adapter.embed.weight, adapter["embed.weight"])
    assert "instead of the one in the DiT file" in caplog.text


def test_adapter_file_with_prefixed_keys(files):
    path = files["dir"] / "adapter_prefixed.safetensors"
    save_file_atomic({f"llm_adapter.{k}": v for k, v in load_file(files["adapter"]).items()}, path)
    model, info = load_anima_dit(files["no_adapter"], llm_adapter_path=path)
    assert info.adapter_prefix == "llm_adapter."


def test_dit_without_adapter_is_refused(files):
    with pytest.raises(ModelFileError, match=r"has no LLM adapter .*Cosmos-Predict2.*--llm_adapter_path"):
        load_anima_dit(files["no_adapter"])


@pytest.mark.parametrize("kind, expected", [
    ("flux", "a FLUX.1 DiT"),
    ("qwen3", "a Qwen3 text encoder"),
    ("vae", "a Qwen-Image / Wan 3-D causal VAE"),
    ("ae", "an autoencoder"),
    ("adapter", "an Anima LLM adapter"),
])
def test_other_files_are_refused_by_name(files, kind, expected):
    with pytest.raises(ModelFileError) as e:
        load_anima_dit(files[kind])
    assert "expected an Anima DiT" in str(e.value) and expected in str(e.value)
    assert "--pretrained_model_name_or_path" in str(e.value)


def test_lora_file_is_refused(files):
    path = files["dir"] / "lora.safetensors"
    save_file_atomic({"lora_unet_blocks_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 8)}, path)
    with pytest.raises(ModelFileError, match="a LoRA file"):
        load_anima_dit(path)


def test_wrong_adapter_path_is_refused(files):
    with pytest.raises(ModelFileError, match=r"expected an Anima LLM adapter.*Qwen-Image / Wan.*--llm_adapter_path"):
        load_anima_dit(files["no_adapter"], llm_adapter_path=files["vae"])


def test_missing_tensor_is_named(files):
    state = load_file(files["comfy"])
    del state["net.blocks.1.mlp.layer2.weight"]
    path = files["dir"] / "broken.safetensors"
    save_file_atomic(state, path)
    with pytest.raises(ModelFileError, match=r"net\.blocks\.1\.mlp\.layer2\.weight is missing"):
        load_anima_dit(path)


def test_known_buffers_are_ignored_and_unknown_extras_warned(files, caplog):
    state = load_file(files["comfy"])
    state["net.pos_embedder.seq"] = torch.arange(256.0)
    state["net.pos_embedder.dim_spatial_range"] = torch.zeros(21)
    state["net.accum_iteration"] = torch.zeros(())
    path = files["dir"] / "buffers.safetensors"
    save_file_atomic(state, path)
    with caplog.at_level(logging.WARNING):
        load_anima_dit(path)
    assert "ignoring" not in caplog.text
    state["net.something_else.weight"] = torch.zeros(2)
    save_file_atomic(state, path)
    with caplog.at_level(logging.WARNING):
        load_anima_dit(path)
    assert "ignoring 1 tensors" in caplog.text and "net.something_else.weight" in caplog.text


def test_mismatched_adapter_width_is_refused(files):
    other = tiny.tiny_anima_params()
    wide = replace(other, llm_adapter=replace(other.llm_adapter, target_dim=64, model_dim=64, num_heads=1))
    path = files["dir"] / "wide_adapter.safetensors"
    tiny.write_llm_adapter(path, params=replace(wide, crossattn_emb_channels=64))
    with pytest.raises(ModelFileError, match="outputs 64 channels but the DiT's cross-attention takes 128"):
        load_anima_dit(files["no_adapter"], llm_adapter_path=path)


def test_tiny_cli_writes_a_loadable_set(tmp_path, capsys):
    import json

    from library.tiny.__main__ import main

    assert main(["anima", "--out", str(tmp_path), "--no_net_prefix", "--num_blocks", "3"]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert set(paths) == {"dit", "llm_adapter", "qwen3", "vae", "tokenizer_cache_dir", "t5_tokenizer"}
    info = inspect_anima_checkpoint(paths["dit"])
    assert info.prefix == "" and info.params.num_blocks == 3
