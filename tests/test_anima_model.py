"""Anima DiT + LLM adapter: full-size key layout, parity with diffusers (CosmosTransformer3DModel through
diffusers' own Cosmos converter; AnimaTextConditioner), RoPE facts, checkpointing, --split_attn."""

from __future__ import annotations

import math
import types
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from library.anima.llm_adapter import MIN_CONTEXT_LENGTH
from library.anima.model import ANIMA_PARAMS, Anima, rope3d_angles
from library.tiny.anima import anima_state_dict, tiny_anima_params

TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(autouse=True)
def _no_tf32():
    torch.manual_seed(0)


def _torchvision_stub(monkeypatch):
    """diffusers' Cosmos resizes the padding mask with torchvision (not installed here); the mask is
    given at the latent size, so a nearest-neighbour stand-in computes the same thing."""
    import diffusers.models.transformers.transformer_cosmos as cosmos

    resize = lambda x, size, interpolation=None: F.interpolate(x, size=size, mode="nearest")  # noqa: E731
    stub = types.SimpleNamespace(functional=types.SimpleNamespace(resize=resize),
                                 InterpolationMode=types.SimpleNamespace(NEAREST="nearest"))
    monkeypatch.setattr(cosmos, "transforms", stub, raising=False)


def diffusers_dit(params, state):
    from diffusers import CosmosTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    ref = CosmosTransformer3DModel(
        in_channels=params.in_channels, out_channels=params.out_channels, num_attention_heads=params.num_heads,
        attention_head_dim=params.head_dim, num_layers=params.num_blocks, mlp_ratio=params.mlp_ratio,
        text_embed_dim=params.crossattn_emb_channels, adaln_lora_dim=params.adaln_lora_dim,
        patch_size=(params.patch_temporal, params.patch_spatial, params.patch_spatial),
        rope_scale=params.rope_extrapolation, concat_padding_mask=True, extra_pos_embed_type=None,
    )
    # The file layout: ComfyUI's `net.` prefix; the adapter is not part of diffusers' transformer.
    dit_only = {f"net.{k}": v.clone() for k, v in state.items() if not k.startswith("llm_adapter.")}
    ref.load_state_dict(convert_cosmos_transformer_checkpoint_to_diffusers(dit_only), strict=True)
    # diffusers builds the q/k RMS norms with eps 1e-5; the original (and ours) use 1e-6.
    for name, module in ref.named_modules():
        if name.endswith(("norm_q", "norm_k")):
            module.eps = 1e-6
    return ref.eval()


@pytest.fixture(scope="module")
def tiny():
    params = tiny_anima_params()
    state = anima_state_dict(params, seed=5)
    model = Anima(params)
    model.load_state_dict(state, strict=True)
    return params, state, model.eval()


# ---------------------------------------------------------------------------------------------- layout


def test_full_size_keys_and_shapes_match_the_real_file():
    with torch.device("meta"):
        model = Anima(ANIMA_PARAMS)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["x_embedder.proj.1.weight"] == (2048, 68)
    assert shapes["t_embedder.1.linear_1.weight"] == (2048, 2048) and "t_embedder.1.linear_1.bias" not in shapes
    assert shapes["t_embedder.1.linear_2.weight"] == (6144, 2048)
    assert shapes["t_embedding_norm.weight"] == (2048,)
    assert shapes["blocks.27.cross_attn.k_proj.weight"] == (2048, 1024)
    assert shapes["blocks.0.self_attn.q_norm.weight"] == (128,)
    assert shapes["blocks.0.mlp.layer1.weight"] == (8192, 2048)
    assert shapes["blocks.0.adaln_modulation_mlp.1.weight"] == (256, 2048)
    assert shapes["blocks.0.adaln_modulation_mlp.2.weight"] == (6144, 256)
    assert shapes["final_layer.linear.weight"] == (64, 2048)
    assert shapes["final_layer.adaln_modulation.2.weight"] == (4096, 256)
    assert shapes["llm_adapter.embed.weight"] == (32128, 1024)
    assert shapes["llm_adapter.out_proj.bias"] == (1024,)
    assert shapes["llm_adapter.blocks.5.mlp.2.weight"] == (1024, 4096)
    assert "blocks.28.self_attn.q_proj.weight" not in shapes
    assert not any(k.endswith("bias") for k in shapes if k.startswith("blocks."))  # block linears have no biases
    assert {k.split(".")[0] for k in shapes} == {"x_embedder", "t_embedder", "t_embedding_norm", "llm_adapter",
                                                 "blocks", "final_layer"}


