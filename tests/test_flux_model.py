"""FLUX.1 / Chroma DiT: key layout of the full-size model, parity with diffusers, masks, checkpointing."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from library.flux.chroma import Chroma, attend_one_padding_token
from library.flux.layers import DoubleStreamBlock, SingleStreamBlock, rope_frequencies
from library.flux.model import VARIANTS, Flux, drop_unattended_text
from library.flux.sampling import prepare_img_ids, prepare_txt_ids
from library.tiny.flux import flux_state_dict, tiny_flux_params

TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def diffusers_converter(chroma: bool, hidden_size: int):
    """diffusers' own BFL -> diffusers converter. It hard-codes `inner_dim = 3072` to split the
    single blocks' linear1; we substitute the tiny width in its source and nothing else."""
    import diffusers.loaders.single_file_utils as sfu

    fn = (sfu.convert_chroma_transformer_checkpoint_to_diffusers if chroma
          else sfu.convert_flux_transformer_checkpoint_to_diffusers)
    source = inspect.getsource(fn)
    patched = source.replace("inner_dim = 3072", f"inner_dim = {hidden_size}")
    assert patched != source, "diffusers changed its converter; update this test helper"
    namespace = dict(vars(sfu))
    exec(patched, namespace)
    return namespace[fn.__name__]


def diffusers_reference(variant: str, state: dict[str, torch.Tensor]):
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel

    p = tiny_flux_params(variant)
    chroma = variant == "chroma"
    common = dict(num_layers=p.depth, num_single_layers=p.depth_single_blocks, attention_head_dim=p.head_dim,
                  num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim, axes_dims_rope=p.axes_dim)
    if chroma:
        ref = ChromaTransformer2DModel(**common, approximator_num_channels=p.approximator_in_dim,
                                       approximator_hidden_dim=p.approximator_hidden_dim,
                                       approximator_layers=p.approximator_depth)
    else:
        ref = FluxTransformer2DModel(**common, pooled_projection_dim=p.vec_in_dim, guidance_embeds=p.guidance_embed)
    converted = diffusers_converter(chroma, p.hidden_size)({k: v.clone() for k, v in state.items()})
    ref.load_state_dict(converted, strict=True)
    if chroma:
        # diffusers' approximator uses nn.RMSNorm with eps = float32 machine eps; Chroma (and
        # sd-scripts) use 1e-6. Align the reference to the original model.
        for norm in ref.distilled_guidance_layer.norms:
            norm.eps = 1e-6
    return ref.eval()


@pytest.fixture(scope="module", params=["dev", "schnell", "chroma"])
def models(request):
    variant = request.param
    params = tiny_flux_params(variant)
    state = flux_state_dict(variant, params, seed=11)
    ours = (Chroma if variant == "chroma" else Flux)(params)
    ours.load_state_dict(state, strict=True)
    return variant, ours.eval(), diffusers_reference(variant, state)


def _inputs(params, batch, h, w, n_txt, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        img=torch.randn(batch, h * w, 64, generator=g),
        img_ids=prepare_img_ids(batch, h, w),
        txt=torch.randn(batch, n_txt, params.context_in_dim, generator=g),
        txt_ids=prepare_txt_ids(batch, n_txt),
        timesteps=torch.rand(batch, generator=g),
        y=torch.randn(batch, params.vec_in_dim, generator=g),
        guidance=torch.full((batch,), 3.5) if params.guidance_embed else None,
    )


def _run_reference(ref, variant, x, key_mask=None):
    kwargs = dict(hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["timesteps"],
                  img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], return_dict=False)
    if variant == "chroma":
        return ref(**kwargs, attention_mask=key_mask)[0]
    kwargs.update(pooled_projections=x["y"], guidance=x["guidance"])
    attn = None if key_mask is None else {"attention_mask": key_mask[:, None, None, :]}
    return ref(**kwargs, joint_attention_kwargs=attn)[0]


