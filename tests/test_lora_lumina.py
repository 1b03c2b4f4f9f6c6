"""Lumina Image 2.0 LoRA targets and defaults (networks/lora_lumina.py) on the real Next-DiT
(tiny for behaviour, full size on the meta device for names and counts) and a tiny Gemma2."""

from __future__ import annotations

import logging

import pytest
import torch

from library.errors import ConfigError, ModelFileError
from library.lumina.model import VARIANTS, NextDiT
from library.safetensors_io import load_file
from library.tiny.lumina import build_lumina_model, random_gemma2, tiny_lumina_params
from networks import lora_lumina

BLOCK_LAYERS = ("attention_qkv", "attention_out", "feed_forward_w1", "feed_forward_w2", "feed_forward_w3",
                "adaLN_modulation_1")


def tiny_dit(seed: int = 0) -> NextDiT:
    return build_lumina_model(tiny_lumina_params(), seed=seed).eval().requires_grad_(False)


def full_size_dit() -> NextDiT:
    with torch.device("meta"):
        return NextDiT(VARIANTS["lumina2"].params)


def create(dit, dim=4, alpha=1.0, text_encoders=None, **args):
    return lora_lumina.create_network(1.0, dim, alpha, None, text_encoders, dit, **args)


def ranks(network) -> dict[str, int]:
    return {m.lora_name: m.rank for m in network.loras}


def randomize(network, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.1)


def expected_unet_names(n_layers: int, n_refiners: int) -> set[str]:
    names = {f"lora_unet_{kind}_{i}_{layer}" for kind, n in (("layers", n_layers), ("noise_refiner", n_refiners))
             for i in range(n) for layer in BLOCK_LAYERS}
    names |= {f"lora_unet_context_refiner_{i}_{layer}" for i in range(n_refiners) for layer in BLOCK_LAYERS[:5]}
    return names | {"lora_unet_final_layer_linear", "lora_unet_final_layer_adaLN_modulation_1"}


def test_default_targets_are_the_180_sd_scripts_names_on_the_2b_model():
    network = create(full_size_dit())
    assert set(ranks(network)) == expected_unet_names(26, 2)
    assert len(network.loras) == 180 and set(ranks(network).values()) == {4}
    qkv = network.lora_unet_layers_25_attention_qkv
    assert (qkv.lora_down.weight.shape, qkv.lora_up.weight.shape) == ((4, 2304), (3840, 4))


def test_gemma2_modules_use_the_lora_te_prefix_and_are_dropped_when_unet_only():
    gemma2 = random_gemma2(seed=1)
    network = create(tiny_dit(), text_encoders=[gemma2])
    te = {m.lora_name for m in network.text_encoder_loras}
    assert te == {f"lora_te_layers_{i}_{part}" for i in range(2) for part in (
        "self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_o_proj",
        "mlp_gate_proj", "mlp_up_proj", "mlp_down_proj")}
    assert all(m.text_encoder_index == 0 for m in network.text_encoder_loras)
    network.apply_to([gemma2], None, apply_text_encoder=False, apply_unet=True)  # --network_train_unet_only
    assert not network.text_encoder_loras and len(network.unet_loras) == len(expected_unet_names(2, 2))
    network.restore()


def test_per_component_dims_follow_the_guide_and_embedders_are_added():
    network = create(full_size_dit(), dim=16, attn_dim="8", mlp_dim="2", mod_dim="3", refiner_dim="5",
                     embedder_dims="[6,7,0]")
    r = ranks(network)
    assert r["lora_unet_layers_0_attention_qkv"] == r["lora_unet_noise_refiner_1_attention_out"] == 8
    assert r["lora_unet_layers_3_feed_forward_w2"] == 2
    assert r["lora_unet_context_refiner_0_feed_forward_w1"] == 5, "refiner_dim before mlp_dim, as sd-scripts ranks it"
    assert r["lora_unet_layers_3_adaLN_modulation_1"] == r["lora_unet_final_layer_adaLN_modulation_1"] == 3
    assert r["lora_unet_final_layer_linear"] == 16, "no type matches: the base rank"
    assert r["lora_unet_x_embedder"] == 6 and r["lora_unet_t_embedder_mlp_0"] == r["lora_unet_t_embedder_mlp_2"] == 7
    assert "lora_unet_cap_embedder_1" not in r, "rank 0 skips the caption embedder"

    only_refiner = ranks(create(tiny_dit(), dim=16, refiner_dim="5"))
    assert only_refiner["lora_unet_noise_refiner_0_adaLN_modulation_1"] == 5
    assert only_refiner["lora_unet_context_refiner_1_feed_forward_w3"] == 5
    assert only_refiner["lora_unet_layers_0_feed_forward_w3"] == 16
    zero_attn = ranks(create(tiny_dit(), attn_dim="0"))
    assert not any("attention" in n for n in zero_attn) and len(zero_attn) == len(expected_unet_names(2, 2)) - 6 * 2