def test_diffusers_converter_maps_every_dit_key_onto_the_diffusers_model():
    from diffusers import CosmosTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    with torch.device("meta"):  # full widths; two blocks are enough for the per-block names
        ours = Anima(replace(ANIMA_PARAMS, num_blocks=2))
        ref = CosmosTransformer3DModel(num_attention_heads=16, attention_head_dim=128, num_layers=2,
                                       text_embed_dim=1024, rope_scale=(1.0, 4.0, 4.0), extra_pos_embed_type=None)
    state = {f"net.{k}": v for k, v in ours.state_dict().items() if not k.startswith("llm_adapter.")}
    converted = convert_cosmos_transformer_checkpoint_to_diffusers(state)
    assert set(converted) == set(ref.state_dict())
    assert all(tuple(converted[k].shape) == tuple(v.shape) for k, v in ref.state_dict().items())


def test_rope_split_and_ntk_bases_are_the_originals():
    angles = rope3d_angles(128, 1, 3, 5, (1.0, 4.0, 4.0))
    assert angles.shape == (15, 128)
    # Second half repeats the first (rotate-half convention); t: 44/2 = 22, h = w: 42/2 = 21 frequencies.
    assert torch.equal(angles[:, :64], angles[:, 64:])
    token = 1 * 5 + 2  # (t=0, h=1, w=2)
    theta_h = 10000.0 * 4.0 ** (42 / 40)
    assert angles[token, :22].abs().max() == 0  # t = 0
    assert angles[token, 22] == pytest.approx(1.0)  # h = 1, first frequency 1
    assert angles[token, 23] == pytest.approx(1.0 / theta_h ** (2 / 42), rel=1e-6)
    assert angles[token, 43] == pytest.approx(2.0)  # w = 2


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("five_d", [False, True])
def test_dit_matches_diffusers_cosmos(tiny, monkeypatch, five_d):
    _torchvision_stub(monkeypatch)
    params, state, ours = tiny
    ref = diffusers_dit(params, state)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 1, 6, 10, generator=g)  # non-square latent
    sigma = torch.tensor([0.13, 0.87])
    context = torch.randn(2, 20, params.crossattn_emb_channels, generator=g)
    with torch.no_grad():
        expected = ref(x, sigma, context, padding_mask=torch.zeros(1, 1, 6, 10), return_dict=False)[0]
        got = ours(x if five_d else x[:, :, 0], sigma, context)
    got = got if five_d else got.unsqueeze(2)
    assert got.shape == expected.shape == x.shape
    err = (got - expected).abs().max().item()
    assert err <= TOL * max(1.0, expected.abs().max().item()), err


def test_llm_adapter_matches_diffusers_anima_text_conditioner(tiny):
    from diffusers import AnimaTextConditioner

    params, state, ours = tiny
    p = params.llm_adapter
    ref = AnimaTextConditioner(source_dim=p.source_dim, target_dim=p.target_dim, model_dim=p.model_dim,
                               num_layers=p.num_layers, num_attention_heads=p.num_heads,
                               mlp_ratio=p.mlp_hidden / p.model_dim, target_vocab_size=p.vocab_size,
                               min_sequence_length=MIN_CONTEXT_LENGTH)
    adapter_state = {k[len("llm_adapter."):]: v for k, v in state.items() if k.startswith("llm_adapter.")}
    ref.load_state_dict(adapter_state, strict=True)
    g = torch.Generator().manual_seed(4)
    source = torch.randn(2, 12, p.source_dim, generator=g)
    source_mask = torch.ones(2, 12, dtype=torch.long)
    source_mask[1, 7:] = 0
    ids = torch.randint(2, p.vocab_size, (2, 9), generator=g)
    target_mask = torch.ones(2, 9, dtype=torch.long)
    target_mask[0, 5:] = 0
    with torch.no_grad():
        expected = ref.eval()(source, ids, target_mask, source_mask)
        got = ours.llm_adapter(source, ids, target_mask, source_mask)
    assert got.shape == expected.shape == (2, MIN_CONTEXT_LENGTH, p.target_dim)
    assert (got - expected).abs().max().item() <= TOL
    assert got[0, 5:].abs().max() == 0 and got[:, 9:].abs().max() == 0  # masked and padded positions are zero


