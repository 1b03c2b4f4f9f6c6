"""The family-agnostic LoRA core (networks/lora_core.py) and network_args parsing."""

from __future__ import annotations

import errno
import hashlib
import math
import os
import struct

import pytest
import safetensors.torch
import torch
from torch import nn

from library.errors import ConfigError, ModelFileError
from library.safetensors_io import SaveError, read_metadata
from networks.lora_core import (LayerRef, LoRANetwork, LoRAPlusRatios, apply_reg_lrs, find_layers,
                           identify_lora_layout, read_lora_modules, targets_from_weights)
from networks.network_args import (ArgSpec, COMMON_LORA_ARGS, last_match, parse_block_selection, parse_bool,
                                   parse_network_args, parse_probability, parse_rank, parse_regex_lrs,
                                   parse_regex_ranks)


class TinyMLP(nn.Module):
    def __init__(self, width: int = 8, hidden: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 6, 1)
        self.k3 = nn.Conv2d(6, 4, 3, stride=2, padding=1)

    def forward(self, x):
        return self.k3(torch.relu(self.pw(x)))


def build(model: nn.Module, rank: int = 4, alpha: float | None = 2.0, *, include_conv: bool = False,
          randomize_up: bool = True, **kwargs) -> LoRANetwork:
    layers = find_layers(model, "lora_unet", include_conv=include_conv)
    net = LoRANetwork([layer.target(rank, alpha) for layer in layers], family="Tiny", **kwargs)
    if randomize_up:
        with torch.no_grad():
            for m in net.loras:
                m.lora_up.weight.normal_(std=0.2)
    return net


# ---------------------------------------------------------------------------------------- math


def test_zero_init_up_makes_the_network_the_identity():
    torch.manual_seed(0)
    model = TinyMLP()
    x = torch.randn(2, 5, 8)
    before = model(x)
    net = build(model, randomize_up=False)
    net.apply_to(apply_text_encoder=False, apply_unet=True)
    assert torch.equal(model(x), before)
    for m in net.loras:
        assert torch.count_nonzero(m.lora_up.weight) == 0
        assert torch.count_nonzero(m.lora_down.weight) > 0
        # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
        assert m.lora_down.weight.abs().max() <= 1 / math.sqrt(m.lora_down.weight.shape[1]) + 1e-6


@pytest.mark.parametrize("alpha, expected_scale", [(2.0, 0.5), (None, 1.0), (0, 1.0), (16.0, 4.0)])
def test_forward_is_base_plus_multiplier_times_alpha_over_rank(alpha, expected_scale):
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    x = torch.randn(3, 8)
    base_out = layer(x)
    net = LoRANetwork([LayerRef("lora_unet_fc", layer).target(4, alpha)], family="Tiny", multiplier=0.7)
    m = net.loras[0]
    with torch.no_grad():
        m.lora_up.weight.normal_()
    net.apply_to(apply_text_encoder=False, apply_unet=True)
    assert m.scale == pytest.approx(expected_scale)
    assert m.alpha.dtype == torch.float32 and m.alpha.dim() == 0
    assert float(m.alpha) == pytest.approx(expected_scale * 4)
    expected = base_out + 0.7 * expected_scale * (x @ m.lora_down.weight.T @ m.lora_up.weight.T)
    torch.testing.assert_close(layer(x), expected)

    net.set_multiplier(0.0)
    torch.testing.assert_close(layer(x), base_out)
    net.set_multiplier(2)
    torch.testing.assert_close(layer(x), base_out + 2 * expected_scale * (x @ m.lora_down.weight.T @ m.lora_up.weight.T))


