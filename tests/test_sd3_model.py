"""SD3 / SD3.5 MMDiT: parity with diffusers' SD3Transformer2DModel (through diffusers' own
single-file converter), the full-size layouts, positional embedding crops and options,
gradient checkpointing, and the sampler."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from library.sd3.model import VARIANTS, MMDiT, SingleDiTBlock
from library.sd3.pos_embed import (ScaledPosEmbeds, latent_sizes_for_resolutions, scaled_sincos_table,
                                   sincos_table)
from library.sd3.sampling import denoise, get_sigmas, initial_noise, round_image_size
from library.sd3.text import SD3Conditioning
from library.tiny.sd3 import DIT_PREFIX, mmdit_state_dict, tiny_sd3_params

TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def diffusers_reference(params, state: dict[str, torch.Tensor]):
    """diffusers' SD3Transformer2DModel filled by diffusers' converter from the SAI layout."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    ref = SD3Transformer2DModel(
        sample_size=32, patch_size=params.patch_size, in_channels=params.in_channels, num_layers=params.depth,
        attention_head_dim=params.head_dim, num_attention_heads=params.num_heads,
        joint_attention_dim=params.context_in_features, caption_projection_dim=params.hidden_size,
        pooled_projection_dim=params.adm_in_channels, out_channels=params.in_channels,
        pos_embed_max_size=params.pos_embed_max_size, dual_attention_layers=params.x_block_self_attn_layers,
        qk_norm="rms_norm" if params.qk_norm else None,
    )
    converted = convert_sd3_transformer_checkpoint_to_diffusers({DIT_PREFIX + k: v.clone() for k, v in state.items()})
    ref.load_state_dict(converted, strict=True)
    return ref.eval()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def models(request):
    params = tiny_sd3_params(request.param)
    state = mmdit_state_dict(request.param, params, seed=7)
    ours = MMDiT(params)
    ours.load_state_dict(state, strict=True)
    return request.param, ours.eval(), diffusers_reference(params, state)


def _inputs(params, batch: int, h: int, w: int, n_ctx: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, params.in_channels, h, w, generator=g),
        t=torch.rand(batch, generator=g) * 1000,
        y=torch.randn(batch, params.adm_in_channels, generator=g),
        context=torch.randn(batch, n_ctx, params.context_in_features, generator=g),
    )


@pytest.mark.parametrize("h,w,n_ctx,batch", [(8, 8, 7, 1), (12, 20, 9, 2), (16, 6, 5, 2)])
@torch.no_grad()
def test_parity_with_diffusers(models, h, w, n_ctx, batch):
    variant, ours, ref = models
    x = _inputs(ours.params, batch, h, w, n_ctx, seed=h * w)
    out = ours(**x)
    expected = ref(hidden_states=x["x"], encoder_hidden_states=x["context"], pooled_projections=x["y"],
                   timestep=x["t"], return_dict=False)[0]
    assert out.shape == (batch, 16, h, w)
    assert out.std() > 0.1, "degenerate output would make the comparison meaningless"
    assert (out - expected).abs().max() <= TOL


def test_variants_differ_where_they_should(models):
    variant, ours, _ = models
    blocks = ours.joint_blocks
    assert blocks[-1].context_block.pre_only and not hasattr(blocks[-1].context_block, "mlp")
    assert hasattr(blocks[0].x_block.attn, "ln_q") == (variant != "medium")
    assert hasattr(blocks[0].x_block, "attn2") == (variant == "5-medium")
    if variant == "5-medium":
        assert blocks[0].x_block.adaLN_modulation[1].out_features == 9 * ours.params.hidden_size


@pytest.mark.parametrize("variant,n_lora,shapes", [
    ("medium", 237, {"pos_embed": (1, 36864, 1536), "x_embedder.proj.weight": (1536, 16, 2, 2),
                     "joint_blocks.23.context_block.adaLN_modulation.1.weight": (3072, 1536),
                     "joint_blocks.23.x_block.adaLN_modulation.1.weight": (9216, 1536),
                     "context_embedder.weight": (1536, 4096), "y_embedder.mlp.0.weight": (1536, 2048),
                     "t_embedder.mlp.0.weight": (1536, 256), "final_layer.linear.weight": (64, 1536),
                     "final_layer.adaLN_modulation.1.weight": (3072, 1536)}),
    ("5-medium", 263, {"pos_embed": (1, 147456, 1536), "joint_blocks.12.x_block.attn2.qkv.weight": (4608, 1536),
                       "joint_blocks.12.x_block.attn2.ln_k.weight": (64,),
                       "joint_blocks.12.x_block.adaLN_modulation.1.weight": (13824, 1536),
                       "joint_blocks.13.x_block.adaLN_modulation.1.weight": (9216, 1536)}),
    ("5-large", 377, {"pos_embed": (1, 36864, 2432), "joint_blocks.37.x_block.mlp.fc1.weight": (9728, 2432),
                      "joint_blocks.0.context_block.attn.ln_q.weight": (64,)}),
])
def test_full_size_layout_matches_the_real_files(variant, n_lora, shapes):
    with torch.device("meta"):
        model = MMDiT(VARIANTS[variant].params)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in shapes.items():
        assert state[key] == shape, key
    assert not any("attn2" in k for k in state) == (variant != "5-medium")
    assert "joint_blocks.13.x_block.attn2.qkv.weight" not in state
    last = VARIANTS[variant].params.depth - 1
    assert f"joint_blocks.{last}.context_block.attn.proj.weight" not in state
    # LoRA targets (sd-scripts): every Linear inside SingleDiTBlock.
    names = [f"{bn}.{ln}" for bn, b in model.named_modules() if isinstance(b, SingleDiTBlock)
             for ln, m in b.named_modules() if isinstance(m, nn.Linear)]
    assert len(names) == n_lora


