"""SD 1.x / 2.x LoRA (`--network_module networks.lora`, targets in networks/lora_sd.py):
LoRA-LierLa and LoRA-C3Lier module sets and sd-scripts key names on the full-size SD 1.5 / 2.1
structure, block numbering, block-wise ranks and learning rates, loading from weights, and
merge == inject (3x3 convolutions included) on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from library.errors import ConfigError, ModelFileError
from library.sd.model import SDUNet
from library.text_encoders import clip_g_config, clip_l_config, wrap_clip_text_model
from library.tiny import sd as tiny_sd
from networks import lora, lora_sd

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def sd15():
    """SD 1.5's UNet and CLIP ViT-L built on the meta device (names and shapes, no memory)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**tiny_sd.unet_config(False, full=True))
        te = wrap_clip_text_model(CLIPTextModel(clip_l_config()))
    return unet, te


@pytest.fixture(scope="module")
def sd21():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**tiny_sd.unet_config(True, full=True))
        te = wrap_clip_text_model(CLIPTextModel(clip_g_config(hidden_size=1024, num_attention_heads=16,
                                                              intermediate_size=4096, num_hidden_layers=23)))
    return unet, te


def create(model, dim=4, alpha=1.0, **kwargs):
    unet, te = model
    return lora.create_network(1.0, dim, alpha, None, [te], unet, **kwargs)


def ranks(network) -> dict[str, int]:
    return {m.lora_name: m.rank for m in network.loras}


def test_lierla_module_set_and_names(sd15, sd21):
    net = create(sd15)
    names = set(ranks(net))
    assert (len(net.unet_loras), len(net.text_encoder_loras)) == (192, 72)   # sd-scripts' counts for SD 1.5
    for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0",
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
                 "lora_unet_mid_block_attentions_0_proj_in", "lora_unet_up_blocks_3_attentions_2_proj_out",
                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te_text_model_encoder_layers_11_mlp_fc2"):
        assert name in names, name
    assert not any("resnets" in n or "samplers" in n or "time_emb" in n for n in names)   # LierLa: no ResNets
    proj_in = net.get_submodule("lora_unet_mid_block_attentions_0_proj_in")
    assert tuple(proj_in.lora_down.weight.shape) == (4, 1280, 1, 1)   # SD 1.x: 1x1 convolution
    v2 = create(sd21)
    assert (len(v2.unet_loras), len(v2.text_encoder_loras)) == (192, 138)
    assert tuple(v2.get_submodule("lora_unet_mid_block_attentions_0_proj_in").lora_down.weight.shape) == (4, 1280)


def test_c3lier_adds_resnet_and_sampler_layers(sd15):
    net = create(sd15, dim=8, alpha=4.0, conv_dim="6", conv_alpha="3")
    r = ranks(net)
    assert len(net.unet_loras) == 278
    assert r["lora_unet_down_blocks_0_resnets_0_conv1"] == 6                 # 3x3: conv_dim
    assert r["lora_unet_down_blocks_0_downsamplers_0_conv"] == 6
    assert r["lora_unet_up_blocks_0_upsamplers_0_conv"] == 6
    assert r["lora_unet_down_blocks_0_resnets_0_time_emb_proj"] == 8         # Linear in a ResNet: network_dim
    assert r["lora_unet_down_blocks_1_resnets_0_conv_shortcut"] == 8         # 1x1: network_dim
    assert r["lora_unet_down_blocks_0_attentions_0_proj_in"] == 8
    conv = net.get_submodule("lora_unet_down_blocks_0_resnets_0_conv1")
    assert tuple(conv.lora_down.weight.shape) == (6, 320, 3, 3) and tuple(conv.lora_up.weight.shape) == (320, 6, 1, 1)
    assert float(conv.alpha) == 3.0
    assert float(net.get_submodule("lora_unet_down_blocks_0_resnets_0_time_emb_proj").alpha) == 4.0
    default_alpha = create(sd15, conv_dim="4")
    assert float(default_alpha.get_submodule("lora_unet_down_blocks_0_resnets_0_conv1").alpha) == 1.0
    with pytest.raises(ConfigError, match="conv_alpha has no effect"):
        create(sd15, conv_alpha="2")