@pytest.mark.parametrize("h,w,n_txt,batch", [(4, 4, 7, 1), (3, 5, 9, 2), (6, 2, 5, 2)])
@torch.no_grad()
def test_parity_with_diffusers_without_mask(models, h, w, n_txt, batch):
    variant, ours, ref = models
    x = _inputs(ours.params, batch, h, w, n_txt)
    out = ours(**x)
    expected = _run_reference(ref, variant, x)
    assert out.shape == (batch, h * w, 64)
    assert out.std() > 0.1, "degenerate output would make the comparison meaningless"
    assert (out - expected).abs().max() <= TOL


@pytest.mark.parametrize("h,w,n_txt", [(4, 3, 8), (2, 6, 6)])
@torch.no_grad()
def test_parity_with_diffusers_with_t5_mask(models, h, w, n_txt):
    variant, ours, ref = models
    x = _inputs(ours.params, 2, h, w, n_txt, seed=1)
    lengths = torch.tensor([3, n_txt - 1])
    mask = (torch.arange(n_txt)[None] < lengths[:, None]).long()
    out = ours(**x, txt_attention_mask=mask)
    # The references take the key mask over their joint order (text first). Chroma attends to
    # one padding token after each caption; its diffusers pipeline builds that mask itself.
    attended = lengths + 1 if variant == "chroma" else lengths
    txt_keys = torch.arange(n_txt)[None] < attended[:, None]
    key_mask = torch.cat((txt_keys, torch.ones(2, h * w, dtype=torch.bool)), dim=1)
    expected = _run_reference(ref, variant, x, key_mask)
    assert (out - expected).abs().max() <= TOL
    assert (out - ours(**x)).abs().max() > 1e-3, "the mask must change the output"


@torch.no_grad()
def test_chroma_attends_exactly_one_padding_token():
    params = tiny_flux_params("chroma")
    model = Chroma(params)
    model.load_state_dict(flux_state_dict("chroma", params, seed=2))
    x = _inputs(params, 1, 3, 3, 10, seed=3)
    x.pop("y")
    mask = (torch.arange(10) < 4).long()[None]
    base = model(**x, txt_attention_mask=mask)

    later = dict(x, txt=x["txt"].clone())
    later["txt"][:, 5:] = 7.0   # beyond the attended padding token: no effect
    assert torch.equal(model(**later, txt_attention_mask=mask), base)
    first_pad = dict(x, txt=x["txt"].clone())
    first_pad["txt"][:, 4] = 7.0  # the one attended padding token: changes the output
    assert (model(**first_pad, txt_attention_mask=mask) - base).abs().max() > 1e-4

    model.trim_padded_text = False
    assert (model(**x, txt_attention_mask=mask) - base).abs().max() <= TOL


def test_padding_helpers():
    mask = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
    opened = attend_one_padding_token(mask)
    assert opened.long().sum(1).tolist() == [3, 5]
    assert attend_one_padding_token(torch.ones(1, 4)).all(), "no room: nothing added"

    txt, ids = torch.randn(2, 8, 4), torch.zeros(2, 8, 3)
    t, i, m = drop_unattended_text(txt, ids, opened)
    assert t.shape[1] == i.shape[1] == 5 and torch.equal(t, txt[:, :5])
    assert m.tolist() == [[True, True, True, False, False], [True] * 5]
    t, _, m = drop_unattended_text(txt[:1], ids[:1], mask[:1])
    assert t.shape[1] == 2 and m is None, "a fully attended remainder needs no mask"


