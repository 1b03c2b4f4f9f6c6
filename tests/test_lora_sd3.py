"""SD3 / SD3.5 LoRA targets and defaults (networks/lora_sd3.py): exact sd-scripts key names,
ranks per component, block selection, embedders, text encoders, split qkv, loading from
weights, refusals, and merge == inject on the real tiny models."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from library.errors import ConfigError, ModelFileError
from library.sd3.model import VARIANTS, MMDiT
from library.text_encoders import load_clip_g, load_clip_l_with_projection
from library.tiny.sd3 import mmdit_state_dict, t5xxl_state, tiny_sd3_params, write_clip_g, write_clip_l
from networks import lora_sd3

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@functools.lru_cache(maxsize=None)
def _tiny_state(variant: str, seed: int) -> dict[str, torch.Tensor]:
    return mmdit_state_dict(variant, tiny_sd3_params(variant), seed=seed)


def tiny(variant: str = "5-medium", seed: int = 0) -> MMDiT:
    """A fresh tiny MMDiT (merging changes its weights, so each test gets its own copy)."""
    with torch.device("meta"):
        model = MMDiT(tiny_sd3_params(variant))
    model.load_state_dict({k: v.clone() for k, v in _tiny_state(variant, seed).items()}, assign=True)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def text_encoders(tmp_path_factory):
    from transformers import T5EncoderModel

    from library.tiny.sd3 import TINY_T5_WIDTH
    from library.text_encoders import t5xxl_config

    d = tmp_path_factory.mktemp("sd3_lora_te")
    clip_l = load_clip_l_with_projection(write_clip_l(d / "clip_l.safetensors", seed=1))
    clip_g = load_clip_g(write_clip_g(d / "clip_g.safetensors", seed=2))
    state = t5xxl_state(3)
    t5 = T5EncoderModel(t5xxl_config(vocab_size=state["shared.weight"].shape[0], d_model=TINY_T5_WIDTH, num_heads=6,
                                     d_kv=64, d_ff=state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
                                     num_layers=2, num_decoder_layers=2))
    t5.load_state_dict(state | {"encoder.embed_tokens.weight": state["shared.weight"]})
    return [clip_l, clip_g, t5.eval().requires_grad_(False)]


def create(mmdit, dim=4, alpha=1.0, text_encoders=None, **kwargs):
    return lora_sd3.create_network(1.0, dim, alpha, None, text_encoders, mmdit, **kwargs)


def ranks(network) -> dict[str, int]:
    return {m.lora_name: m.rank for m in network.loras}


def randomize(network, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.loras:
            m.lora_down.weight.copy_(torch.randn(m.lora_down.weight.shape, generator=g) * 0.1)
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.1)
            m.lora_up.weight.copy_(m._up_weight())   # a split module's up is block-diagonal


# ---------------------------------------------------------------------------------------------
# Targets and names.

def test_default_targets_have_the_exact_sd_scripts_names():
    network = create(tiny("5-medium"))
    names = set(ranks(network))
    per_block = [f"{s}_{n}" for s in ("context_block", "x_block")
                 for n in ("attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "adaLN_modulation_1")]
    for i in (0, 1):   # blocks 0 and 1 of the tiny SD3.5 M have attn2
        expected = {f"lora_unet_joint_blocks_{i}_{n}" for n in per_block}
        expected |= {f"lora_unet_joint_blocks_{i}_x_block_attn2_{n}" for n in ("qkv", "proj")}
        assert expected <= names
    last = {n for n in names if n.startswith("lora_unet_joint_blocks_2_")}
    assert last == {"lora_unet_joint_blocks_2_context_block_attn_qkv",
                    "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1",
                    *(f"lora_unet_joint_blocks_2_x_block_{n}" for n in ("attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2",
                                                                        "adaLN_modulation_1"))}
    assert len(names) == 2 * 12 + 7
    assert set(ranks(network).values()) == {4}
    assert all(m.text_encoder_index is None for m in network.loras)


@pytest.mark.parametrize("variant,count", [("medium", 237), ("5-medium", 263), ("5-large", 377)])
def test_real_size_module_counts(variant, count):
    with torch.device("meta"):
        mmdit = MMDiT(VARIANTS[variant].params)
    network = create(mmdit)
    assert len(network.loras) == count
    assert ("lora_unet_joint_blocks_12_x_block_attn2_qkv" in ranks(network)) == (variant == "5-medium")
    assert "lora_unet_joint_blocks_13_x_block_attn2_qkv" not in ranks(network)


def test_per_type_dims_with_zero_skipping():
    network = create(tiny("5-medium"), dim=4, context_attn_dim="2", context_mlp_dim="3", context_mod_dim="0",
                     x_attn_dim="5", x_mlp_dim="6", x_mod_dim="7", verbose="True")
    r = ranks(network)
    assert r["lora_unet_joint_blocks_0_context_block_attn_qkv"] == 2
    assert r["lora_unet_joint_blocks_0_context_block_attn_proj"] == 2
    assert r["lora_unet_joint_blocks_0_context_block_mlp_fc2"] == 3
    assert not any("context_block_adaLN" in n for n in r)
    assert r["lora_unet_joint_blocks_1_x_block_attn_qkv"] == 5
    assert r["lora_unet_joint_blocks_1_x_block_attn2_proj"] == 5, "attn2 counts as x_block attn"
    assert r["lora_unet_joint_blocks_2_x_block_mlp_fc1"] == 6
    assert r["lora_unet_joint_blocks_2_x_block_adaLN_modulation_1"] == 7
    assert network.describe()[0].startswith("lora_unet_joint_blocks_0_context_block_attn_qkv")


def test_emb_dims_in_the_documented_order():
    mmdit = tiny("medium")
    network = create(mmdit, dim=4, emb_dims="[2,3,4,5,6,0]")
    r = ranks(network)
    assert r["lora_unet_context_embedder"] == 2
    assert r["lora_unet_t_embedder_mlp_0"] == r["lora_unet_t_embedder_mlp_2"] == 3
    assert r["lora_unet_x_embedder_proj"] == 4
    assert r["lora_unet_y_embedder_mlp_0"] == r["lora_unet_y_embedder_mlp_2"] == 5
    assert r["lora_unet_final_layer_adaLN_modulation_1"] == 6
    assert "lora_unet_final_layer_linear" not in r
    conv = network.lora_unet_x_embedder_proj
    assert tuple(conv.lora_down.weight.shape) == (4, 16, 2, 2) and tuple(conv.lora_up.weight.shape) == (192, 4, 1, 1)
    with pytest.raises(ConfigError, match="emb_dims=.*expected 6 comma-separated ranks"):
        create(mmdit, emb_dims="[1,2,3]")


def test_train_block_indices():
    mmdit = tiny("5-large")   # 4 blocks
    r = ranks(create(mmdit, train_block_indices="0,2-3"))
    assert {int(n.split("_")[4]) for n in r} == {0, 2, 3}
    with pytest.raises(ConfigError, match="block 4 does not exist; this model has 4 such blocks"):
        create(mmdit, train_block_indices="1,4")
    with pytest.raises(ConfigError, match="no SD3 / SD3.5 layer was selected"):
        create(mmdit, train_block_indices="none")


def test_reg_dims_come_last_and_reg_lrs_set_group_lrs():
    mmdit = tiny("medium")
    network = create(mmdit, dim=4, x_mlp_dim="2", train_block_indices="0",
                     network_reg_dims=r"x_block_mlp=8,joint_blocks_1_.*attn_qkv=3",
                     network_reg_lrs=r"context_block=1e-5")
    r = ranks(network)
    assert r["lora_unet_joint_blocks_0_x_block_mlp_fc1"] == 8, "the regex wins over the per-type rank"
    assert r["lora_unet_joint_blocks_1_x_block_attn_qkv"] == 3, "... and over the block selection"
    assert "lora_unet_joint_blocks_1_x_block_attn_proj" not in r
    assert network.lora_unet_joint_blocks_0_context_block_attn_qkv.lr == 1e-5
    groups, descriptions = network.prepare_optimizer_params(None, 1e-4, 1e-4)
    assert sorted(g["lr"] for g in groups) == [1e-5, 1e-4]


def test_unknown_and_refused_args():
    mmdit = tiny("medium")
    with pytest.raises(ConfigError, match="'x_atn_dim' is not a network_args key of networks.lora_sd3; did you mean "
                                          "'x_attn_dim'"):
        create(mmdit, x_atn_dim="4")
    with pytest.raises(ConfigError, match="only convolution is the x_embedder"):
        create(mmdit, conv_dim="4")
    with pytest.raises(ConfigError, match="networks.lora_sd3 needs an SD3 / SD3.5 MMDiT"):
        create(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------
# Text encoders.

def test_text_encoder_names_and_t5_only_with_train_t5xxl(text_encoders):
    mmdit = tiny("medium")
    r = ranks(create(mmdit, dim=2, text_encoders=text_encoders))
    assert r["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] == 2
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2" in r
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj" in r
    assert not any(n.startswith("lora_te3_") for n in r)
    assert not any("text_projection" in n for n in r)
    network = create(mmdit, dim=2, text_encoders=text_encoders, train_t5xxl="True")
    r = ranks(network)
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in r
    assert "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_1" in r
    by_index = {m.text_encoder_index for m in network.text_encoder_loras}
    assert by_index == {0, 1, 2}
    # CLIP-L, CLIP-G and T5 learning rates as the guide's table says.
    assert lora_sd3.expand_text_encoder_lrs([1e-4, 1e-5]) == [1e-4, 1e-5, 1e-5]
    assert lora_sd3.expand_text_encoder_lrs(3e-5) == [3e-5] * 3
    groups, _ = network.prepare_optimizer_params(lora_sd3.expand_text_encoder_lrs([1e-4, 1e-5, 5e-6]), 1e-3, 1e-3)
    assert sorted({g["lr"] for g in groups}) == [5e-6, 1e-5, 1e-4, 1e-3]
    with pytest.raises(ConfigError, match="1 to 3 values"):
        lora_sd3.expand_text_encoder_lrs([1, 2, 3, 4])


# ---------------------------------------------------------------------------------------------
# Split qkv, saving and loading.

def test_split_qkv_saves_the_fused_layout_at_the_trained_strength(tmp_path):
    mmdit = tiny("5-medium")
    network = create(mmdit, dim=2, alpha=1.0, split_qkv="True")
    qkv = network.lora_unet_joint_blocks_0_x_block_attn2_qkv
    assert qkv.split_dims == (192, 192, 192) and qkv.rank == 6 and float(qkv.alpha) == 3.0
    assert network.lora_unet_joint_blocks_0_context_block_attn_proj.split_dims is None
    randomize(network)
    x = torch.randn(2, 5, 192)
    base = mmdit.joint_blocks[0].x_block.attn2.qkv
    network.apply_to(apply_text_encoder=False, apply_unet=True)
    injected = base(x)
    network.save_weights(tmp_path / "split.safetensors", None, {})
    network.restore()

    from safetensors.torch import load_file
    sd = load_file(tmp_path / "split.safetensors")
    assert sd["lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_down.weight"].shape == (6, 192)
    assert sd["lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_up.weight"].shape == (576, 6)
    plain, _ = lora_sd3.create_network_from_weights(1.0, tmp_path / "split.safetensors", None, None, mmdit)
    plain.load_weights(tmp_path / "split.safetensors")
    plain.apply_to(apply_text_encoder=False, apply_unet=True)
    torch.testing.assert_close(base(x), injected)
    plain.restore()


def test_from_weights_reproduces_modules_ranks_and_alphas(tmp_path, text_encoders):
    mmdit = tiny("5-medium")
    network = create(mmdit, dim=4, alpha=2.0, text_encoders=text_encoders, train_t5xxl="True", x_mlp_dim="2",
                     emb_dims="[1,0,3,0,0,2]")
    randomize(network)
    network.save_weights(tmp_path / "lora.safetensors", torch.float16, {"ss_network_module": "networks.lora_sd3"})
    rebuilt, sd = lora_sd3.create_network_from_weights(1.0, tmp_path / "lora.safetensors", None, text_encoders, mmdit)
    assert ranks(rebuilt) == ranks(network)
    assert {m.lora_name: float(m.alpha) for m in rebuilt.loras} == {m.lora_name: 2.0 for m in network.loras}
    rebuilt.load_weights(sd)
    with pytest.raises(ModelFileError, match="lora_te3_ \\(T5-XXL\\) for a text encoder that was not given"):
        lora_sd3.create_network_from_weights(1.0, tmp_path / "lora.safetensors", None, text_encoders[:2], mmdit)
    with pytest.raises(ConfigError, match="x_mlp_dim: the modules and ranks come from the weights file"):
        lora_sd3.create_network_from_weights(1.0, tmp_path / "lora.safetensors", None, None, mmdit, x_mlp_dim="2")


def test_files_of_other_variants_and_families_are_refused(tmp_path):
    medium_35 = create(tiny("5-medium"), dim=2)
    with pytest.raises(ModelFileError, match="only SD3.5 Medium has"):
        lora_sd3.create_network_from_weights(1.0, None, None, None, tiny("medium"), weights_sd=medium_35.state_dict())
    large = create(tiny("5-large"), dim=2)
    with pytest.raises(ModelFileError, match="joint_blocks up to 3, but this model has 3"):
        lora_sd3.create_network_from_weights(1.0, None, None, None, tiny("medium"), weights_sd=large.state_dict())
    flux_like = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8),
                 "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(24, 2)}
    with pytest.raises(ModelFileError, match="look like a FLUX.1 / Chroma"):
        lora_sd3.create_network_from_weights(1.0, None, None, None, tiny("medium"), weights_sd=flux_like)


# ---------------------------------------------------------------------------------------------
# Merge equals inject, on the whole model with embedders and text encoders.

@pytest.mark.parametrize("variant", ["medium", "5-medium", "5-large"])
@torch.no_grad()
def test_merge_equals_inject(variant, text_encoders):
    mmdit = tiny(variant, seed=3)
    clip_l = copy.deepcopy(text_encoders[0])
    network = create(mmdit, dim=4, alpha=2.0, text_encoders=[clip_l, None, None], emb_dims="[2,2,2,2,2,2]",
                     split_qkv="True")
    randomize(network, seed=5)
    params = mmdit.params
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 8, 6, generator=g)
    t, y = torch.tensor([500.0]), torch.randn(1, params.adm_in_channels, generator=g)
    context = torch.randn(1, 7, params.context_in_features, generator=g)
    ids = torch.tensor([[49406, 3, 4, 49407] + [49407] * 4]).clamp(max=clip_l.config.vocab_size - 1)

    before = mmdit(x, t, y, context)
    network.apply_to([clip_l, None, None], mmdit, apply_text_encoder=True, apply_unet=True)
    network.set_multiplier(0.7)
    injected = mmdit(x, t, y, context)
    injected_text = clip_l(ids).text_embeds
    assert (injected - before).abs().max() > 1e-3, "the LoRA must change the output"
    network.merge_to(multiplier=0.7)
    merged = mmdit(x, t, y, context)
    assert (merged - injected).abs().max() <= 1e-5
    assert (clip_l(ids).text_embeds - injected_text).abs().max() <= 1e-5