def test_adapter_output_for_a_dropped_caption_is_finite(tiny):
    params, _, ours = tiny
    p = params.llm_adapter
    source = torch.zeros(1, 8, p.source_dim)
    ids = torch.tensor([[1] + [0] * 7])
    with torch.no_grad():
        out = ours.llm_adapter(source, ids, torch.tensor([[1] + [0] * 7]), torch.zeros(1, 8, dtype=torch.long))
    assert torch.isfinite(out).all() and out[0, 0].abs().sum() > 0


def test_dit_runs_the_adapter_when_given_t5_ids(tiny):
    params, _, ours = tiny
    g = torch.Generator().manual_seed(6)
    source = torch.randn(1, 10, params.llm_adapter.source_dim, generator=g)
    ids = torch.randint(2, 100, (1, 7), generator=g)
    mask = torch.ones(1, 7, dtype=torch.long)
    x, sigma = torch.randn(1, 16, 4, 4, generator=g), torch.tensor([0.5])
    with torch.no_grad():
        inside = ours(x, sigma, source, t5_input_ids=ids, t5_attn_mask=mask)
        outside = ours(x, sigma, ours.encode_context(source, ids, mask))
    assert torch.equal(inside, outside)


# ---------------------------------------------------------------------------------------------- training features


def _loss_and_grads(model, x, sigma, context):
    model.zero_grad(set_to_none=True)
    out = model(x, sigma, context)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    params = tiny_anima_params()
    model = Anima(params)
    model.load_state_dict(anima_state_dict(params, seed=7))
    g = torch.Generator().manual_seed(8)
    x, sigma = torch.randn(2, 16, 4, 6, generator=g), torch.rand(2, generator=g)
    context = torch.randn(2, 5, params.crossattn_emb_channels, generator=g)
    out_plain, grads_plain = _loss_and_grads(model, x, sigma, context)
    model.enable_gradient_checkpointing()
    out_ckpt, grads_ckpt = _loss_and_grads(model, x, sigma, context)
    assert torch.equal(out_plain, out_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys() and len(grads_plain) > 10
    for name in grads_plain:
        assert torch.allclose(grads_plain[name], grads_ckpt[name], atol=1e-6, rtol=1e-5), name


def test_split_attn_gives_the_same_output(tiny):
    params, _, ours = tiny
    g = torch.Generator().manual_seed(9)
    x, sigma = torch.randn(3, 16, 4, 4, generator=g), torch.rand(3, generator=g)
    context = torch.randn(3, 6, params.crossattn_emb_channels, generator=g)
    with torch.no_grad():
        whole = ours(x, sigma, context)
        ours.set_split_attn(True)
        try:
            split = ours(x, sigma, context)
        finally:
            ours.set_split_attn(False)
    assert torch.allclose(whole, split, atol=1e-6)


def test_output_depends_on_text_and_sigma(tiny):
    params, _, ours = tiny
    g = torch.Generator().manual_seed(10)
    x = torch.randn(1, 16, 4, 4, generator=g)
    c1, c2 = (torch.randn(1, 5, params.crossattn_emb_channels, generator=g) for _ in range(2))
    with torch.no_grad():
        base = ours(x, torch.tensor([0.5]), c1)
        assert not torch.allclose(base, ours(x, torch.tensor([0.5]), c2))
        assert not torch.allclose(base, ours(x, torch.tensor([0.6]), c1))
    assert math.isfinite(base.abs().sum().item())