@pytest.mark.parametrize("variant", ["dev", "chroma"])
@torch.no_grad()
def test_trimming_padded_text_is_exact(variant):
    params = tiny_flux_params(variant)
    model = (Chroma if variant == "chroma" else Flux)(params)
    model.load_state_dict(flux_state_dict(variant, params, seed=6))
    x = _inputs(params, 2, 3, 4, 12, seed=8)
    for lengths in ([4, 9], [5, 5]):
        mask = (torch.arange(12)[None] < torch.tensor(lengths)[:, None]).long()
        trimmed = model(**x, txt_attention_mask=mask)
        model.trim_padded_text = False
        full = model(**x, txt_attention_mask=mask)
        model.trim_padded_text = True
        assert (trimmed - full).abs().max() <= TOL


@pytest.mark.parametrize("variant,n_keys,n_lora", [("dev", 780, 304), ("schnell", 776, 304), ("chroma", 643, 228)])
def test_full_size_layout_matches_the_real_files(variant, n_keys, n_lora):
    with torch.device("meta"):
        model = (Chroma if variant == "chroma" else Flux)(VARIANTS[variant].params)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == n_keys
    expected = {
        "img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096), "final_layer.linear.weight": (64, 3072),
        "double_blocks.18.img_attn.qkv.weight": (9216, 3072), "double_blocks.0.txt_attn.norm.key_norm.scale": (128,),
        "double_blocks.0.img_mlp.0.weight": (12288, 3072), "double_blocks.0.txt_mlp.2.weight": (3072, 12288),
        "single_blocks.37.linear1.weight": (21504, 3072), "single_blocks.0.linear2.weight": (3072, 15360),
        "single_blocks.0.norm.query_norm.scale": (128,),
    }
    if variant == "chroma":
        expected |= {"distilled_guidance_layer.in_proj.weight": (5120, 64),
                     "distilled_guidance_layer.layers.4.out_layer.weight": (5120, 5120),
                     "distilled_guidance_layer.norms.4.scale": (5120,),
                     "distilled_guidance_layer.out_proj.weight": (3072, 5120)}
        assert not any("_mod." in k or "modulation" in k or k.startswith(("time_in", "vector_in")) for k in shapes)
    else:
        expected |= {"time_in.in_layer.weight": (3072, 256), "vector_in.in_layer.weight": (3072, 768),
                     "double_blocks.0.img_mod.lin.weight": (18432, 3072),
                     "single_blocks.0.modulation.lin.weight": (9216, 3072),
                     "final_layer.adaLN_modulation.1.weight": (6144, 3072)}
    if variant == "dev":
        expected["guidance_in.out_layer.weight"] = (3072, 3072)
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert ("guidance_in.in_layer.weight" in shapes) == (variant == "dev")

    # The LoRA targets: every Linear inside DoubleStreamBlock / SingleStreamBlock.
    blocks = [(bn, b) for bn, b in model.named_modules() if isinstance(b, (DoubleStreamBlock, SingleStreamBlock))]
    names = [f"{bn}.{ln}" for bn, block in blocks for ln, m in block.named_modules() if isinstance(m, nn.Linear)]
    assert len(names) == n_lora
    assert "double_blocks.0.img_attn.qkv" in names and "single_blocks.37.linear2" in names


@pytest.mark.parametrize("variant", ["dev", "chroma"])
def test_gradient_checkpointing_gives_the_same_gradients_and_recomputes(variant):
    params = tiny_flux_params(variant)
    model = (Chroma if variant == "chroma" else Flux)(params)
    model.load_state_dict(flux_state_dict(variant, params, seed=5))
    x = _inputs(params, 2, 3, 4, 6, seed=4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6])

    calls = []
    for block in model.double_blocks:  # count forward runs (hooks do not fire on recomputation)
        def counting(*args, _forward=block.forward, **kwargs):
            calls.append(1)
            return _forward(*args, **kwargs)
        block.forward = counting

    def run():
        img = x["img"].clone().requires_grad_(True)
        out = model(**(x | {"img": img}), txt_attention_mask=mask)
        out.square().mean().backward()
        grads = [p.grad.clone() for p in model.single_blocks[0].parameters()]
        model.zero_grad()
        return out.detach(), img.grad, grads

    out_plain, img_grad_plain, grads_plain = run()
    plain_calls = len(calls)
    calls.clear()
    model.enable_gradient_checkpointing()
    out_ckpt, img_grad_ckpt, grads_ckpt = run()
    assert len(calls) == 2 * plain_calls, "checkpointed blocks run their forward again in backward"
    assert torch.allclose(out_plain, out_ckpt, atol=1e-6)
    assert torch.allclose(img_grad_plain, img_grad_ckpt, atol=1e-6)
    for a, b in zip(grads_plain, grads_ckpt):
        assert torch.allclose(a, b, atol=1e-6)
    model.disable_gradient_checkpointing()
    calls.clear()
    run()
    assert len(calls) == plain_calls


