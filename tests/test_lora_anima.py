"""Anima LoRA targets and defaults (networks/lora_anima.py): exact key names (FORMATS 4.5), patterns,
regex ranks and lrs, the adapter and Qwen3 modules, save/reload, merge == inject, and diffusers'
Anima LoRA converter mapping our modules onto the same layers of its own models."""

from __future__ import annotations

import pytest
import torch

from library.anima.model import ANIMA_PARAMS, Anima
from library.errors import ConfigError, ModelFileError
from library.safetensors_io import load_file
from library.tiny.anima import anima_state_dict, random_qwen3, tiny_anima_params
from networks import lora_anima

LINEARS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_output_proj",
           "cross_attn_q_proj", "cross_attn_k_proj", "cross_attn_v_proj", "cross_attn_output_proj",
           "mlp_layer1", "mlp_layer2")
ADAPTER_LINEARS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_o_proj",
                   "cross_attn_q_proj", "cross_attn_k_proj", "cross_attn_v_proj", "cross_attn_o_proj",
                   "mlp_0", "mlp_2")


@pytest.fixture(scope="module")
def full():
    with torch.device("meta"):
        return Anima(ANIMA_PARAMS)


@pytest.fixture()
def tiny():
    params = tiny_anima_params()
    model = Anima(params)
    model.load_state_dict(anima_state_dict(params, seed=2))
    return model.eval().requires_grad_(False)


def names(network):
    return {m.lora_name for m in network.loras}


def ranks(network):
    return {m.lora_name: m.rank for m in network.loras}


def test_default_targets_are_the_280_block_linears(full):
    net = lora_anima.create_network(1.0, 4, 1.0, None, None, full)
    assert names(net) == {f"lora_unet_blocks_{i}_{n}" for i in range(28) for n in LINEARS}
    assert len(net.loras) == 280 and set(ranks(net).values()) == {4}
    assert all(float(m.alpha) == 1.0 for m in net.loras)


def test_llm_adapter_adds_60(full):
    net = lora_anima.create_network(1.0, 4, 1.0, None, None, full, train_llm_adapter="True")
    adapter = {f"lora_unet_llm_adapter_blocks_{i}_{n}" for i in range(6) for n in ADAPTER_LINEARS}
    assert adapter <= names(net) and len(net.loras) == 340


def test_include_overrides_the_builtin_exclude(full):
    net = lora_anima.create_network(1.0, 4, 1.0, None, None, full, include_patterns="['.*final_layer.*']")
    extra = names(net) - {f"lora_unet_blocks_{i}_{n}" for i in range(28) for n in LINEARS}
    assert extra == {"lora_unet_final_layer_linear", "lora_unet_final_layer_adaln_modulation_1",
                     "lora_unet_final_layer_adaln_modulation_2"}
    net = lora_anima.create_network(1.0, 4, 1.0, None, None, full,
                                    include_patterns="['x_embedder.proj.1', 't_embedder.1.linear_1']")
    assert {"lora_unet_x_embedder_proj_1", "lora_unet_t_embedder_1_linear_1"} <= names(net)
    assert "lora_unet_t_embedder_1_linear_2" not in names(net)


def test_exclude_patterns_use_fullmatch(full):
    net = lora_anima.create_network(1.0, 4, 1.0, None, None, full, exclude_patterns="['.*mlp.*']")
    assert len(net.loras) == 28 * 8 and not any("mlp" in n for n in names(net))
    # fullmatch: "mlp" alone matches no full name, so nothing is excluded.
    assert len(lora_anima.create_network(1.0, 4, 1.0, None, None, full, exclude_patterns="['mlp']").loras) == 280


def test_reg_dims_and_lrs_fullmatch_the_original_name(full):
    net = lora_anima.create_network(
        1.0, 4, 2.0, None, None, full,
        network_reg_dims=r".*self_attn.*=8,.*cross_attn.*=2,blocks\.(1|3)\.mlp\.layer1=0,blocks\.0\..*=16",
        network_reg_lrs=r".*cross_attn.*=5e-5,self_attn=1",
    )
    r = ranks(net)
    assert r["lora_unet_blocks_0_self_attn_q_proj"] == 16  # last matching pattern wins
    assert r["lora_unet_blocks_2_self_attn_q_proj"] == 8 and r["lora_unet_blocks_2_cross_attn_v_proj"] == 2
    assert r["lora_unet_blocks_2_mlp_layer1"] == 4
    assert "lora_unet_blocks_1_mlp_layer1" not in r and "lora_unet_blocks_3_mlp_layer1" not in r
    assert "lora_unet_blocks_1_mlp_layer2" in r
    lrs = {m.lora_name: m.lr for m in net.loras}
    assert lrs["lora_unet_blocks_5_cross_attn_k_proj"] == 5e-5
    assert lrs["lora_unet_blocks_5_self_attn_k_proj"] is None  # "self_attn" does not fullmatch
    assert all(float(m.alpha) == 2.0 for m in net.loras)  # alpha stays network_alpha
    groups, descriptions = net.prepare_optimizer_params(None, None, 1e-4)
    assert sorted(g["lr"] for g in groups) == [5e-5, 1e-4]


