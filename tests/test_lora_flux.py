"""FLUX.1 / Chroma LoRA targets and defaults (networks/lora_flux.py).

The model here is a stand-in with the BFL class names and attribute paths (library/flux is
not imported): tiny widths for exact names, real sizes on the meta device for the counts.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from library.errors import ConfigError, ModelFileError
from networks import lora_flux


# ---------------------------------------------------------------------------------------- stand-in model


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden, hidden)


class Modulation(nn.Module):
    def __init__(self, dim, double):
        super().__init__()
        self.lin = nn.Linear(dim, (6 if double else 3) * dim)


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class SelfAttention(nn.Module):
    def __init__(self, dim, head_dim):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(head_dim)
        self.proj = nn.Linear(dim, dim)


class DoubleStreamBlock(nn.Module):
    def __init__(self, dim, mlp, head_dim, with_mod):
        super().__init__()
        for s in ("img", "txt"):
            if with_mod:
                setattr(self, f"{s}_mod", Modulation(dim, double=True))
            setattr(self, f"{s}_norm1", nn.LayerNorm(dim, elementwise_affine=False))
            setattr(self, f"{s}_attn", SelfAttention(dim, head_dim))
            setattr(self, f"{s}_norm2", nn.LayerNorm(dim, elementwise_affine=False))
            setattr(self, f"{s}_mlp", nn.Sequential(nn.Linear(dim, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, dim)))


class SingleStreamBlock(nn.Module):
    def __init__(self, dim, mlp, head_dim, with_mod):
        super().__init__()
        self.linear1 = nn.Linear(dim, 3 * dim + mlp)
        self.linear2 = nn.Linear(dim + mlp, dim)
        self.norm = QKNorm(head_dim)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp_act = nn.GELU(approximate="tanh")
        if with_mod:
            self.modulation = Modulation(dim, double=False)


class LastLayer(nn.Module):
    def __init__(self, dim, out, with_mod):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False)
        self.linear = nn.Linear(dim, out)
        if with_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))


class Approximator(nn.Module):
    def __init__(self, in_dim, hidden, out, n):
        super().__init__()
        self.in_proj = nn.Linear(in_dim, hidden)
        self.layers = nn.ModuleList(MLPEmbedder(hidden, hidden) for _ in range(n))
        self.norms = nn.ModuleList(RMSNorm(hidden) for _ in range(n))
        self.out_proj = nn.Linear(hidden, out)


class Flux(nn.Module):
    def __init__(self, dim=3072, double=19, single=38, head_dim=128, guidance=True, chroma=False,
                 vec_in=768, ctx_in=4096):
        super().__init__()
        mlp = 4 * dim
        self.img_in = nn.Linear(64, dim)
        if chroma:
            self.distilled_guidance_layer = Approximator(64, 5120 * dim // 3072, dim, 5)
        else:
            self.time_in = MLPEmbedder(256, dim)
            self.vector_in = MLPEmbedder(vec_in, dim)
            self.guidance_in = MLPEmbedder(256, dim) if guidance else nn.Identity()
        self.txt_in = nn.Linear(ctx_in, dim)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(dim, mlp, head_dim, not chroma) for _ in range(double))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(dim, mlp, head_dim, not chroma) for _ in range(single))
        self.final_layer = LastLayer(dim, 64, not chroma)


def tiny(**kw):
    torch.manual_seed(0)
    return Flux(dim=16, double=2, single=3, head_dim=8, vec_in=12, ctx_in=20, **kw)


def real_size(**kw):
    with torch.device("meta"):
        return Flux(**kw)


def create(flux, dim=4, alpha=1.0, text_encoders=None, **network_args):
    return lora_flux.create_network(1.0, dim, alpha, None, text_encoders, flux, **network_args)


def ranks(network):
    return {m.lora_name: m.rank for m in network.loras}


DOUBLE_LAYERS = ["img_mod_lin", "img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2",
                 "txt_mod_lin", "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2"]
SINGLE_LAYERS = ["linear1", "linear2", "modulation_lin"]


# ---------------------------------------------------------------------------------------- default targets


def test_default_targets_have_the_exact_sd_scripts_names():
    network = create(tiny())
    expected = [f"lora_unet_double_blocks_{i}_{n}" for i in range(2) for n in DOUBLE_LAYERS]
    expected += [f"lora_unet_single_blocks_{i}_{n}" for i in range(3) for n in SINGLE_LAYERS]
    assert sorted(ranks(network)) == sorted(expected)
    assert set(ranks(network).values()) == {4}
    keys = network.state_dict().keys()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_2_linear2.alpha" in keys
    assert network.lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight.shape == (48, 4)


def test_chroma_has_no_modulation_targets():
    names = ranks(create(tiny(chroma=True)))
    assert len(names) == 2 * 8 + 3 * 2
    assert not any("mod" in n for n in names)


@pytest.mark.parametrize("kw, count, with_in_dims", [
    ({}, 304, 312),                       # FLUX.1 dev: + img_in, time_in x2, vector_in x2, guidance_in x2, txt_in
    ({"guidance": False}, 304, 310),      # schnell: guidance_in is an Identity
    ({"chroma": True}, 228, 230),         # Chroma: only img_in and txt_in exist
])
def test_real_size_module_counts(kw, count, with_in_dims):
    flux = real_size(**kw)
    assert len(create(flux, dim=1).loras) == count
    network = create(flux, dim=1, in_dims="[1,1,1,1,1]")
    assert len(network.loras) == with_in_dims
    names = set(ranks(network))
    assert "lora_unet_single_blocks_37_linear2" in names and "lora_unet_double_blocks_18_txt_mlp_2" in names
    assert ("lora_unet_guidance_in_in_layer" in names) == (kw == {})
    assert ("lora_unet_time_in_out_layer" in names) == (not kw.get("chroma"))
    assert {"lora_unet_img_in", "lora_unet_txt_in"} <= names
    assert not any("distilled_guidance" in n or "final_layer" in n for n in names)


def test_in_dims_ranks_follow_the_documented_order():
    r = ranks(create(tiny(), in_dims="[4,2,0,3,5]"))
    assert r["lora_unet_img_in"] == 4 and r["lora_unet_time_in_in_layer"] == 2 and r["lora_unet_time_in_out_layer"] == 2
    assert "lora_unet_vector_in_in_layer" not in r
    assert r["lora_unet_guidance_in_out_layer"] == 3 and r["lora_unet_txt_in"] == 5
    with pytest.raises(ConfigError, match="expected 5"):
        create(tiny(), in_dims="[4,2,2]")


# ---------------------------------------------------------------------------------------- per-type dims and blocks


def test_per_type_dims_with_zero_skipping():
    r = ranks(create(tiny(), dim=4, img_attn_dim="8", txt_attn_dim="2", img_mlp_dim="0", txt_mod_dim="3",
                     single_dim="6", single_mod_dim="1"))
    assert r["lora_unet_double_blocks_1_img_attn_qkv"] == 8 and r["lora_unet_double_blocks_1_img_attn_proj"] == 8
    assert r["lora_unet_double_blocks_0_txt_attn_proj"] == 2
    assert "lora_unet_double_blocks_0_img_mlp_0" not in r and "lora_unet_double_blocks_0_img_mlp_2" not in r
    assert r["lora_unet_double_blocks_0_txt_mlp_0"] == 4  # not given: network_dim
    assert r["lora_unet_double_blocks_0_img_mod_lin"] == 4 and r["lora_unet_double_blocks_0_txt_mod_lin"] == 3
    assert r["lora_unet_single_blocks_2_linear1"] == 6 and r["lora_unet_single_blocks_2_linear2"] == 6
    assert r["lora_unet_single_blocks_2_modulation_lin"] == 1
    network = create(tiny(), dim=4, alpha=2.0, img_attn_dim="8")
    assert {float(m.alpha) for m in network.loras} == {2.0}  # alpha stays network_alpha


def test_train_blocks():
    assert all("single_blocks" in n for n in ranks(create(tiny(), train_blocks="single")))
    assert all("double_blocks" in n for n in ranks(create(tiny(), train_blocks="double")))
    with pytest.raises(ConfigError, match="all, single, double"):
        create(tiny(), train_blocks="both")


def test_block_indices_select_blocks_and_are_validated_against_the_model():
    r = ranks(create(tiny(), train_double_block_indices="1", train_single_block_indices="0,2"))
    assert {n.split("_")[4] for n in r if "double" in n} == {"1"}
    assert {n.split("_")[4] for n in r if "single" in n} == {"0", "2"}
    r = ranks(create(tiny(), train_double_block_indices="none"))
    assert not any("double" in n for n in r) and sum("single" in n for n in r) == 9
    with pytest.raises(ConfigError, match="valid indices are 0-2"):
        create(tiny(), train_single_block_indices="1-3")
    r = ranks(create(real_size(), dim=1, train_double_block_indices="0,2,5-8,18"))
    assert len([n for n in r if "double" in n]) == 7 * 10


def test_reg_dims_come_last_and_the_last_match_wins():
    r = ranks(create(tiny(), dim=4, train_double_block_indices="0",
                     network_reg_dims=r"double_blocks_1_img_attn=5,img_attn_qkv=7,single_blocks_\d+_linear2=0"))
    assert r["lora_unet_double_blocks_1_img_attn_proj"] == 5  # re-enabled by the rule despite block selection
    assert r["lora_unet_double_blocks_1_img_attn_qkv"] == 7  # both rules match: the last wins
    assert r["lora_unet_double_blocks_0_img_attn_qkv"] == 7
    assert "lora_unet_double_blocks_1_txt_attn_qkv" not in r  # block 1 deselected, no rule
    assert not any(n.endswith("linear2") for n in r)  # rank 0 skips


def test_reg_lrs_and_loraplus_from_network_args():
    network = create(tiny(), network_reg_lrs=r"single_blocks=1e-3,single_blocks_2=2e-3", loraplus_lr_ratio="4")
    assert network.lora_unet_single_blocks_0_linear1.lr == 1e-3
    assert network.lora_unet_single_blocks_2_linear1.lr == 2e-3
    assert network.lora_unet_double_blocks_0_img_attn_qkv.lr is None
    params, descs = network.prepare_optimizer_params(None, 1e-4, 1e-4)
    lrs = {d: g["lr"] for d, g in zip(descs, params)}
    assert lrs == pytest.approx({"unet": 1e-4, "unet plus": 4e-4, "unet lr=0.001": 1e-3, "unet lr=0.001 plus": 4e-3,
                                 "unet lr=0.002": 2e-3, "unet lr=0.002 plus": 8e-3})


def test_dropout_args_reach_the_modules():
    network = lora_flux.create_network(1.0, 4, 1.0, None, None, tiny(), neuron_dropout=0.1,
                                       rank_dropout="0.2", module_dropout="0.3")
    m = network.loras[0]
    assert (m.dropout, m.rank_dropout, m.module_dropout) == (0.1, 0.2, 0.3)


# ---------------------------------------------------------------------------------------- refused args


def test_unknown_args_are_refused_with_the_nearest_key():
    with pytest.raises(ConfigError, match="did you mean 'img_attn_dim'"):
        create(tiny(), img_atn_dim="4")
    with pytest.raises(ConfigError, match="did you mean 'train_double_block_indices'"):
        create(tiny(), train_double_blocks_indices="0")


@pytest.mark.parametrize("key, value, message", [("split_qkv", "yes please", "split_qkv"),
                                                 ("ggpo_sigma", "-1", "ggpo_sigma")])
def test_bad_feature_values_are_refused(key, value, message):
    with pytest.raises(ConfigError, match=message):
        create(tiny(), **{key: value})


def test_ggpo_needs_both_values():
    with pytest.raises(ConfigError, match="needs both ggpo_sigma and ggpo_beta"):
        create(tiny(), ggpo_sigma="0.03")


def test_defaults_spelled_out_are_accepted_and_conv_dim_is_refused():
    assert len(create(tiny(), split_qkv="False", train_t5xxl="False", verbose="True").loras) == 29
    with pytest.raises(ConfigError, match="no convolution layers"):
        create(tiny(), conv_dim="4")


def test_not_a_flux_model_is_refused():
    with pytest.raises(ConfigError, match="needs a FLUX.1 or Chroma model"):
        create(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------- text encoders


def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                        vocab_size=50, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1))


def tiny_t5():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(d_model=8, d_ff=16, num_layers=2, num_heads=2, d_kv=4, vocab_size=50,
                                   feed_forward_proj="gated-gelu"))


def test_clip_l_targets_use_the_checkpoint_names_and_are_dropped_when_not_trained():
    network = create(tiny(), text_encoders=[tiny_clip(), tiny_t5()])
    te = sorted(m.lora_name for m in network.text_encoder_loras)
    expected = sorted(f"lora_te1_text_model_encoder_layers_{i}_{n}" for i in range(2)
                      for n in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                                "mlp_fc1", "mlp_fc2"))
    assert te == expected  # no T5 modules without train_t5xxl
    network.apply_to(apply_text_encoder=False, apply_unet=True)
    assert not any(k.startswith("lora_te") for k in network.state_dict())
    assert len(network.loras) == 29


def test_train_t5xxl_adds_t5_modules_with_the_te3_prefix():
    network = create(tiny(), text_encoders=[tiny_clip(), tiny_t5()], train_t5xxl="True")
    t5 = sorted(m.lora_name for m in network.text_encoder_loras if m.lora_name.startswith("lora_te3_"))
    expected = sorted(f"lora_te3_encoder_block_{i}_layer_{n}" for i in range(2)
                      for n in ("0_SelfAttention_q", "0_SelfAttention_k", "0_SelfAttention_v", "0_SelfAttention_o",
                                "1_DenseReluDense_wi_0", "1_DenseReluDense_wi_1", "1_DenseReluDense_wo"))
    assert t5 == expected
    assert {m.text_encoder_index for m in network.text_encoder_loras} == {0, 1}
    params, descriptions = network.prepare_optimizer_params([1e-4, 1e-5], None, 1e-3)
    assert sorted((d, g["lr"]) for d, g in zip(descriptions, params)) == [
        ("textencoder 1", 1e-4), ("textencoder 2", 1e-5), ("unet", 1e-3)]


# ---------------------------------------------------------------------------------------- split_qkv


def randomize(network, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.loras:
            m.lora_down.weight.copy_(torch.randn(m.lora_down.weight.shape, generator=g))
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g))
            m.lora_up.weight.copy_(m._up_weight())   # a split module's up is block-diagonal


def test_split_qkv_is_separate_loras_per_part_saved_fused_at_the_trained_strength(tmp_path):
    flux = tiny()
    network = create(flux, dim=2, alpha=1.0, split_qkv="True")
    qkv = network.lora_unet_double_blocks_0_img_attn_qkv
    linear1 = network.lora_unet_single_blocks_0_linear1
    assert qkv.split_dims == (16, 16, 16) and qkv.rank == 6 and float(qkv.alpha) == 3.0
    assert linear1.split_dims == (16, 16, 16, 64) and linear1.rank == 8 and float(linear1.alpha) == 4.0
    assert network.lora_unet_double_blocks_0_img_attn_proj.split_dims is None
    randomize(network)
    network.apply_to(apply_text_encoder=False, apply_unet=True)

    # the forward equals n independent rank-2 LoRAs (alpha 1) on the row blocks
    x = torch.randn(3, 16)
    base = flux.double_blocks[0].img_attn.qkv
    down, up = qkv.lora_down.weight, qkv.lora_up.weight
    parts = [up[16 * j:16 * (j + 1), 2 * j:2 * (j + 1)] @ down[2 * j:2 * (j + 1)] * (1.0 / 2) for j in range(3)]
    expected = x @ (base.weight + torch.cat(parts)).T + base.bias
    torch.testing.assert_close(base(x), expected)

    # saved fused (down (3r, in), block-diagonal up, alpha 3x) and reloaded as a plain LoRA: same output
    network.save_weights(tmp_path / "split.safetensors", None, {})
    from safetensors.torch import load_file
    sd = load_file(tmp_path / "split.safetensors")
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (6, 16)
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (48, 6)
    assert float(sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 3.0
    network.restore()
    plain, _ = lora_flux.create_network_from_weights(1.0, tmp_path / "split.safetensors", None, None, flux)
    plain.load_weights(tmp_path / "split.safetensors")
    plain.apply_to(apply_text_encoder=False, apply_unet=True)
    torch.testing.assert_close(base(x), expected)
    plain.restore()

    # merge equals inject, and a split network reloads its own file
    again = create(flux, dim=2, alpha=1.0, split_qkv="True")
    again.load_weights(tmp_path / "split.safetensors")
    again.merge_to()
    torch.testing.assert_close(base(x), expected, rtol=1e-5, atol=1e-5)


def test_split_qkv_gradients_stay_on_the_diagonal_blocks():
    flux = tiny()
    network = create(flux, dim=2, split_qkv="True")
    randomize(network)
    network.apply_to(apply_text_encoder=False, apply_unet=True)
    flux.single_blocks[0].linear1(torch.randn(4, 16)).square().sum().backward()
    m = network.lora_unet_single_blocks_0_linear1
    grad = m.lora_up.weight.grad
    assert torch.equal(grad, m._mask_blocks(grad)) and grad.abs().sum() > 0


def test_a_full_lora_file_is_refused_by_a_split_network(tmp_path):
    flux = tiny()
    full = create(flux, dim=6)
    randomize(full)
    sd = {k: v for k, v in full.state_dict().items()}
    split = create(flux, dim=2, split_qkv="True")
    sd = {k: v for k, v in sd.items() if k.split(".")[0] in {m.lora_name for m in split.loras}
          and split.get_submodule(k.split(".")[0]).rank == 6}
    with pytest.raises(ModelFileError, match="not block-diagonal"):
        split.load_weights({**split.state_dict(), **sd})


# ---------------------------------------------------------------------------------------- LoRA-GGPO


def test_ggpo_perturbation_follows_its_formula():
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    network = lora_flux.create_network(1.0, 2, 1.0, None, None, _one_layer_flux(layer),
                                       ggpo_sigma="0.5", ggpo_beta="2.0")
    m = network.loras[0]
    randomize(network)
    network.apply_to(apply_text_encoder=False, apply_unet=True)
    x = torch.randn(5, 8)
    lora_out = layer(x)                 # no norms yet: no perturbation on the first step
    lora_out.square().sum().backward()
    network.before_optimizer_step()

    up, down = m.lora_up.weight.detach(), m.lora_down.weight.detach()
    delta = up @ down * m.scale
    combined = torch.sqrt(layer.weight.norm(dim=1).mean() ** 2 + delta.pow(2).sum(dim=1, keepdim=True))
    grad = m.scale * (up @ m.lora_down.weight.grad + m.lora_up.weight.grad @ down)
    scale = (0.5 * combined + 2.0 * grad.norm(dim=1, keepdim=True) ** 2) / 6 ** 0.5
    torch.testing.assert_close(m._ggpo_scale, scale)

    with torch.no_grad():
        torch.manual_seed(7)
        perturbed = layer(x)
        torch.manual_seed(7)
        noise = torch.randn(6, 8) * scale
    torch.testing.assert_close(perturbed, lora_out.detach() + x @ noise.T)
    network.eval()                      # evaluation (sampling, validation, saving): no perturbation
    with torch.no_grad():
        torch.testing.assert_close(layer(x), lora_out.detach())


def _one_layer_flux(layer):
    """A minimal model with the FLUX block lists around one Linear (GGPO is a per-layer feature)."""
    flux = nn.Module()
    block = nn.Module()
    block.linear2 = layer
    flux.double_blocks = nn.ModuleList()
    flux.single_blocks = nn.ModuleList([block])
    return flux


# ---------------------------------------------------------------------------------------- from weights


def test_create_from_weights_reproduces_modules_ranks_and_alphas(tmp_path):
    flux = tiny()
    trained = create(flux, dim=4, alpha=2.0, img_attn_dim="8", in_dims="[2,0,0,0,3]", train_single_block_indices="1")
    with torch.no_grad():
        for m in trained.loras:
            m.lora_up.weight.normal_()
    path = tmp_path / "flux_lora.safetensors"
    trained.save_weights(path, torch.bfloat16, {"ss_network_module": "networks.lora_flux"})

    network, sd = lora_flux.create_network_from_weights(0.5, str(path), None, None, tiny(), loraplus_lr_ratio="2")
    assert ranks(network) == ranks(trained)
    assert {m.lora_name: float(m.alpha) for m in network.loras} == {m.lora_name: 2.0 for m in trained.loras}
    assert network.multiplier == 0.5 and set(sd) == set(trained.state_dict())
    network.load_weights(sd)
    torch.testing.assert_close(network.lora_unet_img_in.lora_up.weight,
                               trained.lora_unet_img_in.lora_up.weight.to(torch.bfloat16).float())
    params, descs = network.prepare_optimizer_params(None, 1e-4, 1e-4)
    assert descs == ["unet", "unet plus"]

    with pytest.raises(ConfigError, match="come from the weights file"):
        lora_flux.create_network_from_weights(1.0, str(path), None, None, tiny(), img_attn_dim="4")


def test_inference_network_from_weights_with_text_encoder_modules():
    clip, t5 = tiny_clip(), tiny_t5()
    sd = {}
    for name, shape in (("lora_unet_single_blocks_0_linear2", (16, 80)),
                        ("lora_te1_text_model_encoder_layers_1_mlp_fc1", (16, 8)),
                        ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", (8, 8)),
                        ("lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_1", (16, 8))):
        out, inp = shape
        sd |= {f"{name}.lora_down.weight": torch.randn(2, inp), f"{name}.lora_up.weight": torch.randn(out, 2),
               f"{name}.alpha": torch.tensor(1.0)}
    network, _ = lora_flux.create_network_from_weights(1.0, None, None, [clip, t5], tiny(), weights_sd=sd,
                                                       for_inference=True)
    assert {m.lora_name: m.text_encoder_index for m in network.loras} == {
        "lora_unet_single_blocks_0_linear2": None, "lora_te1_text_model_encoder_layers_1_mlp_fc1": 0,
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q": 1,
        "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_1": 1}
    assert not any(p.requires_grad for p in network.parameters())
    with pytest.raises(ModelFileError, match="text encoder that was not given"):
        lora_flux.create_network_from_weights(1.0, None, None, [clip, None], tiny(), weights_sd=sd)


def test_a_file_for_another_family_is_refused():
    sd = {}
    for i in range(3):
        name = f"lora_unet_joint_blocks_{i}_context_block_attn_qkv"
        sd |= {f"{name}.lora_down.weight": torch.zeros(4, 16), f"{name}.lora_up.weight": torch.zeros(48, 4),
               f"{name}.alpha": torch.tensor(4.0)}
    with pytest.raises(ModelFileError, match=r"SD3.*lora_unet_joint_blocks_0_context_block_attn_qkv"):
        lora_flux.create_network_from_weights(1.0, "sd3_lora.safetensors", None, None, tiny(), weights_sd=sd)


def test_a_flux_lora_on_chroma_is_refused_with_the_reason(tmp_path):
    flux_lora = create(tiny()).state_dict()
    with pytest.raises(ModelFileError, match="trained on FLUX.1"):
        lora_flux.create_network_from_weights(1.0, None, None, None, tiny(chroma=True), weights_sd=flux_lora)


def test_flux_blocks_with_lora_compile_as_one_graph():
    # --torch_compile compiles block by block: a graph break inside a block (an op dynamo cannot
    # trace, e.g. the LoRA once asking Tensor._is_view) splits it at every LoRA and recompiles.
    import torch._dynamo as dynamo

    from tests.test_offload import flux_inputs, tiny_flux_with_lora

    params, model, _ = tiny_flux_with_lora(depth=1, single=1)
    blocks, seen = (model.double_blocks[0], model.single_blocks[0]), {}
    for block in blocks:
        block.register_forward_pre_hook(lambda m, a, k: seen.setdefault(m, (a, k)) and None, with_kwargs=True)
    model(**flux_inputs(params))
    for block in blocks:
        args, kwargs = seen[block]
        report = dynamo.explain(block)(*args, **kwargs)
        assert (report.graph_count, report.graph_break_count) == (1, 0), [str(r.reason) for r in report.break_reasons]


@pytest.mark.slow
def test_compiled_lora_adds_its_up_projection_as_a_fused_sum():
    # Under --torch_compile the up-projection is a GEMM of its own plus an elementwise sum that
    # Inductor fuses; as one addmm with the base output as C, Inductor would copy C first. So the
    # compiled block's addmms are the base layers' (bias as C) and nothing more; outputs unchanged.
    import torch._dynamo
    from torch._inductor.utils import run_and_get_code

    from tests.test_offload import flux_inputs, tiny_flux_with_lora

    params, model, net = tiny_flux_with_lora(depth=1, single=1)
    block, seen = model.single_blocks[0], {}
    block.register_forward_pre_hook(lambda m, a, k: seen.setdefault(m, (a, k)) and None, with_kwargs=True)
    model(**flux_inputs(params))
    args, kwargs = seen[block]
    eager = block(*args, **kwargs)
    torch._dynamo.reset()
    compiled, codes = run_and_get_code(torch.compile(block), *args, **kwargs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    lora_layers = {id(m) for lora in net.loras for m in (lora.lora_down, lora.lora_up)}
    biased_bases = sum(isinstance(m, torch.nn.Linear) and m.bias is not None and id(m) not in lora_layers
                       for m in block.modules())
    assert biased_bases > 0 and len(lora_layers) > 0
    assert sum(code.count("extern_kernels.addmm(") for code in codes) <= biased_bases