def test_dev_needs_guidance_and_schnell_ignores_it():
    params = tiny_flux_params("dev")
    model = Flux(params)
    x = _inputs(params, 1, 2, 2, 3)
    with pytest.raises(ValueError, match="guidance"):
        model(**(x | {"guidance": None}))
    assert not hasattr(Flux(tiny_flux_params("schnell")), "guidance_in")


def test_rope_angles_are_computed_in_float64():
    positions = torch.tensor([[0.0, 1.0, 511.0, 4095.0]])
    freqs = rope_frequencies(positions, 56, 10000)
    inv = 1.0 / (10000 ** (torch.arange(0, 56, 2, dtype=torch.float64) / 56))
    angles = positions.double()[..., None] * inv
    assert freqs.dtype == torch.float32
    assert torch.allclose(freqs[..., 0].double(), angles.cos(), atol=1e-7)
    assert torch.allclose(freqs[..., 1].double(), angles.sin(), atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_attention_and_model_agree_with_cpu():
    from library.attention import attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    key_mask = torch.rand(2, 1, 1, 300, device="cuda", generator=g) > 0.3
    for mask in (None, key_mask):
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        ref_leaves = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
        out = attention(*leaves, mask)
        expected = torch.nn.functional.scaled_dot_product_attention(*ref_leaves, attn_mask=mask)
        assert (out.float() - expected).abs().max() < 3e-2
        grad = torch.randn_like(expected)
        out.backward(grad.to(out.dtype))
        expected.backward(grad)
        for a, b in zip(leaves, ref_leaves):
            assert (a.grad.float() - b.grad).abs().max() < 5e-2 * b.grad.abs().max()

    params = tiny_flux_params("dev")
    model = Flux(params)
    model.load_state_dict(flux_state_dict("dev", params, seed=1))
    x = _inputs(params, 2, 4, 6, 7)
    x["txt_attention_mask"] = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        cpu = model(**x)
        gpu = model.cuda()(**{k: v.cuda() if v is not None else None for k, v in x.items()}).cpu()
        assert (cpu - gpu).abs().max() < 1e-3
        bf16 = model.to(torch.bfloat16)(**{k: v.cuda().to(torch.bfloat16) if v is not None and v.is_floating_point()
                                           else (v.cuda() if v is not None else None) for k, v in x.items()})
    assert (cpu - bf16.float().cpu()).abs().mean() < 0.05 * cpu.abs().mean()


def test_attention_backend_selection():
    import importlib.util

    from library import attention as attn
    from library.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown attention backend"):
        attn.set_attention_backend("fast")
    for name, package in (("flash", "flash_attn"), ("xformers", "xformers"), ("sage", "sageattention")):
        if importlib.util.find_spec(package) is None:
            with pytest.raises(ConfigError, match=f"needs the `{package}` package"):
                attn.set_attention_backend(name)
    assert attn.get_attention_backend() == "sdpa"
    q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)
    mask = torch.tensor([True, True, False, True, False])[None, None, None, :]
    expected = torch.softmax((q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~mask, float("-inf")), dim=-1) @ v
    assert torch.allclose(attn.attention(q, k, v, mask), expected, atol=1e-6)
