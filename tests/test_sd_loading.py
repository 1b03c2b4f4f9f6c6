"""SD 1.x / 2.x loading: a tiny checkpoint in the original ldm layout loads into the same
networks diffusers builds from it (its own single-file loader, given the original LDM config)
and from its own folder format; v1/v2 detection and the refusals; .ckpt and --vae inputs; the
text-encoding step (--clip_skip, --max_token_length chunks) and the sample-image samplers."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from library.errors import ConfigError, ModelFileError
from library.sd import sampling as sd_sampling
from library.sd.loading import inspect_sd_checkpoint, load_sd_model, load_sd_vae, read_state_dict
from library.sd.model import SDUNet
from library.sd.text import SDTextEncoding, load_sd_tokenizer
from library.tiny import sd as tiny_sd

TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")   # diffusers deprecates dpmsolver


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are dominated by per-op overhead: one thread is faster on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=[False, True], ids=["sd1", "sd2"])
def tiny(request, tmp_path_factory):
    v2 = request.param
    paths = tiny_sd.write_tiny_sd_set(tmp_path_factory.mktemp("sd2" if v2 else "sd1"), v2=v2, seed=5)
    return paths, load_sd_model(paths.checkpoint, v2=v2)


def ldm_config(v2: bool) -> dict:
    """The original LDM inference config (v1-inference.yaml / v2-inference-v.yaml) at tiny size."""
    unet = dict(image_size=32, in_channels=4, out_channels=4, model_channels=64 if v2 else 32,
                attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 1, 2, 2],
                use_spatial_transformer=True, transformer_depth=1, context_dim=tiny_sd.TINY_TEXT_WIDTH, legacy=False)
    unet.update(dict(num_head_channels=64, use_linear_in_transformer=True) if v2 else dict(num_heads=8))
    vae = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2, 2],
               num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    return {"model": {"params": {"scale_factor": 0.18215, "unet_config": {"params": unet},
                                 "first_stage_config": {"params": {"ddconfig": vae}}}}}


def unet_inputs(batch: int = 2, width: int = tiny_sd.TINY_TEXT_WIDTH):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, 16, 16, generator=gen), torch.tensor([15, 700][:batch]),
            torch.randn(batch, 77, width, generator=gen))


@torch.no_grad()
def test_ldm_file_matches_diffusers_single_file_loader(tiny):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    paths, ours = tiny
    config = ldm_config(paths.v2)
    ref_unet = UNet2DConditionModel.from_single_file(str(paths.checkpoint), original_config=config,
                                                     local_files_only=True)
    ref_vae = AutoencoderKL.from_single_file(str(paths.checkpoint), original_config=config, local_files_only=True)
    x, t, c = unet_inputs()
    out = ours.unet(x, t, encoder_hidden_states=c).sample
    assert out.std() > 0.1
    assert (out - ref_unet(x, t, encoder_hidden_states=c).sample).abs().max() <= TOL
    heads = [b.attentions[0].transformer_blocks[0].attn1.heads for b in ours.unet.down_blocks[:3]]
    assert heads == ([1, 1, 2] if paths.v2 else [8, 8, 8])   # 64-wide heads (SD 2.x) / 8 heads (SD 1.x)
    image = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert (ours.vae.encode(image).latent_dist.mean - ref_vae.encode(image).latent_dist.mean).abs().max() <= TOL
    z = torch.randn(1, 4, 8, 6)
    assert (ours.vae.decode(z).sample - ref_vae.decode(z).sample).abs().max() <= TOL
    assert ours.vae.config.scaling_factor == pytest.approx(0.18215)


@torch.no_grad()
def test_ldm_file_equals_the_diffusers_folder(tiny):
    paths, ours = tiny
    folder = load_sd_model(paths.diffusers_dir, v2=paths.v2)
    assert folder.info.layout == "diffusers" and folder.info.v2 == paths.v2 == ours.info.v2
    x, t, c = unet_inputs()
    assert (ours.unet(x, t, encoder_hidden_states=c).sample
            - folder.unet(x, t, encoder_hidden_states=c).sample).abs().max() <= TOL
    ids = torch.randint(0, tiny_sd.tiny_tokenizers.clip_vocab_size() - 2, (2, 77))
    a = ours.text_encoder(ids, output_hidden_states=True)
    b = folder.text_encoder(ids, output_hidden_states=True)
    assert (a.last_hidden_state - b.last_hidden_state).abs().max() <= TOL
    assert len(a.hidden_states) == len(b.hidden_states)
    # SD 2.x: the file's OpenCLIP tower has one more layer, which is never used
    assert ours.text_encoder.config.num_hidden_layers == (tiny_sd.TINY_V2_TEXT_LAYERS if paths.v2
                                                          else tiny_sd.TINY_V1_TEXT_LAYERS)
    assert ours.text_encoder.config.hidden_act == ("gelu" if paths.v2 else "quick_gelu")
    assert folder.tokenizer_dir is not None and ours.tokenizer_dir is None


def test_v2_must_agree_with_the_file(tiny):
    paths, _ = tiny
    assert inspect_sd_checkpoint(paths.checkpoint).v2 == paths.v2
    with pytest.raises(ConfigError, match="remove --v2" if not paths.v2 else "add --v2"):
        inspect_sd_checkpoint(paths.checkpoint, v2=not paths.v2)
    with pytest.raises(ConfigError):
        inspect_sd_checkpoint(paths.diffusers_dir, v2=not paths.v2)


@torch.no_grad()
def test_ckpt_loads_through_weights_only(tiny, tmp_path):
    paths, ours = tiny
    sd = read_state_dict(paths.checkpoint)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 10}, ckpt)
    again = load_sd_model(ckpt)
    x, t, c = unet_inputs()
    assert torch.equal(again.unet(x, t, encoder_hidden_states=c).sample, ours.unet(x, t, encoder_hidden_states=c).sample)
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "callback": pickle.loads(pickle.dumps(_Payload()))}, unsafe)
    with pytest.raises(ModelFileError, match="weights_only"):
        read_state_dict(unsafe)


class _Payload:
    """A pickled object that is not a tensor: weights_only loading must refuse it."""


@torch.no_grad()
def test_separate_vae_in_every_layout(tiny, tmp_path):
    paths, ours = tiny
    sd = read_state_dict(paths.checkpoint)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    expected = ours.vae.encode(image).latent_dist.mean
    bare = {k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")}
    save_file(bare, tmp_path / "vae_ldm.safetensors")
    diffusers_file = tmp_path / "vae_diffusers.safetensors"
    save_file(ours.vae.state_dict(), diffusers_file)
    for source in (tmp_path / "vae_ldm.safetensors", diffusers_file, paths.diffusers_dir, paths.checkpoint):
        vae = load_sd_vae(source)
        assert (vae.encode(image).latent_dist.mean - expected).abs().max() <= TOL, source
    replaced = load_sd_model(paths.checkpoint, vae_path=tmp_path / "vae_ldm.safetensors")
    assert (replaced.vae.encode(image).latent_dist.mean - expected).abs().max() <= TOL
    with pytest.raises(ModelFileError, match="expected an SD VAE"):
        load_sd_vae(_write(tmp_path / "te.safetensors", {"text_model.embeddings.token_embedding.weight": torch.zeros(4, 8)}))


def _write(path, tensors):
    save_file(tensors, path)
    return path


def test_other_families_and_models_are_refused(tiny, tmp_path):
    paths, _ = tiny
    sd = read_state_dict(paths.checkpoint)
    xl = dict(sd) | {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.zeros(1, 77)}
    with pytest.raises(ModelFileError, match="SDXL"):
        inspect_sd_checkpoint(_write(tmp_path / "xl.safetensors", xl))
    inpaint = dict(sd)
    inpaint["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(sd["model.diffusion_model.input_blocks.0.0.weight"].shape[0], 9, 3, 3)
    with pytest.raises(ModelFileError, match="inpainting"):
        inspect_sd_checkpoint(_write(tmp_path / "inpaint.safetensors", inpaint))
    flux = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}
    with pytest.raises(ModelFileError, match="FLUX"):
        inspect_sd_checkpoint(_write(tmp_path / "flux.safetensors", flux))
    with pytest.raises(ModelFileError, match="bare SD UNet"):
        inspect_sd_checkpoint(_write(tmp_path / "unet.safetensors", {k.removeprefix("model.diffusion_model."): v
                                                                     for k, v in sd.items()
                                                                     if k.startswith("model.diffusion_model.")}))
    with pytest.raises(ModelFileError, match="no unet/config.json"):
        inspect_sd_checkpoint(tmp_path)
    with pytest.raises(ModelFileError, match="not found"):
        inspect_sd_checkpoint(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------
# Text encoding.

@pytest.fixture(scope="module")
def v1_text(tmp_path_factory):
    paths = tiny_sd.write_tiny_sd_set(tmp_path_factory.mktemp("sd1_text"), seed=7, diffusers_folder=False)
    model = load_sd_model(paths.checkpoint)
    return load_sd_tokenizer(False, cache_dir=paths.tokenizer_cache_dir), model.text_encoder


@torch.no_grad()
def test_clip_skip_takes_an_earlier_layer_and_the_final_norm(v1_text):
    tokenizer, te = v1_text
    captions = ["a red cat", "a blue dog on a green tree"]
    last = SDTextEncoding(tokenizer, te).encode(captions)
    assert last.shape == (2, 77, tiny_sd.TINY_TEXT_WIDTH)
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    out = te(ids, output_hidden_states=True)
    assert torch.allclose(last, out.last_hidden_state)
    assert torch.allclose(SDTextEncoding(tokenizer, te, clip_skip=1).encode(captions), last, atol=1e-6)
    skip2 = SDTextEncoding(tokenizer, te, clip_skip=2).encode(captions)
    assert torch.allclose(skip2, te.text_model.final_layer_norm(out.hidden_states[-2]), atol=1e-6)
    assert not torch.allclose(skip2, last)
    with pytest.raises(ValueError, match="clip_skip"):
        SDTextEncoding(tokenizer, te, clip_skip=tiny_sd.TINY_V1_TEXT_LAYERS + 1)


@torch.no_grad()
def test_long_captions_are_encoded_in_chunks(v1_text):
    tokenizer, te = v1_text
    words = ("a red cat sitting on a blue chair with a green hat " * 12).split()
    long = " ".join(words[:100])          # ~100 tokens: two chunks of 75
    enc = SDTextEncoding(tokenizer, te, max_token_length=150)
    ids = enc.tokenize([long, "a cat"])
    assert ids.shape == (2, 2, 77)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert (ids[..., 0] == bos).all()
    full = tokenizer([long], padding="max_length", max_length=152, truncation=True, return_tensors="pt").input_ids[0]
    assert torch.equal(ids[0, 0, 1:76], full[1:76]) and torch.equal(ids[0, 1, 1:76], full[76:151])
    assert ids[0, 1, -1] == full[-1] == eos
    states = enc.encode([long, "a cat"])
    assert states.shape == (2, 152, tiny_sd.TINY_TEXT_WIDTH)
    per_chunk = te(ids[0]).last_hidden_state          # (2, 77, D)
    expected = torch.cat([per_chunk[0, :1], per_chunk[0, 1:76], per_chunk[1, 1:76], per_chunk[1, -1:]])
    assert torch.allclose(states[0], expected, atol=1e-6)
    # the first chunk of a short caption is its plain 77-token encoding
    assert torch.allclose(states[1, :76], SDTextEncoding(tokenizer, te).encode(["a cat"])[0, :76], atol=1e-6)


def test_sd2_tokenizer_chunks_get_end_tokens(tmp_path):
    cache = tiny_sd.write_tokenizer_cache(tmp_path, v2=True)
    tokenizer = load_sd_tokenizer(True, cache_dir=cache)
    assert tokenizer.pad_token_id == 0 != tokenizer.eos_token_id
    words = ("a red cat sitting on a blue chair with a green hat " * 12).split()
    holder = type("TE", (), {"config": type("C", (), {"num_hidden_layers": 2, "hidden_size": 8})()})()
    enc = SDTextEncoding(tokenizer, holder, max_token_length=225)
    ids = enc.tokenize([" ".join(words[:100])])[0]        # text runs into chunk 2, chunk 3 is empty
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert ids.shape == (3, 77)
    assert ids[0, -1] == eos and ids[0, -2] not in (eos, pad)       # chunk 1 closed by an end token
    assert ids[2, 1] == eos and (ids[2, 2:] == pad).all()            # an empty chunk reads <start> <end> <pad>...


# ---------------------------------------------------------------------------------------------
# Sampling.

def test_every_sampler_name_makes_a_scheduler():
    for name in sd_sampling.SAMPLERS:
        scheduler = sd_sampling.make_scheduler(name, v_prediction=True)
        assert scheduler.config.prediction_type == "v_prediction"
        assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.num_train_timesteps == 1000
    assert sd_sampling.make_scheduler("ddim", v_prediction=False).config.clip_sample is True
    with pytest.raises(ConfigError, match="unknown sampler"):
        sd_sampling.make_scheduler("dpm_fancy", v_prediction=False)


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_generate_image_is_seeded(tiny, sampler):
    paths, ours = tiny
    unet = SDUNet(ours.unet)
    cond = torch.randn(1, 77, tiny_sd.TINY_TEXT_WIDTH)
    kwargs = dict(width=70, height=64, steps=2, scale=4.0, seed=3, sampler=sampler, v_prediction=paths.v2)
    a = sd_sampling.generate_image(unet, ours.vae, cond, torch.zeros_like(cond), **kwargs)
    b = sd_sampling.generate_image(unet, ours.vae, cond, torch.zeros_like(cond), **kwargs)
    assert a.size == (64, 64)                     # rounded down to a multiple of 8
    assert list(a.getdata()) == list(b.getdata())
    c = sd_sampling.generate_image(unet, ours.vae, cond, None, **(kwargs | {"seed": 4}))
    assert list(c.getdata()) != list(a.getdata())