def test_qwen3_modules_and_dropouts_and_loraplus(tiny):
    qwen3 = random_qwen3()
    net = lora_anima.create_network(1.0, 4, 1.0, None, [qwen3], tiny, rank_dropout="0.1", module_dropout="0.2",
                                    loraplus_lr_ratio="4", loraplus_text_encoder_lr_ratio="2")
    te = {m.lora_name for m in net.text_encoder_loras}
    layers = qwen3.config.num_hidden_layers
    assert te == {f"lora_te_layers_{i}_{n}" for i in range(layers)
                  for n in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_o_proj",
                            "mlp_gate_proj", "mlp_up_proj", "mlp_down_proj")}
    assert all(m.rank_dropout == 0.1 and m.module_dropout == 0.2 for m in net.loras)
    groups, descriptions = net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    by_desc = {d: g["lr"] for d, g in zip(descriptions, groups)}
    assert by_desc == {"textencoder 1": 1e-5, "textencoder 1 plus": 2e-5, "unet": 1e-4, "unet plus": 4e-4}


def test_bad_args_are_refused(full):
    with pytest.raises(ConfigError, match="did you mean 'exclude_patterns'"):
        lora_anima.create_network(1.0, 4, 1.0, None, None, full, exclude_pattern="['.*mlp.*']")
    with pytest.raises(ConfigError, match="is not a valid regular expression"):
        lora_anima.create_network(1.0, 4, 1.0, None, None, full, include_patterns="['(unclosed']")
    with pytest.raises(ConfigError, match="Python list of quoted patterns"):
        lora_anima.create_network(1.0, 4, 1.0, None, None, full, include_patterns="[.*mlp.*]")
    with pytest.raises(ConfigError, match="needs an Anima DiT"):
        lora_anima.create_network(1.0, 4, 1.0, None, None, torch.nn.Linear(2, 2))


def _trained(network, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.05)
    return network


def _inputs(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 4, 6, generator=g), torch.tensor([0.4]),
            torch.randn(1, 6, params.crossattn_emb_channels, generator=g))


def test_save_reload_keys_and_ranks(tiny, tmp_path):
    net = _trained(lora_anima.create_network(1.0, 4, 8.0, None, None, tiny, train_llm_adapter="True",
                                             network_reg_dims=r".*cross_attn.*=2"))
    net.apply_to(None, tiny)
    path = tmp_path / "anima_lora.safetensors"
    net.save_weights(path, torch.float32, {"ss_network_module": "networks.lora_anima"})
    sd = load_file(path)
    assert sd["lora_unet_blocks_0_self_attn_q_proj.lora_down.weight"].shape == (4, 256)
    assert sd["lora_unet_blocks_1_cross_attn_k_proj.lora_up.weight"].shape == (256, 2)
    assert sd["lora_unet_llm_adapter_blocks_1_mlp_0.lora_down.weight"].shape == (4, 128)
    assert float(sd["lora_unet_blocks_0_mlp_layer2.alpha"]) == 8.0
    assert {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in sd} == names(net)
    net.restore()

    loaded, _ = lora_anima.create_network_from_weights(1.0, path, None, None, tiny, for_inference=True)
    assert ranks(loaded) == ranks(net) and len(loaded.loras) == 2 * 10 + 2 * 10
    loaded.load_weights(path)
    with pytest.raises(ConfigError, match="come from the weights file"):
        lora_anima.create_network_from_weights(1.0, path, None, None, tiny, train_llm_adapter="True")


def test_merge_equals_inject(tiny):
    params = tiny.params
    x, sigma, context = _inputs(params)
    net = _trained(lora_anima.create_network(0.7, 4, 2.0, None, None, tiny, train_llm_adapter="True",
                                             include_patterns="['.*final_layer.linear']"))
    ids, mask = torch.randint(2, 50, (1, 5)), torch.ones(1, 5, dtype=torch.long)
    source = torch.randn(1, 7, params.llm_adapter.source_dim)
    with torch.no_grad():
        base = tiny(x, sigma, source, t5_input_ids=ids, t5_attn_mask=mask)
        net.apply_to(None, tiny)
        injected = tiny(x, sigma, source, t5_input_ids=ids, t5_attn_mask=mask)
        net.merge_to()
        merged = tiny(x, sigma, source, t5_input_ids=ids, t5_attn_mask=mask)
    assert not torch.allclose(base, injected, atol=1e-3)
    assert torch.allclose(injected, merged, atol=1e-5, rtol=1e-5)


