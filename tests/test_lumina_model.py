"""Lumina Image 2.0 Next-DiT: parity with diffusers, caption masks, full-size layout, checkpointing,
and the right-padded attention path (SDPA mask / flash-attn varlen bookkeeping)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from library import attention as attn
from library.errors import ConfigError
from library.lumina.layers import FinalLayer, JointTransformerBlock
from library.lumina.model import VARIANTS, NextDiT
from library.tiny.lumina import lumina_state_dict, tiny_lumina_params

TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def diffusers_converter(q_dim: int, kv_dim: int):
    """diffusers' own Alpha-VLLM -> diffusers converter. It hard-codes the 2B model's qkv split
    (2304 / 768 / 768); we substitute the tiny sizes in its source and nothing else."""
    import diffusers.loaders.single_file_utils as sfu

    source = inspect.getsource(sfu.convert_lumina2_to_diffusers)
    patched = source.replace("q_dim = 2304", f"q_dim = {q_dim}").replace("k_dim = v_dim = 768",
                                                                         f"k_dim = v_dim = {kv_dim}")
    assert patched.count(str(q_dim)) >= 1 and patched != source, "diffusers changed its converter; update the helper"
    namespace = dict(vars(sfu))
    exec(patched, namespace)
    return namespace["convert_lumina2_to_diffusers"]


@pytest.fixture(scope="module")
def models():
    from diffusers import Lumina2Transformer2DModel

    params = tiny_lumina_params()
    state = lumina_state_dict(params, seed=7)
    ours = NextDiT(params)
    ours.load_state_dict(state, strict=True)
    ref = Lumina2Transformer2DModel(
        in_channels=params.in_channels, hidden_size=params.dim, num_layers=params.n_layers,
        num_refiner_layers=params.n_refiner_layers, num_attention_heads=params.n_heads,
        num_kv_heads=params.n_kv_heads, cap_feat_dim=params.cap_feat_dim, axes_dim_rope=params.axes_dims,
        axes_lens=params.axes_lens, norm_eps=params.norm_eps)
    convert = diffusers_converter(params.n_heads * params.head_dim, params.n_kv_heads * params.head_dim)
    ref.load_state_dict(convert({k: v.clone() for k, v in state.items()}), strict=True)
    return ours.eval(), ref.eval()


def _inputs(params, batch, h, w, n_cap, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(n_cap)[None] < torch.tensor(lengths)[:, None]).long()
    return (torch.randn(batch, params.in_channels, h, w, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, n_cap, params.cap_feat_dim, generator=g), mask)


@pytest.mark.parametrize("h,w,n_cap,lengths", [
    (6, 10, 12, [5, 12, 9]),    # ragged captions, non-square latent: masked context refiner and joint layers
    (8, 4, 16, [3, 3]),         # equal lengths after trimming: no joint mask
    (4, 4, 8, [8]),             # one full caption: nothing masked anywhere
])
@torch.no_grad()
def test_parity_with_diffusers(models, h, w, n_cap, lengths):
    ours, ref = models
    x, t, cap, mask = _inputs(ours.params, len(lengths), h, w, n_cap, lengths, seed=h)
    out = ours(x, t, cap, mask)
    expected = ref(x, t, cap, mask, return_dict=False)[0]
    assert out.shape == x.shape
    assert out.std() > 0.1, "degenerate output would make the comparison meaningless"
    assert (out - expected).abs().max() <= TOL


@torch.no_grad()
def test_caption_padding_never_matters(models):
    ours, _ = models
    x, t, cap, mask = _inputs(ours.params, 2, 4, 6, 10, [4, 7], seed=3)
    base = ours(x, t, cap, mask)
    noisy_padding = cap.clone()
    noisy_padding[0, 4:] = 5.0
    noisy_padding[1, 7:] = -3.0
    assert (ours(x, t, noisy_padding, mask) - base).abs().max() <= TOL
    longer = torch.cat((cap, torch.randn(2, 6, cap.shape[-1])), dim=1)
    longer_mask = torch.cat((mask, torch.zeros(2, 6, dtype=mask.dtype)), dim=1)
    assert (ours(x, t, longer, longer_mask) - base).abs().max() <= TOL
    # Each sample is independent of the others' caption lengths.
    alone = ours(x[:1], t[:1], cap[:1, :4], mask[:1, :4])
    assert (alone - base[:1]).abs().max() <= TOL
    real_change = cap.clone()
    real_change[0, 3] += 1.0
    assert (ours(x, t, real_change, mask) - base)[0].abs().max() > 1e-3


@pytest.mark.parametrize("lengths", [[5, 12, 9], [12], [3, 3]])
def test_fixed_length_forward_matches_and_reads_nothing_to_the_host(models, monkeypatch, lengths):
    # --cuda_graph: the padded caption length is kept and the lengths stay tensors; outputs and
    # gradients equal the trimmed forward's (and the reference's), and no host read happens.
    ours, ref = models
    x, t, cap, mask = _inputs(ours.params, len(lengths), 6, 4, 12, lengths, seed=5)
    cap.requires_grad_(True)
    trimmed = ours(x, t, cap, mask)
    (grad_trimmed,) = torch.autograd.grad(trimmed.square().sum(), cap)

    import library.lumina.model as lumina_model
    monkeypatch.setattr(lumina_model, "caption_lengths", lambda *a: pytest.fail("caption lengths read to the host"))
    monkeypatch.setattr(lumina_model, "right_padding", lambda *a: pytest.fail("host-side padding"))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("tolist in the fixed-length forward"))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("item in the fixed-length forward"))
    fixed = ours(x, t, cap, mask, fixed_length=True)
    (grad_fixed,) = torch.autograd.grad(fixed.square().sum(), cap)
    monkeypatch.undo()
    assert (fixed - trimmed).abs().max() <= TOL
    with torch.no_grad():
        assert (fixed - ref(x, t, cap, mask, return_dict=False)[0]).abs().max() <= TOL
    assert torch.allclose(grad_fixed, grad_trimmed, atol=1e-5)


def test_device_padding_is_a_key_mask_and_refuses_flash_varlen(monkeypatch):
    padding = attn.right_padding_on_device(torch.tensor([2, 4]), 4)
    assert padding.key_mask[:, 0, 0].tolist() == [[True, True, False, False], [True] * 4]
    assert padding.token_indices is None and padding.lengths is None
    monkeypatch.setattr(attn, "_selected", "flash")
    q = torch.randn(2, 1, 4, 8, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))   # as on a GPU
    with pytest.raises(ValueError, match="needs the lengths on the host"):
        attn.attention_right_padded(q, q, q, padding)


@torch.no_grad()
def test_timestep_runs_towards_the_image(models):
    """t is the model time (1 = clean): the embedder takes it without FLUX's x1000."""
    ours, _ = models
    from library.flux.layers import timestep_embedding

    t = torch.tensor([0.0, 0.25, 1.0])
    expected = ours.t_embedder.mlp(timestep_embedding(t, 256, time_factor=1.0))
    assert torch.allclose(ours.t_embedder(t), expected)
    assert not torch.allclose(ours.t_embedder(t), ours.t_embedder(t * 1000))