@pytest.mark.parametrize("blocks,prefixes", [
    ("transformer", ("lora_unet_layers_",)),
    ("refiners", ("lora_unet_noise_refiner_", "lora_unet_context_refiner_")),
    ("noise_refiner", ("lora_unet_noise_refiner_",)),
    ("context_refiner", ("lora_unet_context_refiner_",)),
])
def test_train_blocks(blocks, prefixes):
    names = set(ranks(create(tiny_dit(), train_blocks=blocks)))
    assert names == {n for n in expected_unet_names(2, 2) if n.startswith(prefixes)}


def test_reg_dims_win_and_reg_lrs_set_group_lrs(caplog):
    network = create(tiny_dit(), dim=4, attn_dim="8",
                     network_reg_dims=r"layers_1_.*qkv=2,final_layer=0", network_reg_lrs="refiner=1e-5",
                     verbose="True")
    r = ranks(network)
    assert r["lora_unet_layers_1_attention_qkv"] == 2 and r["lora_unet_layers_0_attention_qkv"] == 8
    assert not any(n.startswith("lora_unet_final_layer") for n in r)
    assert network.lora_unet_noise_refiner_0_attention_qkv.lr == 1e-5 and network.lora_unet_layers_0_attention_out.lr \
        is None
    with caplog.at_level(logging.INFO):
        create(tiny_dit(), verbose="True")
    assert "lora_unet_layers_0_attention_qkv" in caplog.text, "verbose lists every module"


def test_bad_network_args_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="'atn_dim' is not a network_args key.*did you mean 'attn_dim'"):
        create(tiny_dit(), atn_dim="4")
    with pytest.raises(ConfigError, match=r"embedder_dims=\[4,4\]: expected 3 comma-separated ranks"):
        create(tiny_dit(), embedder_dims="[4,4]")
    with pytest.raises(ConfigError, match="train_blocks=single: expected one of all, transformer"):
        create(tiny_dit(), train_blocks="single")
    with pytest.raises(ConfigError, match="no convolution layers"):
        create(tiny_dit(), conv_dim="4")
    with pytest.raises(ConfigError, match="needs a Lumina Image 2.0 Next-DiT"):
        create(torch.nn.Linear(2, 2))


def test_merge_equals_inject():
    dit = tiny_dit(seed=3)
    network = create(dit, dim=4, alpha=2.0, embedder_dims="[2,2,2]")
    randomize(network, seed=1)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 4, 6, generator=g), torch.rand(2, generator=g)
    cap = torch.randn(2, 5, dit.params.cap_feat_dim, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5])
    with torch.no_grad():
        base = dit(x, t, cap, mask)
        network.apply_to(None, dit, apply_text_encoder=False, apply_unet=True)
        injected = dit(x, t, cap, mask)
        network.merge_to()
        merged = dit(x, t, cap, mask)
    assert (injected - base).abs().max() > 1e-3, "the LoRA must change the output"
    assert (merged - injected).abs().max() <= 1e-5


def test_split_qkv_separates_q_k_v_and_saves_fused(tmp_path):
    dit = tiny_dit()
    network = create(dit, dim=2, split_qkv="True")
    qkv = network.lora_unet_layers_0_attention_qkv
    assert qkv.split_dims == (192, 96, 96) and qkv.rank == 6 and float(qkv.alpha) == 3.0
    network.save_weights(tmp_path / "split.safetensors", None, {})
    sd = load_file(tmp_path / "split.safetensors")
    assert sd["lora_unet_layers_0_attention_qkv.lora_up.weight"].shape == (384, 6)


