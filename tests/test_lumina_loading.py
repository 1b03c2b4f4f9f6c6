"""Lumina Image 2.0 loaders: both DiT layouts, sizes from shapes, dtypes, the all-in-one file,
and refusals of other files with what they look like."""

from __future__ import annotations

import pytest
import torch

from library.autoencoders import load_flux_ae
from library.errors import ModelFileError
from library.lumina.gemma2 import embedded_spiece_model, load_gemma2
from library.lumina.loading import COMFY_PREFIX, inspect_lumina_checkpoint, load_lumina_dit
from library.safetensors_io import load_file, save_file_atomic
from library.tiny.flux import write_flux_dit, write_t5xxl
from library.tiny.lumina import (lumina_state_dict, tiny_lumina_params, write_gemma2, write_lumina_dit,
                                 write_tiny_lumina_set)
from library.tiny.tokenizers import build_gemma_spiece_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("lumina")
    tiny = write_tiny_lumina_set(out, layout="alpha-vllm", seed=3)
    comfy = write_lumina_dit(out / "lumina_2_model_bf16.safetensors", layout="comfy", seed=3, dtype=torch.bfloat16)
    return {"alpha": tiny.dit, "comfy": comfy, "gemma2": tiny.gemma2, "ae": tiny.ae, "dir": out}


def test_both_layouts_are_detected_with_sizes_from_the_shapes(files):
    params = tiny_lumina_params()
    alpha, comfy = inspect_lumina_checkpoint(files["alpha"]), inspect_lumina_checkpoint(files["comfy"])
    assert (alpha.prefix, alpha.dtype) == ("", torch.float32)
    assert (comfy.prefix, comfy.dtype) == (COMFY_PREFIX, torch.bfloat16)
    assert alpha.params == comfy.params == params
    assert (params.n_heads, params.n_kv_heads, params.head_dim) == (2, 1, 96)


def test_loaded_model_equals_the_file(files):
    model, info = load_lumina_dit(files["alpha"])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    state = load_file(files["alpha"])
    assert set(state) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key

    comfy, _ = load_lumina_dit(files["comfy"])
    assert comfy.layers[0].attention.qkv.weight.dtype == torch.bfloat16, "None keeps the file dtype"
    assert torch.equal(comfy.layers[1].feed_forward.w2.weight, state["layers.1.feed_forward.w2.weight"].bfloat16())
    upcast, _ = load_lumina_dit(files["comfy"], dtype=torch.float32)
    assert upcast.x_embedder.weight.dtype == torch.float32


def test_fp8_storage_keeps_matrices_in_fp8_and_vectors_in_bf16(files):
    model, _ = load_lumina_dit(files["alpha"], dtype=torch.float8_e4m3fn)
    assert model.layers[0].attention.qkv.weight.dtype == torch.float8_e4m3fn
    assert model.layers[0].attention.q_norm.weight.dtype == torch.bfloat16
    assert model.final_layer.linear.bias.dtype == torch.bfloat16


def test_a_file_without_the_unused_norm_final_loads(tmp_path):
    state = lumina_state_dict(seed=1)
    state.pop("norm_final.weight")
    save_file_atomic(state, tmp_path / "no_norm.safetensors")
    model, _ = load_lumina_dit(tmp_path / "no_norm.safetensors")
    assert torch.equal(model.norm_final.weight, torch.ones_like(model.norm_final.weight))


def test_all_in_one_file_gives_each_loader_its_part(tmp_path, files):
    """Comfy-Org's all-in-one lumina_2.safetensors: DiT, Gemma2 (+ tokenizer) and AE in one file."""
    parts = {COMFY_PREFIX + k: v for k, v in load_file(files["alpha"]).items()}
    gemma = load_file(files["gemma2"])
    parts |= {"text_encoders.gemma2_2b.transformer." + k: v for k, v in gemma.items() if k != "spiece_model"}
    parts["text_encoders.gemma2_2b.spiece_model"] = gemma["spiece_model"]
    parts["text_encoders.gemma2_2b.logit_scale"] = torch.tensor(1.0)
    parts |= {"vae." + k: v for k, v in load_file(files["ae"]).items()}
    save_file_atomic(parts, tmp_path / "lumina_2.safetensors")

    dit, info = load_lumina_dit(tmp_path / "lumina_2.safetensors")
    assert info.prefix == COMFY_PREFIX
    assert torch.equal(dit.x_embedder.weight, load_file(files["alpha"])["x_embedder.weight"])
    gemma2 = load_gemma2(tmp_path / "lumina_2.safetensors")
    assert torch.equal(gemma2.embed_tokens.weight, gemma["model.embed_tokens.weight"])
    assert embedded_spiece_model(tmp_path / "lumina_2.safetensors") == build_gemma_spiece_model()
    assert load_flux_ae(tmp_path / "lumina_2.safetensors").config.z_channels == 16