# ---------------------------------------------------------------------------------------------
# Positional embedding.

def test_sincos_table_matches_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ours = sincos_table(64, 16)[0]
    expected = get_2d_sincos_pos_embed(64, 16, base_size=16, interpolation_scale=1.0, output_type="pt")
    assert ours.shape == (256, 64)
    assert (ours - expected.float()).abs().max() < 1e-6


def test_centre_crop_and_random_crop():
    params = tiny_sd3_params("medium")
    model = MMDiT(params)
    model.load_state_dict(mmdit_state_dict("medium", params))
    g = params.pos_embed_max_size  # 16
    grid = model.pos_embed.reshape(g, g, -1)
    centre = model.positional_embedding(4, 6)
    assert torch.equal(centre[0], grid[6:10, 5:11].reshape(24, -1))

    model.set_pos_emb_random_crop_rate(1.0)
    model.train()
    torch.manual_seed(0)
    windows = {tuple(model.positional_embedding(4, 6, random_crop=model._draw_random_crop())[0, 0, :4].tolist())
               for _ in range(12)}
    assert len(windows) > 1, "a random window moves between passes"
    model.eval()
    assert not model._draw_random_crop(), "never random in eval mode (sampling)"
    with pytest.raises(ValueError, match="must be in"):
        model.set_pos_emb_random_crop_rate(1.5)


def test_random_crop_changes_the_training_output_only():
    params = tiny_sd3_params("medium")
    model = MMDiT(params)
    model.load_state_dict(mmdit_state_dict("medium", params, seed=2))
    x = _inputs(params, 1, 8, 8, 4)
    with torch.no_grad():
        reference = model.eval()(**x)
        model.set_pos_emb_random_crop_rate(1.0)
        torch.manual_seed(3)
        trained = [model.train()(**x) for _ in range(4)]
    assert any((t - reference).abs().max() > 1e-3 for t in trained)
    assert torch.equal(model.eval()(**x), reference)


def test_scaled_pos_embed_tables():
    sizes = latent_sizes_for_resolutions([(512, 512), (1024, 1024), (768, 768), (512, 512)])
    assert sizes == [64, 96, 128]
    scaled = ScaledPosEmbeds.for_latent_sizes(64, sizes, patch_size=2)
    assert scaled.patched_sizes == [32, 48, 64]
    assert scaled.max_areas == [(32**2 + 48**2) // 2, (48**2 + 64**2) // 2, 96**2]
    table, size = scaled.table_for(32, 32)
    assert size == 48 and table.shape == (1, 48 * 48, 64)
    assert scaled.table_for(40, 40)[1] == 48, "area 1600 <= 1664: still the 32-patch table"
    assert scaled.table_for(41, 41)[1] == 72, "area 1681 > 1664: the 48-patch table"
    # The centre window of every training size starts at coordinate 0 (sin 0, cos 1), whatever its size.
    for p in (32, 48, 64):
        t, g = scaled.table_for(p, p)
        top = (g - p) // 2
        first = t.reshape(g, g, -1)[top, top]
        assert torch.allclose(first, sincos_table(64, 1)[0, 0], atol=1e-6)
    with pytest.raises(ValueError, match="larger than every resolution"):
        scaled.table_for(100, 100)


def test_scaled_pos_embed_in_the_model_and_tall_images():
    params = tiny_sd3_params("5-medium")
    model = MMDiT(params)
    model.enable_scaled_pos_embed([16])   # 8 x 8 patches, a 12 x 12 table
    pos = model.positional_embedding(8, 8)
    assert torch.allclose(pos, scaled_sincos_table(params.hidden_size, 12, 8).reshape(12, 12, -1)[2:10, 2:10]
                          .reshape(1, 64, -1))
    tall = model.positional_embedding(14, 4)   # area 56 fits, height does not: a bigger table is built
    assert tall.shape == (1, 56, params.hidden_size)
    model.enable_scaled_pos_embed(None)
    g = params.pos_embed_max_size
    assert torch.equal(model.positional_embedding(8, 8)[0], model.pos_embed.reshape(g, g, -1)[8:16, 8:16].reshape(64, -1))


def test_sizes_are_checked():
    params = tiny_sd3_params("medium")
    model = MMDiT(params)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(**_inputs(params, 1, 9, 8, 3))
    with pytest.raises(ValueError, match="covers at most 16x16"):
        model(**_inputs(params, 1, 34, 8, 3))


def test_gradient_checkpointing_gives_the_same_gradients():
    params = tiny_sd3_params("5-medium")
    model = MMDiT(params)
    model.load_state_dict(mmdit_state_dict("5-medium", params, seed=4))
    x = _inputs(params, 2, 8, 6, 5, seed=1)
    calls = []
    for block in model.joint_blocks:
        def counting(*args, _forward=block.forward, **kwargs):
            calls.append(1)
            return _forward(*args, **kwargs)
        block.forward = counting

    def run():
        latents = x["x"].clone().requires_grad_(True)
        model(**(x | {"x": latents})).square().mean().backward()
        grads = [p.grad.clone() for p in model.joint_blocks[0].parameters()]
        model.zero_grad()
        return latents.grad, grads

    plain_grad, plain = run()
    plain_calls = len(calls)
    calls.clear()
    model.enable_gradient_checkpointing()
    ckpt_grad, ckpt = run()
    assert len(calls) == 2 * plain_calls
    assert torch.allclose(plain_grad, ckpt_grad, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, ckpt))