def test_saved_file_round_trips_through_create_network_from_weights(tmp_path):
    gemma2 = random_gemma2(seed=2)
    dit = tiny_dit()
    trained = create(dit, dim=4, alpha=4.0, text_encoders=[gemma2], mod_dim="2", embedder_dims="[3,0,5]")
    randomize(trained)
    trained.apply_to([gemma2], dit, apply_text_encoder=True, apply_unet=True)
    path = tmp_path / "lumina_lora.safetensors"
    trained.save_weights(path, torch.bfloat16, {"ss_network_module": "networks.lora_lumina"})
    trained.restore()
    sd = load_file(path)
    assert sd["lora_unet_layers_0_adaLN_modulation_1.lora_down.weight"].shape[0] == 2
    assert sd["lora_unet_cap_embedder_1.lora_down.weight"].shape[0] == 5
    assert sd["lora_te_layers_1_mlp_down_proj.lora_up.weight"].shape[1] == 4
    assert float(sd["lora_unet_final_layer_linear.alpha"]) == 4.0

    network, weights = lora_lumina.create_network_from_weights(1.0, path, None, [gemma2], tiny_dit())
    assert ranks(network) == ranks(trained)
    network.load_weights(weights)
    with pytest.raises(ModelFileError, match="Gemma2 text-encoder modules"):
        lora_lumina.create_network_from_weights(1.0, path, None, None, tiny_dit())
    with pytest.raises(ConfigError, match="come from the weights file"):
        lora_lumina.create_network_from_weights(1.0, path, None, None, tiny_dit(), attn_dim="4")


def test_a_flux_lora_is_refused_naming_its_family():
    sd = {}
    for i in range(2):
        name = f"lora_unet_double_blocks_{i}_img_attn_qkv"
        sd |= {f"{name}.lora_down.weight": torch.zeros(4, 16), f"{name}.lora_up.weight": torch.zeros(48, 4),
               f"{name}.alpha": torch.tensor(4.0)}
    with pytest.raises(ModelFileError, match=r"does not fit the Lumina Image 2.0 model.*FLUX"):
        lora_lumina.create_network_from_weights(1.0, None, None, None, tiny_dit(), weights_sd=sd)


def test_diffusers_lumina2_lora_converter_takes_the_block_modules():
    """diffusers' Lumina2 LoRA loader reads only `diffusion_model.<module>.lora_A/B` files (not the
    sd-scripts `lora_unet_` naming ComfyUI reads) and only the blocks' modules. Renamed that way,
    our full-size block modules convert onto exactly the diffusers model's layers and shapes."""
    from diffusers import Lumina2Transformer2DModel
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lumina2_lora_to_diffusers

    dit = full_size_dit()
    network = create(dit, dim=2, network_reg_dims="final_layer=0")
    module_paths = {"lora_unet_" + path.replace(".", "_"): path for path, _ in dit.named_modules()}
    renamed = {}
    for key, value in network.state_dict().items():
        name, _, suffix = key.partition(".")
        if suffix != "alpha":
            part = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}[suffix]
            renamed[f"diffusion_model.{module_paths[name]}.{part}"] = value
    converted = _convert_non_diffusers_lumina2_lora_to_diffusers(renamed)

    with torch.device("meta"):
        ref = Lumina2Transformer2DModel(cap_feat_dim=2304)
    linears = {path: m for path, m in ref.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = {k.removeprefix("transformer.").rsplit(".", 2)[0] for k in converted}
    assert len(targets) == 26 * 8 + 2 * 8 + 2 * 7, "q, k, v, out, w1-w3 (+ norm1.linear when modulated)"
    for key, value in converted.items():
        path, kind = key.removeprefix("transformer.").rsplit(".", 2)[0], key.split(".")[-2]
        layer = linears[path]
        assert value.shape == ((2, layer.in_features) if kind == "lora_A" else (layer.out_features, 2)), key