def test_bad_inputs_are_refused(models):
    ours, _ = models
    x, t, cap, mask = _inputs(ours.params, 2, 4, 4, 6, [3, 6])
    with pytest.raises(ValueError, match="right-padded"):
        ours(x, t, cap, mask.flip(1))
    with pytest.raises(ValueError, match="at least one real token"):
        ours(x, t, cap, mask * torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ours(x[..., :3], t, cap, mask)
    with pytest.raises(ValueError, match="at most 299"):
        ours(x[:1], t[:1], torch.zeros(1, 300, cap.shape[-1]), None)
    with pytest.raises(ValueError, match="caption mask of shape"):
        ours(x, t, cap, mask[:, :4])


def test_full_size_layout_matches_the_real_files():
    with torch.device("meta"):
        model = NextDiT(VARIANTS["lumina2"].params)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 400  # the published file's tensor count
    expected = {
        "t_embedder.mlp.0.weight": (1024, 256), "t_embedder.mlp.2.weight": (1024, 1024),
        "cap_embedder.0.weight": (2304,), "cap_embedder.1.weight": (2304, 2304), "x_embedder.weight": (2304, 64),
        "layers.25.attention.qkv.weight": (3840, 2304), "layers.0.attention.out.weight": (2304, 2304),
        "layers.0.attention.q_norm.weight": (96,), "layers.0.attention.k_norm.weight": (96,),
        "layers.0.feed_forward.w1.weight": (9216, 2304), "layers.0.feed_forward.w2.weight": (2304, 9216),
        "layers.0.feed_forward.w3.weight": (9216, 2304), "layers.0.adaLN_modulation.1.weight": (9216, 1024),
        "layers.0.adaLN_modulation.1.bias": (9216,), "noise_refiner.1.adaLN_modulation.1.weight": (9216, 1024),
        "context_refiner.1.ffn_norm2.weight": (2304,), "norm_final.weight": (2304,),
        "final_layer.linear.weight": (64, 2304), "final_layer.adaLN_modulation.1.weight": (2304, 1024),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert not any(k.startswith("context_refiner.") and "adaLN" in k for k in shapes)
    assert not any(k.endswith("bias") and (".attention." in k or ".feed_forward." in k) for k in shapes)

    # The LoRA targets: every Linear inside JointTransformerBlock and FinalLayer (FORMATS 4.4: 180).
    blocks = [(bn, b) for bn, b in model.named_modules() if isinstance(b, (JointTransformerBlock, FinalLayer))]
    names = [f"{bn}.{ln}" for bn, block in blocks for ln, m in block.named_modules() if isinstance(m, nn.Linear)]
    assert len(names) == 180
    assert {"layers.25.attention.qkv", "context_refiner.0.feed_forward.w3", "final_layer.adaLN_modulation.1"} <= set(
        names)


def test_full_size_keys_are_what_diffusers_converts():
    """diffusers' converter, unpatched, maps our full-size state dict onto its model exactly."""
    import diffusers.loaders.single_file_utils as sfu
    from diffusers import Lumina2Transformer2DModel

    with torch.device("meta"):
        ours = NextDiT(VARIANTS["lumina2"].params)
        ref = Lumina2Transformer2DModel(cap_feat_dim=2304)
    converted = sfu.convert_lumina2_to_diffusers(dict(ours.state_dict()))
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape)
                                                                 for k, v in ref.state_dict().items()}