def test_block_numbering_follows_sd_scripts():
    cases = {
        "lora_unet_down_blocks_0_attentions_0_proj_in": 1, "lora_unet_down_blocks_0_resnets_1_conv1": 2,
        "lora_unet_down_blocks_0_downsamplers_0_conv": 3, "lora_unet_down_blocks_3_resnets_1_conv2": 11,
        "lora_unet_mid_block_attentions_0_proj_in": 12, "lora_unet_up_blocks_0_resnets_0_conv1": 13,
        "lora_unet_up_blocks_0_upsamplers_0_conv": 15, "lora_unet_up_blocks_3_attentions_2_proj_out": 24,
        "lora_te_text_model_encoder_layers_0_mlp_fc1": -1,
    }
    assert {name: lora_sd.block_index(name) for name in cases} == cases


def test_block_dims_and_alphas(sd15):
    dims = [0] + [2] * 11 + [3] + [4] * 12
    dims[4] = 0                      # IN04: down_blocks.1 first attention out
    alphas = [1.0] * 25
    alphas[12] = 7.0
    net = create(sd15, block_dims=",".join(map(str, dims)), block_alphas=",".join(map(str, alphas)))
    r = ranks(net)
    assert not any(n.startswith("lora_unet_down_blocks_1_attentions_0_") for n in r)
    assert r["lora_unet_down_blocks_1_attentions_1_proj_in"] == 2
    assert r["lora_unet_mid_block_attentions_0_proj_in"] == 3
    assert float(net.get_submodule("lora_unet_mid_block_attentions_0_proj_in").alpha) == 7.0
    assert r["lora_unet_up_blocks_3_attentions_0_proj_in"] == 4
    assert r["lora_te_text_model_encoder_layers_0_mlp_fc1"] == 4      # text encoder keeps network_dim
    conv = create(sd15, block_dims="[" + ",".join(["4"] * 25) + "]",
                  conv_block_dims=",".join(["0"] * 24 + ["5"]))       # 3x3 only in OUT11
    conv_ranks = {n: k for n, k in ranks(conv).items() if "resnets" in n and n.endswith(("conv1", "conv2"))}
    assert conv_ranks and set(conv_ranks.values()) == {5}
    assert all(n.startswith("lora_unet_up_blocks_3_resnets_2_") for n in conv_ranks)
    with pytest.raises(ConfigError, match="expected 25"):
        create(sd15, block_dims=",".join(["4"] * 24))
    with pytest.raises(ConfigError, match="needs block_dims"):
        create(sd15, block_alphas=",".join(["1"] * 25))