def test_the_ae_is_the_flux_ae(files):
    ae = load_flux_ae(files["ae"])
    latents = ae.encode(torch.rand(1, 3, 32, 32) * 2 - 1, sample=False)
    assert latents.shape == (1, 16, 4, 4)


@pytest.mark.parametrize("kind,needle", [("flux", "a FLUX.1 DiT"), ("ae", "an autoencoder"),
                                         ("gemma2", "a Gemma2 text encoder"), ("t5", "a T5 text encoder")])
def test_other_files_are_refused_as_the_dit_by_name(tmp_path, files, kind, needle):
    path = {"ae": files["ae"], "gemma2": files["gemma2"]}.get(kind)
    if kind == "flux":
        path = write_flux_dit(tmp_path / "flux.safetensors", "schnell")
    elif kind == "t5":
        path = write_t5xxl(tmp_path / "t5.safetensors")
    with pytest.raises(ModelFileError, match=f"expected a Lumina Image 2.0 DiT.*looks like {needle}"):
        load_lumina_dit(path)


def test_lora_diffusers_and_foreign_next_dit_files_are_refused(tmp_path, files):
    lora = {"lora_unet_layers_0_attention_qkv.lora_down.weight": torch.zeros(4, 192)}
    save_file_atomic(lora, tmp_path / "lora.safetensors")
    with pytest.raises(ModelFileError, match="looks like a LoRA file"):
        inspect_lumina_checkpoint(tmp_path / "lora.safetensors")

    save_file_atomic({"time_caption_embed.caption_embedder.0.weight": torch.ones(8)}, tmp_path / "diff.safetensors")
    with pytest.raises(ModelFileError, match="diffusers layout"):
        inspect_lumina_checkpoint(tmp_path / "diff.safetensors")

    state = lumina_state_dict(seed=0)
    state["layers.0.attention.q_norm.weight"] = torch.ones(128)
    save_file_atomic(state, tmp_path / "next.safetensors")
    with pytest.raises(ModelFileError, match="attention head size 128; Lumina Image 2.0 uses 96"):
        inspect_lumina_checkpoint(tmp_path / "next.safetensors")

    with pytest.raises(ModelFileError, match="a folder"):
        inspect_lumina_checkpoint(files["dir"])
    with pytest.raises(ModelFileError, match="file not found"):
        inspect_lumina_checkpoint(tmp_path / "missing.safetensors")


def test_gemma2_loader_reads_sizes_and_refuses_other_files(tmp_path, files):
    gemma2 = load_gemma2(files["gemma2"])
    config = gemma2.config
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (128, 2, 256)
    assert (config.num_attention_heads, config.num_key_value_heads) == (2, 1)
    assert config.attn_logit_softcapping == 50.0 and config.query_pre_attn_scalar == 256, "from the bundled config"
    unprefixed = write_gemma2(tmp_path / "bare.safetensors", prefix="", with_tokenizer=False)
    assert torch.equal(load_gemma2(unprefixed).norm.weight, load_file(unprefixed)["norm.weight"])
    assert embedded_spiece_model(unprefixed) is None

    with pytest.raises(ModelFileError, match="expected a Gemma2 text encoder.*looks like a Lumina Image 2.0 DiT"):
        load_gemma2(files["alpha"])
    qwen_like = {k: v for k, v in load_file(unprefixed).items() if "feedforward_layernorm" not in k}
    qwen_like["layers.0.self_attn.q_norm.weight"] = torch.ones(256)
    save_file_atomic(qwen_like, tmp_path / "qwen.safetensors")
    with pytest.raises(ModelFileError, match="looks like a Qwen3 text encoder"):
        load_gemma2(tmp_path / "qwen.safetensors")


def test_tiny_cli_writes_the_comfy_layout(tmp_path, capsys):
    import json

    from library.tiny.__main__ import main

    assert main(["lumina", "--out", str(tmp_path), "--layout", "comfy", "--dtype", "bf16",
                 "--gemma2_without_tokenizer"]) == 0
    written = json.loads(capsys.readouterr().out)
    info = inspect_lumina_checkpoint(written["dit"])
    assert (info.prefix, info.dtype, written["layout"]) == (COMFY_PREFIX, torch.bfloat16, "comfy")
    assert embedded_spiece_model(written["gemma2"]) is None
    assert (tmp_path / "tokenizers" / "google_gemma-2-2b" / "tokenizer.json").is_file()