class _ViewOutput(torch.autograd.Function):
    """A base layer whose output is a view made inside a custom Function (as fp8's once was)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return (x @ weight.t()).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight, None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
@pytest.mark.parametrize("base_kind", ["linear", "view_output", "stacked"])
def test_lora_add_into_the_base_output_keeps_values_and_gradients(base_kind, device):
    # The up-projection adds into the base layer's output in place where autograd allows it;
    # where the output is a view (a custom Function's, or another LoRA's) it must not.
    torch.manual_seed(0)
    layer = nn.Linear(8, 6).to(device)
    if base_kind == "view_output":
        layer.forward = lambda x: _ViewOutput.apply(x, layer.weight)
    x = torch.randn(2, 3, 8, device=device, requires_grad=True)
    nets = [LoRANetwork([LayerRef("lora_unet_fc", layer).target(4, 2.0)], family="Tiny")
            for _ in range(2 if base_kind == "stacked" else 1)]
    for net in nets:
        net.to(device)
        with torch.no_grad():
            net.loras[0].lora_up.weight.normal_()
    with torch.no_grad():
        expected = x @ layer.weight.T + (layer.bias if base_kind != "view_output" else 0)
        for net in nets:
            m = net.loras[0]
            expected = expected + 0.5 * (x @ m.lora_down.weight.T @ m.lora_up.weight.T)
    for net in nets:
        net.apply_to(apply_text_encoder=False, apply_unet=True)
    out = layer(x)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    x_grad, ups = x.grad.clone(), [net.loras[0].lora_up.weight.grad.clone() for net in nets]

    # the same math written out, without the LoRA modules
    x.grad = None
    y = x @ layer.weight.T + (layer.bias if base_kind != "view_output" else 0)
    ups_ref = [net.loras[0].lora_up.weight.detach().clone().requires_grad_() for net in nets]
    for net, up in zip(nets, ups_ref):
        y = y + 0.5 * (x @ net.loras[0].lora_down.weight.detach().T @ up.T)
    y.square().sum().backward()
    torch.testing.assert_close(x_grad, x.grad)
    for got, ref in zip(ups, ups_ref):
        torch.testing.assert_close(got, ref.grad)


def test_lora_keeps_a_reference_to_the_base_layer_and_never_copies_it():
    model = TinyMLP()
    net = build(model)
    assert net.loras[0].base is model.fc1
    assert sorted(net.state_dict()) == sorted(
        f"lora_unet_{n}.{k}" for n in ("fc1", "fc2") for k in ("lora_down.weight", "lora_up.weight", "alpha"))
    assert all(p is not model.fc1.weight for p in net.parameters())
    assert sum(p.numel() for p in net.parameters()) == 4 * (8 + 16) * 2


def test_restore_and_reapply_and_stacking_order():
    torch.manual_seed(0)
    model = TinyMLP()
    x = torch.randn(2, 8)
    base_out = model(x)
    a, b = build(model), build(model)
    a.apply_to(apply_text_encoder=False, apply_unet=True)
    with_a = model(x)
    assert not torch.allclose(with_a, base_out)
    b.apply_to(apply_text_encoder=False, apply_unet=True)
    with_ab = model(x)
    assert not torch.allclose(with_ab, with_a)
    with pytest.raises(RuntimeError, match="reverse order"):
        a.restore()
    b.restore()
    torch.testing.assert_close(model(x), with_a)
    a.restore()
    assert torch.equal(model(x), base_out)
    assert "forward" not in model.fc1.__dict__
    a.reapply()
    torch.testing.assert_close(model(x), with_a)


@pytest.mark.parametrize("make_model, include_conv, shape", [
    (TinyMLP, False, (2, 5, 8)),
    (TinyConv, True, (2, 3, 9, 9)),
])
def test_merged_weights_equal_the_injected_network(make_model, include_conv, shape):
    torch.manual_seed(0)
    model = make_model()
    x = torch.randn(shape)
    base_out = model(x)
    net = build(model, rank=3, alpha=1.5, include_conv=include_conv, multiplier=0.8)
    net.apply_to(apply_text_encoder=False, apply_unet=True)
    injected = model(x)
    assert (injected - base_out).abs().max() > 1e-3
    net.merge_to()
    assert all("forward" not in m.base.__dict__ for m in net.loras)
    merged = model(x)
    assert (merged - injected).abs().max() < 1e-5
    with pytest.raises(RuntimeError):
        net.apply_to(apply_text_encoder=False, apply_unet=True)


def test_merge_is_not_a_no_op():
    torch.manual_seed(0)
    model = TinyConv()
    x = torch.randn(1, 3, 9, 9)
    base_out = model(x)
    net = build(model, include_conv=True)
    net.merge_to(multiplier=1.0)
    assert (model(x) - base_out).abs().max() > 1e-3


def test_bf16_base_with_fp32_lora_computes_in_the_input_dtype():
    torch.manual_seed(0)
    model = TinyMLP()
    x = torch.randn(2, 8)
    net = build(model)
    net.apply_to(apply_text_encoder=False, apply_unet=True)
    reference = model(x)
    model.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    out = model(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=5e-2, rtol=5e-2)
    model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=5e-2, rtol=5e-2)


def test_gradients_reach_only_the_lora_weights():
    model = TinyMLP()
    model.requires_grad_(False)
    net = build(model)
    net.apply_to(apply_text_encoder=False, apply_unet=True)
    model(torch.randn(2, 8)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert model.fc1.weight.grad is None


# ---------------------------------------------------------------------------------------- dropouts


def test_dropouts_act_only_in_training_mode():
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    x = torch.randn(4, 6, 8)
    net = LoRANetwork([LayerRef("lora_unet_fc", layer).target(8, 8.0)], family="Tiny",
                      dropout=0.3, rank_dropout=0.3, module_dropout=0.3)
    with torch.no_grad():
        net.loras[0].lora_up.weight.normal_()
    net.apply_to(apply_text_encoder=False, apply_unet=True)
    net.eval()
    first = layer(x)
    assert all(torch.equal(layer(x), first) for _ in range(5))
    net.train()
    outs = [layer(x) for _ in range(10)]
    assert any(not torch.allclose(o, first) for o in outs)


def test_module_dropout_skips_the_whole_module():
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    x = torch.randn(2, 8)
    base_out = layer(x)
    net = LoRANetwork([LayerRef("lora_unet_fc", layer).target(4, 4.0)], family="Tiny", module_dropout=0.5)
    with torch.no_grad():
        net.loras[0].lora_up.weight.normal_()
    net.apply_to(apply_text_encoder=False, apply_unet=True)
    net.eval()
    full = layer(x)
    net.train()
    outs = [layer(x) for _ in range(60)]
    skipped = sum(torch.equal(o, base_out) for o in outs)
    kept = sum(torch.allclose(o, full) for o in outs)
    assert skipped + kept == 60 and 10 < skipped < 50


def test_rank_dropout_masks_ranks_per_sample_and_rescales():
    torch.manual_seed(0)
    rank, p, batch, tokens = 6, 0.5, 3, 5
    layer = nn.Linear(8, 8, bias=False)
    nn.init.zeros_(layer.weight)  # so the layer's output is the LoRA delta alone
    net = LoRANetwork([LayerRef("lora_unet_fc", layer).target(rank, rank)], family="Tiny", rank_dropout=p)
    m = net.loras[0]
    with torch.no_grad():
        m.lora_up.weight.normal_()
    net.apply_to(apply_text_encoder=False, apply_unet=True)
    x = torch.randn(batch, tokens, 8)
    with torch.no_grad():
        down = x @ m.lora_down.weight.T  # (batch, tokens, rank)
        up = m.lora_up.weight  # (out, rank)
        net.eval()
        full = layer(x)
        net.train()
        for _ in range(5):
            out = layer(x)
            for b in range(batch):
                # out[b] = (down[b] * mask) @ up.T / (1 - p) with one 0/1 mask per sample over ranks,
                # shared by all tokens: solve for the mask and check it.
                design = (down[b][:, None, :] * up[None]).reshape(-1, rank)  # (tokens*out, rank)
                mask = torch.linalg.lstsq(design, out[b].reshape(-1, 1) * (1 - p)).solution.squeeze(1)
                torch.testing.assert_close(mask, mask.round(), atol=1e-3, rtol=0)
                torch.testing.assert_close(design @ mask.round(), out[b].reshape(-1) * (1 - p), atol=1e-4, rtol=1e-4)
        n = 4000
        mean = sum(layer(x) for _ in range(n)) / n  # the 1/(1-p) rescale keeps it unbiased
    torch.testing.assert_close(mean, full, atol=0.1 * full.abs().max().item(), rtol=0)


def test_network_dropout_is_validated():
    with pytest.raises(ConfigError, match="--network_dropout"):
        build(TinyMLP(), dropout=1.5)


# ---------------------------------------------------------------------------------------- optimizer


def _te_net():
    unet, te1, te3 = TinyMLP(), TinyMLP(), TinyMLP()
    layers = (find_layers(unet, "lora_unet") + find_layers(te1, "lora_te1", text_encoder_index=0)
              + find_layers(te3, "lora_te3", text_encoder_index=1))
    return layers


def _groups(params, descs):
    return {d: (g["lr"], len(g["params"])) for d, g in zip(descs, params)}


def test_param_groups_for_unet_and_each_text_encoder():
    net = LoRANetwork([l.target(4, 1) for l in _te_net()], family="Tiny")
    params, descs = net.prepare_optimizer_params([1e-5, 2e-5], 3e-4, 1e-3)
    assert _groups(params, descs) == {"textencoder 1": (1e-5, 4), "textencoder 2": (2e-5, 4), "unet": (3e-4, 4)}
    params, descs = net.prepare_optimizer_params([7e-5], None, 1e-3)  # one value: both text encoders
    assert _groups(params, descs) == {"textencoder 1": (7e-5, 4), "textencoder 2": (7e-5, 4), "unet": (1e-3, 4)}
    params, descs = net.prepare_optimizer_params(None, None, 1e-3)
    assert {lr for lr, _ in _groups(params, descs).values()} == {1e-3}
    with pytest.raises(ConfigError, match="text_encoder_lr has 2 values but text encoder 3"):
        _network_with_third_text_encoder().prepare_optimizer_params([1e-5, 2e-5], None, 1.0)


def _network_with_third_text_encoder():
    unet, te = TinyMLP(), TinyMLP()
    layers = find_layers(unet, "lora_unet") + find_layers(te, "lora_te3", text_encoder_index=2)
    return LoRANetwork([l.target(4, 1) for l in layers], family="Tiny")


def test_loraplus_puts_lora_up_in_its_own_groups():
    net = LoRANetwork([l.target(4, 1) for l in _te_net()], family="Tiny",
                      loraplus=LoRAPlusRatios(common=4.0, unet=16.0))
    params, descs = net.prepare_optimizer_params([1e-5, 2e-5], 1e-4, 1e-3)
    groups = _groups(params, descs)
    assert groups["unet"] == (1e-4, 2) and groups["unet plus"] == pytest.approx((16e-4, 2))
    assert groups["textencoder 1 plus"] == pytest.approx((4e-5, 2))
    assert groups["textencoder 2 plus"] == pytest.approx((8e-5, 2))
    plus_params = {id(p) for g, d in zip(params, descs) if d.endswith("plus") for p in g["params"]}
    ups = {id(m.lora_up.weight) for m in net.loras}
    assert plus_params == ups
    # explicit ratio arguments override the network_args ones
    params, descs = net.prepare_optimizer_params(None, 1e-4, 1e-3, loraplus_unet_lr_ratio=2.0)
    groups = _groups(params, descs)
    assert groups["unet plus"] == pytest.approx((2e-4, 2)) and "textencoder 1 plus" not in groups


def test_regex_lrs_make_their_own_groups_with_loraplus_inside_and_zero_freezes():
    layers = _te_net()
    rules = parse_regex_lrs(r"fc=5e-4,unet_fc2=0,te1_fc1=1e-2")
    targets = apply_reg_lrs([l.target(4, 1) for l in layers], rules)
    by_name = {t.lora_name: t.lr for t in targets}
    assert by_name["lora_unet_fc1"] == 5e-4 and by_name["lora_unet_fc2"] == 0 and by_name["lora_te1_fc1"] == 1e-2
    net = LoRANetwork(targets, family="Tiny", loraplus=LoRAPlusRatios(common=10.0))
    params, descs = net.prepare_optimizer_params(None, 1e-4, 1e-3)
    groups = _groups(params, descs)
    assert groups["unet lr=0.0005"] == (5e-4, 1) and groups["unet lr=0.0005 plus"] == pytest.approx((5e-3, 1))
    assert groups["textencoder 1 lr=0.01"] == (1e-2, 1)
    assert not any(d.startswith("unet lr=0 ") or d == "unet lr=0" for d in descs)
    frozen = net.lora_unet_fc2
    assert not frozen.lora_down.weight.requires_grad and not frozen.lora_up.weight.requires_grad
    trainable = {id(p) for p in net.get_trainable_params()}
    assert id(frozen.lora_up.weight) not in trainable and id(net.lora_unet_fc1.lora_up.weight) in trainable
    net.prepare_grad_etc()
    assert not frozen.lora_up.weight.requires_grad


def test_text_encoder_modules_left_out_by_apply_to_are_not_trained_or_saved():
    net = LoRANetwork([l.target(4, 1) for l in _te_net()], family="Tiny")
    net.apply_to(apply_text_encoder=False, apply_unet=True)
    assert {k.split(".")[0] for k in net.state_dict()} == {"lora_unet_fc1", "lora_unet_fc2"}
    params, descs = net.prepare_optimizer_params([1e-5], 1e-4, 1e-3)
    assert descs == ["unet"]
    with pytest.raises(TypeError):
        net.apply_to(None, None, False, True)  # keyword-only flags: a positional call fails loudly


def test_apply_to_accepts_the_sd_scripts_call_and_checks_the_models():
    unet, te1, te3 = TinyMLP(), TinyMLP(), TinyMLP()
    layers = (find_layers(unet, "lora_unet") + find_layers(te1, "lora_te1", text_encoder_index=0)
              + find_layers(te3, "lora_te3", text_encoder_index=1))
    net = LoRANetwork([l.target(4, 1) for l in layers], family="Tiny")
    assert net.has_text_encoder_loras()
    with pytest.raises(ValueError, match="another model"):
        net.apply_to([te1, te3], TinyMLP(), apply_text_encoder=True, apply_unet=True)
    net.apply_to([te1, te3], unet, apply_text_encoder=True, apply_unet=True)
    assert len(net.loras) == 6 and all("forward" in m.base.__dict__ for m in net.loras)


# ---------------------------------------------------------------------------------------- max norm


def test_scale_weight_norms_matches_the_full_product_math():
    torch.manual_seed(0)
    model = nn.ModuleDict({"big": nn.Linear(16, 12), "mid": nn.Linear(16, 12), "small": nn.Linear(16, 12),
                           "conv": nn.Conv2d(4, 5, 3)})
    net = LoRANetwork([l.target(4, 2.0) for l in find_layers(model, "lora_unet", include_conv=True)], family="Tiny")
    max_norm = 1.0
    targets = {"lora_unet_big": 3.0, "lora_unet_mid": 0.8, "lora_unet_small": 0.2, "lora_unet_conv": 5.0}
    with torch.no_grad():
        for m in net.loras:
            m.lora_up.weight.normal_()
            m.lora_down.weight.normal_()
            product = (m.lora_up.weight.flatten(1) @ m.lora_down.weight.flatten(1)) * m.scale
            factor = (targets[m.lora_name] / product.norm()).sqrt()
            m.lora_up.weight.mul_(factor)
            m.lora_down.weight.mul_(factor)
    before = {m.lora_name: (m.lora_up.weight.clone(), m.lora_down.weight.clone()) for m in net.loras}
    keys_scaled, mean_norm, max_seen = net.apply_max_norm_regularization(max_norm, "cpu")
    assert keys_scaled == 2
    norms = {}
    for m in net.loras:
        norms[m.lora_name] = ((m.lora_up.weight.flatten(1) @ m.lora_down.weight.flatten(1)) * m.scale).norm().item()
    assert norms["lora_unet_big"] == pytest.approx(1.0, rel=1e-4)
    assert norms["lora_unet_conv"] == pytest.approx(1.0, rel=1e-4)
    for name in ("lora_unet_mid", "lora_unet_small"):  # under the limit: untouched
        assert torch.equal(net.get_submodule(name).lora_up.weight, before[name][0])
    # up and down are each scaled by sqrt(ratio)
    ratio = 1.0 / 3.0
    torch.testing.assert_close(net.lora_unet_big.lora_up.weight, before["lora_unet_big"][0] * ratio ** 0.5)
    torch.testing.assert_close(net.lora_unet_big.lora_down.weight, before["lora_unet_big"][1] * ratio ** 0.5)
    assert mean_norm == pytest.approx((1.0 + 0.8 + 0.2 + 1.0) / 4, rel=1e-4)
    assert max_seen == pytest.approx(1.0, rel=1e-4)


# ---------------------------------------------------------------------------------------- save / load


def _file_tensor_bytes(data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    return data[8 + n:]


def test_save_and_load_round_trip_with_precision_alpha_and_hashes(tmp_path):
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(1024, 1024), "b": nn.Linear(1024, 512)})
    layers = find_layers(model, "lora_unet")
    net = LoRANetwork([layers[0].target(320, 64.0), layers[1].target(8, 3.0)], family="Tiny")
    with torch.no_grad():
        for m in net.loras:
            m.lora_up.weight.normal_(std=0.01)
    path = tmp_path / "out.safetensors"
    metadata = {"ss_network_dim": "320", "ss_network_alpha": "64.0", "modelspec.title": "t", "ss_seed": "42"}
    net.save_weights(path, torch.bfloat16, metadata)

    data = path.read_bytes()
    assert len(data) > 0x110000
    loaded = safetensors.torch.load(data)
    assert sorted(loaded) == sorted(f"{n}.{k}" for n in ("lora_unet_a", "lora_unet_b")
                                    for k in ("lora_down.weight", "lora_up.weight", "alpha"))
    assert all(t.dtype == torch.bfloat16 for t in loaded.values())  # alpha too, as sd-scripts does
    assert float(loaded["lora_unet_a.alpha"]) == 64.0 and float(loaded["lora_unet_b.alpha"]) == 3.0
    assert loaded["lora_unet_a.lora_down.weight"].shape == (320, 1024)
    assert torch.equal(loaded["lora_unet_a.lora_up.weight"], net.lora_unet_a.lora_up.weight.to(torch.bfloat16))

    meta = read_metadata(path)
    assert {k: meta[k] for k in metadata} == metadata
    # Recompute the hashes independently: model hash = sha256 of the tensor bytes of the file;
    # legacy = sha256 of 64 KiB at 1 MiB of a buffer serialized with only the ss_* metadata.
    assert meta["sshs_model_hash"] == hashlib.sha256(_file_tensor_bytes(data)).hexdigest()
    ss_only = safetensors.torch.save(loaded, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    assert _file_tensor_bytes(ss_only) == _file_tensor_bytes(data)
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    # (hashing the buffer with all metadata would give another legacy hash: the header shifts the bytes)
    with_title = safetensors.torch.save(loaded, metadata=metadata)
    assert hashlib.sha256(with_title[0x100000:0x110000]).hexdigest()[:8] != meta["sshs_legacy_hash"]

    fresh_model = nn.ModuleDict({"a": nn.Linear(1024, 1024), "b": nn.Linear(1024, 512)})
    fresh_model.load_state_dict(model.state_dict())
    fresh = LoRANetwork([l.target(r, 1.0) for l, r in zip(find_layers(fresh_model, "lora_unet"), (320, 8))],
                        family="Tiny")
    report = fresh.load_weights(path)
    assert report.loaded == 2
    assert fresh.lora_unet_a.scale == 64.0 / 320 and fresh.lora_unet_b.scale == 3.0 / 8  # alpha from the file
    torch.testing.assert_close(fresh.lora_unet_b.lora_up.weight, net.lora_unet_b.lora_up.weight.to(torch.bfloat16).float())


def test_small_file_legacy_hash_is_of_empty_input(tmp_path):
    net = build(TinyMLP())
    path = tmp_path / "small.safetensors"
    net.save_weights(path, None, None)
    meta = read_metadata(path)
    assert meta["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]
    assert meta["sshs_model_hash"] == hashlib.sha256(_file_tensor_bytes(path.read_bytes())).hexdigest()
    assert safetensors.torch.load_file(path)["lora_unet_fc1.alpha"].dtype == torch.float32


def test_metadata_values_must_be_strings(tmp_path):
    with pytest.raises(TypeError, match="str"):
        build(TinyMLP()).save_weights(tmp_path / "x.safetensors", None, {"ss_seed": 42})


def test_disk_full_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    net = build(TinyMLP())
    path = tmp_path / "lora.safetensors"
    net.save_weights(path, None, {"ss_steps": "1"})
    good = path.read_bytes()
    with torch.no_grad():
        net.lora_unet_fc1.lora_up.weight.add_(1.0)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(SaveError, match="disk is full"):
        net.save_weights(path, None, {"ss_steps": "2"})
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def test_load_state_dict_keeps_scale_in_step_with_alpha():
    net = build(TinyMLP(), rank=4, alpha=4.0)
    sd = net.state_dict()
    sd["lora_unet_fc1.alpha"] = torch.tensor(2.0)
    net.load_state_dict(sd)
    assert net.lora_unet_fc1.scale == 0.5 and net.lora_unet_fc2.scale == 1.0


def test_load_refuses_a_file_of_another_family_naming_its_keys():
    net = build(TinyMLP())
    sd3 = {}
    for i in range(2):
        name = f"lora_unet_joint_blocks_{i}_x_block_attn_qkv"
        sd3 |= {f"{name}.lora_down.weight": torch.zeros(4, 8), f"{name}.lora_up.weight": torch.zeros(24, 4),
                f"{name}.alpha": torch.tensor(4.0)}
    with pytest.raises(ModelFileError) as e:
        net.load_weights(sd3)
    msg = str(e.value)
    assert "SD3" in msg and "lora_unet_joint_blocks_0_x_block_attn_qkv" in msg and "Tiny" in msg
    assert "lora_unet_fc1" in msg  # the network's modules missing from the file are named too


def test_load_refuses_other_ranks_and_foreign_formats():
    net = build(TinyMLP(), rank=4)
    other = build(TinyMLP(), rank=8).state_dict()
    with pytest.raises(ModelFileError, match=r"rank 8 vs 4"):
        net.load_weights(other)
    with pytest.raises(ModelFileError, match="diffusers/PEFT"):
        net.load_weights({"transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8)})
    with pytest.raises(ModelFileError, match="LoHa"):
        net.load_weights({"lora_unet_fc1.hada_w1_a": torch.zeros(4, 8)})


def test_weights_file_drives_ranks_and_alphas():
    model = TinyMLP()
    sd = {
        "lora_unet_fc1.lora_down.weight": torch.zeros(3, 8), "lora_unet_fc1.lora_up.weight": torch.zeros(16, 3),
        "lora_unet_fc1.alpha": torch.tensor(1.5, dtype=torch.bfloat16),
        "lora_unet_fc2.lora_down.weight": torch.zeros(5, 16), "lora_unet_fc2.lora_up.weight": torch.zeros(8, 5),
        "lora_unet_extra.lora_down.weight": torch.zeros(2, 8), "lora_unet_extra.lora_up.weight": torch.zeros(8, 2),
    }
    saved = read_lora_modules(sd, "f")
    assert saved["lora_unet_fc1"].rank == 3 and saved["lora_unet_fc1"].alpha == 1.5
    assert saved["lora_unet_fc2"].alpha == 5.0  # no alpha key: alpha = rank
    targets, unmatched = targets_from_weights(find_layers(model, "lora_unet"), saved, "f")
    assert [(t.lora_name, t.rank, t.alpha) for t in targets] == [("lora_unet_fc1", 3, 1.5), ("lora_unet_fc2", 5, 5.0)]
    assert unmatched == ["lora_unet_extra"]
    bad = dict(sd)
    bad["lora_unet_fc1.lora_down.weight"] = torch.zeros(3, 9)
    bad["lora_unet_fc1.lora_up.weight"] = torch.zeros(16, 3)
    with pytest.raises(ModelFileError, match="another size"):
        targets_from_weights(find_layers(model, "lora_unet"), read_lora_modules(bad, "f"), "f")


def test_identify_lora_layout():
    assert identify_lora_layout(["lora_unet_double_blocks_0_img_attn_qkv"]).label.startswith("FLUX")
    assert identify_lora_layout(["lora_unet_layers_3_attention_qkv"]).label.startswith("Lumina")
    assert identify_lora_layout(["lora_unet_blocks_0_self_attn_q_proj"]).label.startswith("Anima")
    assert identify_lora_layout(["lora_unet_down_blocks_0_attentions_0_proj_in"]).label.startswith("SD 1")
    assert identify_lora_layout(["lora_unet_something"]) is None


def test_verbose_listing_names_rank_and_alpha():
    lines = build(TinyMLP(), rank=4, alpha=2.0).describe()
    assert len(lines) == 2 and "lora_unet_fc1" in lines[0] and "rank    4" in lines[0] and "alpha 2" in lines[0]


def test_empty_target_list_is_a_clear_error():
    with pytest.raises(ConfigError, match="no Tiny layer"):
        LoRANetwork([], family="Tiny")


# ---------------------------------------------------------------------------------------- network_args


def test_regex_rules_last_match_wins_and_commas_inside_patterns():
    rules = parse_regex_ranks(r"blocks=4, double_blocks_\d{1,2}_img=8 ,img=0")
    assert [(r.pattern.pattern, r.value) for r in rules] == [("blocks", 4), (r"double_blocks_\d{1,2}_img", 8),
                                                             ("img", 0)]
    assert last_match(rules, "lora_unet_double_blocks_1_img_attn").value == 0
    assert last_match(rules, "lora_unet_double_blocks_1_txt_attn").value == 4
    assert last_match(rules, "lora_te1_x") is None
    lrs = parse_regex_lrs(r"single_blocks_(\d|10)_=1e-3,double_blocks=2e-3")
    assert [r.value for r in lrs] == [1e-3, 2e-3]


@pytest.mark.parametrize("text, fragment", [
    ("img_attn", "pattern=rank"),
    ("img_attn=4.5", "invalid"),
    ("img_attn=-1", "invalid"),
    ("img_attn(=4", "regular expression"),
    ("=4", "empty pattern"),
])
def test_regex_rule_errors_are_clear(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_regex_ranks(text)


def test_unknown_and_bad_network_args_are_all_reported_with_suggestions():
    specs = COMMON_LORA_ARGS + (ArgSpec("img_attn_dim", parse_rank, ""),)
    with pytest.raises(ConfigError) as e:
        parse_network_args({"img_atn_dim": "4", "rank_dropout": "1.5", "verbose": "yes", "module_dropout": "0.1"},
                           specs, network_module="networks.lora_x")
    msg = str(e.value)
    assert "'img_atn_dim'" in msg and "did you mean 'img_attn_dim'" in msg
    assert "rank_dropout=1.5" in msg and "verbose=yes" in msg and "module_dropout" not in msg.split("Valid keys")[0]
    parsed = parse_network_args({"img_attn_dim": "4", "verbose": "True", "module_dropout": "0.1"}, specs,
                                network_module="m")
    assert parsed == {"img_attn_dim": 4, "verbose": True, "module_dropout": 0.1}


def test_scalar_parsers_are_strict():
    assert parse_bool("False") is False and parse_bool("True") is True
    for bad in ("1", "yes", ""):
        with pytest.raises(ValueError):
            parse_bool(bad)
    with pytest.raises(ValueError):
        parse_rank("4.0")
    assert parse_probability("0") is None and parse_probability("0.25") == 0.25
    with pytest.raises(ValueError):
        parse_probability("nan")


def test_block_selection():
    assert parse_block_selection("all").resolve(5, "k") == frozenset(range(5))
    assert parse_block_selection("none").resolve(5, "k") == frozenset()
    assert parse_block_selection("0, 2,5-7").resolve(19, "k") == frozenset({0, 2, 5, 6, 7})
    with pytest.raises(ConfigError, match="valid indices are 0-18"):
        parse_block_selection("3,19").resolve(19, "train_double_block_indices")
    for bad in ("", "8-5", "a", "1-"):
        with pytest.raises(ValueError):
            parse_block_selection(bad)