# ---------------------------------------------------------------------------------------------
# Sampler.

def test_sigmas_follow_the_discrete_flow_schedule():
    sigmas = get_sigmas(4, shift=3.0)
    assert len(sigmas) == 5 and sigmas[0] == pytest.approx(1.0) and sigmas[-1] == 0.0
    sigma_min = 3 * 0.001 / (1 + 2 * 0.001)
    assert sigmas[-2] == pytest.approx(3 * sigma_min / (1 + 2 * sigma_min))  # shifted twice, as the reference does
    timesteps = [1000 - i * (1000 - 1000 * sigma_min) / 3 for i in range(4)]
    expected = [3 * (t / 1000) / (1 + 2 * t / 1000) for t in timesteps]
    assert sigmas[:4] == pytest.approx(expected)
    assert get_sigmas(3, shift=1.0)[:3] == pytest.approx([1.0, 0.5005, 0.001])
    assert round_image_size(520, 1000) == (512, 992) and round_image_size(10, 70) == (64, 64)


def test_euler_with_cfg_reaches_a_perfect_denoiser_target():
    target = torch.randn(1, 16, 4, 6)

    class Oracle(nn.Module):
        """Predicts v so that x - sigma * v is the target for the positive half and 0 for the negative."""
        def forward(self, x, t, y, context):
            sigma = (t / 1000)[:, None, None, None]
            goal = torch.cat((target, torch.zeros_like(target)))
            return (x - goal) / sigma

    cond = SD3Conditioning(torch.zeros(1, 3, 8), torch.zeros(1, 4))
    noise = initial_noise(48, 32, seed=5)
    assert torch.equal(noise, initial_noise(48, 32, seed=5)) and noise.shape == (1, 16, 4, 6)
    out = denoise(Oracle(), noise, cond, cond, get_sigmas(5), cfg_scale=2.5, progress=False)
    assert torch.allclose(out, 2.5 * target, atol=1e-5)   # neg + 2.5 * (pos - neg) with neg = 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_agrees_with_cpu():
    params = tiny_sd3_params("5-medium")
    model = MMDiT(params)
    model.load_state_dict(mmdit_state_dict("5-medium", params, seed=1))
    x = _inputs(params, 2, 12, 8, 9)
    with torch.no_grad():
        cpu = model.eval()(**x)
        gpu = model.cuda()(**{k: v.cuda() for k, v in x.items()}).cpu()
        assert (cpu - gpu).abs().max() < 5e-3   # cuDNN runs the fp32 patch-embed conv in TF32 (seen: 1.0e-3)
        bf16 = model.to(torch.bfloat16)(**{k: v.cuda().to(torch.bfloat16) if k != "t" else v.cuda()
                                           for k, v in x.items()})
    assert (cpu - bf16.float().cpu()).abs().mean() < 0.05 * cpu.abs().mean()
    model.float().requires_grad_(False).enable_gradient_checkpointing()
    latents = x["x"].cuda().requires_grad_(True)
    model.train()(**({k: v.cuda() for k, v in x.items()} | {"x": latents})).square().mean().backward()
    assert torch.isfinite(latents.grad).all() and latents.grad.abs().sum() > 0