def test_block_lr_weights(sd15):
    up = ",".join(["1"] * 11 + ["0.5"])
    net = create(sd15, down_lr_weight="zeros+0.25", mid_lr_weight="0", up_lr_weight=up)
    r = ranks(net)
    assert not any(n.startswith("lora_unet_mid_block_") for n in r)      # weight 0: the block has no LoRA
    groups, _ = net.prepare_optimizer_params(text_encoder_lr=None, unet_lr=1e-3, default_lr=1e-4)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    lr = {n: lr_of[id(net.get_submodule(n).lora_down.weight)]
          for n in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_up_blocks_3_attentions_2_proj_out",
                    "lora_unet_up_blocks_3_attentions_0_proj_out", "lora_te_text_model_encoder_layers_0_mlp_fc1")}
    assert lr == pytest.approx({"lora_unet_down_blocks_0_attentions_0_proj_in": 2.5e-4,
                                "lora_unet_up_blocks_3_attentions_2_proj_out": 5e-4,      # OUT11 x 0.5
                                "lora_unet_up_blocks_3_attentions_0_proj_out": 1e-3,
                                "lora_te_text_model_encoder_layers_0_mlp_fc1": 1e-4})
    sine = lora_sd.parse_lr_weights("sine")
    assert sine[0] == 0 and sine[-1] == pytest.approx(1) and sine[6] == pytest.approx(math.sin(math.pi * 6 / 22))
    assert lora_sd.parse_lr_weights("cosine+0.5")[0] == pytest.approx(1.5)
    assert lora_sd.parse_lr_weights("1,0.5") == [1.0, 0.5] + [1.0] * 10     # short lists are filled with 1
    thresholded = create(sd15, down_lr_weight=",".join(["0.05"] * 12), block_lr_zero_threshold="0.1")
    assert not any(n.startswith("lora_unet_down_blocks_") for n in ranks(thresholded))
    with pytest.raises(ConfigError, match="at most 12"):
        create(sd15, up_lr_weight=",".join(["1"] * 13))


def test_loraplus_and_bad_keys(sd15):
    net = create(sd15, loraplus_unet_lr_ratio="16")
    groups, descriptions = net.prepare_optimizer_params(text_encoder_lr=[5e-5], unet_lr=1e-4, default_lr=1e-4)
    assert sorted(g["lr"] for g in groups) == pytest.approx([5e-5, 1e-4, 1.6e-3])
    assert any("plus" in d for d in descriptions)
    with pytest.raises(ConfigError, match="did you mean 'conv_dim'"):
        create(sd15, conv_dims="4")


@pytest.fixture
def tiny_model():
    parts = tiny_sd.make_parts(False, seed=2)
    te = tiny_sd.random_text_encoder(False, seed=3)
    return SDUNet(parts.unet).requires_grad_(False), te.requires_grad_(False)


def _randomize(network, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=gen) * 0.1)


@torch.no_grad()
def test_c3lier_inject_equals_merge_and_weights_round_trip(tiny_model, tmp_path):
    unet, te = tiny_model
    net = lora.create_network(1.0, 4, 2.0, None, [te], unet, conv_dim="3", conv_alpha="1.5")
    net.apply_to([te], unet)
    _randomize(net)
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([5, 800]), torch.randn(2, 77, tiny_sd.TINY_TEXT_WIDTH)
    ids = torch.randint(0, 200, (2, 77))
    injected, te_injected = unet(x, t, c), te(ids).last_hidden_state
    path = tmp_path / "c3lier.safetensors"
    net.save_weights(path, None, {"ss_network_module": "networks.lora"})
    net.restore()
    plain = unet(x, t, c)
    assert (injected - plain).abs().max() > 1e-3
    fresh, sd = lora.create_network_from_weights(1.0, path, None, [te], unet, for_inference=True)
    assert ranks(fresh) == ranks(net) and len(fresh.unet_loras) > 16 * 10 // 16
    assert any(lora_sd.is_conv3x3(m.base) for m in fresh.loras)
    fresh.merge_to(sd)
    assert (unet(x, t, c) - injected).abs().max() <= 1e-4
    assert (te(ids).last_hidden_state - te_injected).abs().max() <= 1e-4


def test_foreign_files_are_refused(tiny_model, tmp_path):
    unet, te = tiny_model
    from safetensors.torch import save_file

    path = tmp_path / "flux.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(24, 4)}, path)
    with pytest.raises(ModelFileError, match="FLUX"):
        lora.create_network_from_weights(1.0, path, None, [te], unet)
    with pytest.raises(ConfigError, match="come from the weights file"):
        lora.create_network_from_weights(1.0, path, None, [te], unet, conv_dim="4")
    with pytest.raises(ConfigError, match="needs an SD 1.x/2.x UNet"):
        lora.create_network(1.0, 4, 1.0, None, [te], torch.nn.Linear(2, 2))