def test_gradient_checkpointing_gives_the_same_gradients_and_recomputes(models):
    ours, _ = models
    model = NextDiT(ours.params)
    model.load_state_dict(ours.state_dict())
    x, t, cap, mask = _inputs(model.params, 2, 4, 4, 6, [3, 6], seed=5)

    calls = []
    for block in [*model.layers, *model.noise_refiner, *model.context_refiner]:
        def counting(*args, _forward=block.forward, **kwargs):
            calls.append(1)
            return _forward(*args, **kwargs)
        block.forward = counting

    def run():
        latents = x.clone().requires_grad_(True)
        out = model(latents, t, cap, mask)
        out.square().mean().backward()
        grads = [p.grad.clone() for p in model.layers[0].parameters()]
        model.zero_grad()
        return out.detach(), latents.grad, grads

    out_plain, x_grad_plain, grads_plain = run()
    plain_calls = len(calls)
    calls.clear()
    model.enable_gradient_checkpointing()
    out_ckpt, x_grad_ckpt, grads_ckpt = run()
    assert len(calls) == 2 * plain_calls, "checkpointed blocks run their forward again in backward"
    assert torch.allclose(out_plain, out_ckpt, atol=1e-6)
    assert torch.allclose(x_grad_plain, x_grad_ckpt, atol=1e-6)
    for a, b in zip(grads_plain, grads_ckpt):
        assert torch.allclose(a, b, atol=1e-6)


def test_right_padding_description():
    assert attn.right_padding([5, 5], 5, "cpu") is None, "nothing padded: run unmasked"
    padding = attn.right_padding([2, 4], 4, "cpu")
    assert padding.key_mask[:, 0, 0].tolist() == [[True, True, False, False], [True] * 4]
    assert padding.token_indices.tolist() == [0, 1, 4, 5, 6, 7]
    assert padding.cu_seqlens.tolist() == [0, 2, 6] and padding.cu_seqlens.dtype == torch.int32
    with pytest.raises(ValueError, match="must lie in"):
        attn.right_padding([0, 3], 3, "cpu")


def test_varlen_path_packs_and_unpacks_exactly(monkeypatch):
    """flash-attn's varlen kernel sees only the real tokens; emulated here by per-sequence SDPA."""
    def reference_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and max_seqlen_q == max_seqlen_k == 7
        outs = []
        for start, end in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
            seq = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # (H, n, D)
            outs.append(torch.nn.functional.scaled_dot_product_attention(*seq).transpose(0, 1))
        return torch.cat(outs)

    monkeypatch.setattr(attn, "_flash_varlen_kernel", lambda: reference_kernel)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 16, generator=g) for _ in range(3))
    padding = attn.right_padding([3, 7, 5], 7, "cpu")
    packed = attn._flash_varlen(q, k, v, padding)
    masked = attn.attention_right_padded(q, k, v, padding)  # CPU: SDPA with the key mask
    real = padding.key_mask[:, 0, 0, :, None].expand(-1, -1, 16)[:, None].expand(-1, 2, -1, -1)
    assert torch.allclose(packed[real], masked[real], atol=1e-6)
    assert packed[~real].abs().max() == 0, "padded query rows come back as zeros"


def test_flash_attention_without_the_package_says_how_to_fix():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match=r"needs the `flash_attn` package.*pip install flash-attn"):
        attn.set_attention_backend("flash")
    assert attn.get_attention_backend() == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_agrees_with_cpu_including_flash_varlen():
    import importlib.util

    params = tiny_lumina_params()
    model = NextDiT(params)
    model.load_state_dict(lumina_state_dict(params, seed=9))
    x, t, cap, mask = _inputs(params, 3, 8, 6, 20, [4, 20, 11], seed=2)
    with torch.no_grad():
        cpu = model(x, t, cap, mask)
        model.cuda()
        args = (x.cuda(), t.cuda(), cap.cuda(), mask.cuda())
        assert (model(*args).cpu() - cpu).abs().max() < 1e-3
        model.bfloat16()
        bf16_args = (args[0].bfloat16(), args[1].bfloat16(), args[2].bfloat16(), args[3])
        sdpa = model(*bf16_args).float().cpu()
        assert (sdpa - cpu).abs().mean() < 0.05 * cpu.abs().mean()
        if importlib.util.find_spec("flash_attn") is not None:
            attn.set_attention_backend("flash")
            try:
                flash = model(*bf16_args).float().cpu()
            finally:
                attn.set_attention_backend("sdpa")
            assert (flash - cpu).abs().mean() < 0.05 * cpu.abs().mean()