def test_a_flux_lora_is_refused_by_name(tiny):
    sd = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 256),
          "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(768, 4)}
    with pytest.raises(ModelFileError, match="look like a FLUX.1 / Chroma"):
        lora_anima.create_network_from_weights(1.0, None, None, None, tiny, weights_sd=sd)
    no_adapter = Anima(tiny_anima_params().__class__(**{**tiny.params.__dict__, "llm_adapter": None}))
    sd = {"lora_unet_llm_adapter_blocks_0_mlp_0.lora_down.weight": torch.zeros(4, 128),
          "lora_unet_llm_adapter_blocks_0_mlp_0.lora_up.weight": torch.zeros(512, 4)}
    with pytest.raises(ModelFileError, match="LLM-adapter modules, but the DiT given has no LLM adapter"):
        lora_anima.create_network_from_weights(1.0, None, None, None, no_adapter, weights_sd=sd)


def test_diffusers_anima_lora_converter_maps_our_modules_onto_its_models(tiny, monkeypatch):
    """ComfyUI names (`diffusion_model.<original>.lora_A/B`, what convert_anima_lora_to_comfy writes)
    through diffusers' converter land on the same layers: merging them into diffusers' Cosmos
    transformer and text conditioner gives our LoRA-injected output."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_anima_lora_to_diffusers

    from tests.test_anima_model import _torchvision_stub, diffusers_dit

    _torchvision_stub(monkeypatch)
    params = tiny.params
    state = anima_state_dict(params, seed=2)
    net = _trained(lora_anima.create_network(1.0, 4, 2.0, None, None, tiny, train_llm_adapter="True"), seed=5)
    originals = {layer.lora_name: original for original, layer in lora_anima._dit_layers(tiny, True)}
    comfy = {}
    for m in net.loras:
        # ComfyUI's lora_A/lora_B convention carries no alpha: fold alpha/rank into B.
        comfy[f"diffusion_model.{originals[m.lora_name]}.lora_A.weight"] = m.lora_down.weight.detach()
        comfy[f"diffusion_model.{originals[m.lora_name]}.lora_B.weight"] = m.lora_up.weight.detach() * m.scale
    converted = _convert_non_diffusers_anima_lora_to_diffusers(comfy)
    assert all(k.startswith(("transformer.", "text_conditioner.")) for k in converted)

    from diffusers import AnimaTextConditioner

    transformer = diffusers_dit(params, state)
    p = params.llm_adapter
    conditioner = AnimaTextConditioner(source_dim=p.source_dim, target_dim=p.target_dim, model_dim=p.model_dim,
                                       num_layers=p.num_layers, num_attention_heads=p.num_heads,
                                       mlp_ratio=p.mlp_hidden / p.model_dim, target_vocab_size=p.vocab_size).eval()
    conditioner.load_state_dict({k[len("llm_adapter."):]: v for k, v in state.items() if k.startswith("llm_adapter.")})
    models = {"transformer": transformer, "text_conditioner": conditioner}
    with torch.no_grad():
        for key in converted:
            if not key.endswith("lora_A.weight"):
                continue
            root, path = key.split(".", 1)
            module = models[root].get_submodule(path[: -len(".lora_A.weight")])
            down, up = converted[key], converted[key.replace("lora_A", "lora_B")]
            module.weight += up @ down

    x, sigma, _ = _inputs(params)
    ids, mask = torch.randint(2, 50, (1, 5)), torch.ones(1, 5, dtype=torch.long)
    source = torch.randn(1, 7, p.source_dim)
    with torch.no_grad():
        net.apply_to(None, tiny)
        ours = tiny(x, sigma, source, t5_input_ids=ids, t5_attn_mask=mask)
        context = conditioner(source, ids, mask)
        theirs = transformer(x.unsqueeze(2), sigma, context, padding_mask=torch.zeros(1, 1, 4, 6),
                             return_dict=False)[0].squeeze(2)
    assert (ours - theirs).abs().max().item() <= 1e-5 * max(1.0, theirs.abs().max().item())


def test_verbose_lists_modules_and_exclusions(tiny, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        lora_anima.create_network(1.0, 4, 1.0, None, None, tiny, verbose="True", network_reg_dims=r".*mlp.*=0")
    assert "lora_unet_blocks_1_cross_attn_v_proj" in caplog.text and "rank    4" in caplog.text
    assert "excluded by pattern" in caplog.text and "blocks.0.adaln_modulation_mlp.1" in caplog.text
    assert "skipped (rank 0)" in caplog.text and "lora_unet_blocks_0_mlp_layer1" in caplog.text
