"""Detecting and loading FLUX / Chroma files: variants, sizes, dtypes, prefixes, diffusers
layouts, refusals of other files, and loading without a second copy of the weights."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from library.errors import ConfigError, ModelFileError
from library.flux.loading import from_diffusers, inspect_flux_checkpoint, load_flux_dit
from library.safetensors_io import save_file_atomic
from library.tiny.flux import flux_state_dict, tiny_flux_params, write_ae, write_clip_l, write_flux_dit, write_t5xxl
from tests.test_flux_model import diffusers_converter

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux_files")
    return {
        "dev": write_flux_dit(d / "dev.safetensors", "dev", seed=1),
        "schnell": write_flux_dit(d / "schnell.safetensors", "schnell", seed=2),
        "chroma": write_flux_dit(d / "chroma.safetensors", "chroma", seed=3),
        "dev_prefixed_bf16": write_flux_dit(d / "dev_prefixed.safetensors", "dev", seed=1, dtype=torch.bfloat16,
                                            prefix="model.diffusion_model."),
        "dev_fp8": write_flux_dit(d / "dev_fp8.safetensors", "dev", seed=1, dtype=torch.float8_e4m3fn),
        "ae": write_ae(d / "ae.safetensors"),
        "t5": write_t5xxl(d / "t5.safetensors"),
        "clip": write_clip_l(d / "clip.safetensors"),
    }


def _fake(path: Path, keys: list[str]) -> Path:
    """A file with the given key names and dummy data (detection reads names and shapes only)."""
    save_file_atomic({k: torch.zeros(2) for k in keys}, path)
    return path


@pytest.mark.parametrize("name,variant,guidance", [("dev", "dev", True), ("schnell", "schnell", False),
                                                    ("chroma", "chroma", False)])
def test_detects_variant_and_sizes(files, name, variant, guidance):
    info = inspect_flux_checkpoint(files[name])
    tiny = tiny_flux_params(variant)
    assert info.variant == variant and info.layout == "bfl" and info.prefix == ""
    p = info.params
    assert (p.hidden_size, p.num_heads, p.depth, p.depth_single_blocks) == (256, 2, 2, 2)
    assert (p.mlp_ratio, p.context_in_dim, p.guidance_embed) == (4.0, tiny.context_in_dim, guidance)
    if variant == "chroma":
        assert (p.approximator_in_dim, p.approximator_hidden_dim, p.approximator_depth) == (64, 128, 2)
    else:
        assert p.vec_in_dim == tiny.vec_in_dim
    assert info.dtype == torch.float32


def test_prefix_is_stripped_and_dtype_reported(files):
    info = inspect_flux_checkpoint(files["dev_prefixed_bf16"])
    assert info.prefix == "model.diffusion_model." and info.dtype == torch.bfloat16
    model, _ = load_flux_dit(files["dev_prefixed_bf16"])
    reference, _ = load_flux_dit(files["dev"], dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert model.img_in.weight.dtype == torch.bfloat16


def test_block_counts_come_from_the_file(tmp_path):
    params = replace(tiny_flux_params("dev"), depth=3, depth_single_blocks=1, mlp_ratio=2.0)
    path = write_flux_dit(tmp_path / "pruned.safetensors", "dev", params=params)
    info = inspect_flux_checkpoint(path)
    assert (info.params.depth, info.params.depth_single_blocks, info.params.mlp_ratio) == (3, 1, 2.0)
    model, _ = load_flux_dit(path)
    assert len(model.double_blocks) == 3 and len(model.single_blocks) == 1


def test_loaded_model_equals_the_file(files):
    model, info = load_flux_dit(files["chroma"], model_type="chroma")
    expected = flux_state_dict("chroma", seed=3)
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())


def test_fp8_file_loads_widened_or_kept(files):
    upcast, info = load_flux_dit(files["dev_fp8"])
    assert info.dtype == torch.float8_e4m3fn
    assert {p.dtype for p in upcast.parameters()} == {torch.bfloat16}

    kept, _ = load_flux_dit(files["dev_fp8"], dtype=torch.float8_e4m3fn)
    assert kept.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert kept.double_blocks[0].img_attn.qkv.bias.dtype == torch.bfloat16
    assert kept.double_blocks[0].img_attn.norm.query_norm.scale.dtype == torch.bfloat16
    assert torch.equal(kept.img_in.weight.to(torch.bfloat16), upcast.img_in.weight)

    cast, _ = load_flux_dit(files["dev"], dtype=torch.float8_e4m3fn)  # fp32 file cast to e4m3fn storage
    assert cast.single_blocks[1].linear1.weight.dtype == torch.float8_e4m3fn


def test_e5m2_file_cannot_be_kept_in_fp8(tmp_path):
    path = write_flux_dit(tmp_path / "e5m2.safetensors", "schnell", dtype=torch.float8_e5m2)
    with pytest.raises(ModelFileError, match="float8_e4m3fn"):
        load_flux_dit(path, dtype=torch.float8_e4m3fn)
    model, _ = load_flux_dit(path)  # widened to bf16 is fine
    assert model.img_in.weight.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="e4m3fn"):
        load_flux_dit(path, dtype=torch.float8_e5m2)


def test_flux_and_chroma_refuse_each_other(files):
    with pytest.raises(ModelFileError, match="Chroma model; pass --model_type chroma"):
        load_flux_dit(files["chroma"], model_type="flux")
    with pytest.raises(ModelFileError, match="FLUX.1 dev model, not Chroma"):
        load_flux_dit(files["dev"], model_type="chroma")
    with pytest.raises(ConfigError, match="--model_type"):
        load_flux_dit(files["dev"], model_type="sd3")


@pytest.mark.parametrize("kind,keys,needle", [
    ("sd3", ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
             "first_stage_model.encoder.conv_in.weight"],
     "SD3"),
    ("sd3_bare", ["joint_blocks.0.context_block.attn.qkv.weight"], "SD3"),
    ("lumina", ["cap_embedder.0.weight", "layers.0.attention.qkv.weight"], "Lumina"),
    ("anima", ["net.blocks.0.self_attn.q_proj.weight", "net.x_embedder.proj.1.weight"], "Anima"),
    ("anima_bare", ["blocks.0.self_attn.q_proj.weight"], "Anima"),
    ("sd1", ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x"],
     "SD 1.x/2.x"),
    ("lora", ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], "LoRA"),
    ("unknown", ["something.weight"], "unknown model"),
])
def test_other_model_files_are_refused_by_name(tmp_path, kind, keys, needle):
    path = _fake(tmp_path / f"{kind}.safetensors", keys)
    with pytest.raises(ModelFileError, match="expected a FLUX.1 or Chroma DiT") as e:
        inspect_flux_checkpoint(path)
    assert needle in str(e.value)


@pytest.mark.parametrize("name,needle", [("ae", "autoencoder"), ("t5", "T5 text encoder"),
                                         ("clip", "CLIP text encoder")])
def test_text_encoder_and_ae_files_are_refused_by_name(files, name, needle):
    with pytest.raises(ModelFileError, match=needle):
        load_flux_dit(files[name])


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        inspect_flux_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(ModelFileError, match="diffusion_pytorch_model"):
        inspect_flux_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------
# Diffusers layout.

@pytest.mark.parametrize("variant", ["dev", "schnell", "chroma"])
def test_from_diffusers_inverts_diffusers_converter(variant):
    params = tiny_flux_params(variant)
    original = flux_state_dict(variant, params, seed=4)
    diffusers_state = diffusers_converter(variant == "chroma", params.hidden_size)(dict(original))
    back = from_diffusers(diffusers_state, params, chroma=variant == "chroma")
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


@pytest.mark.parametrize("variant", ["dev", "chroma"])
def test_diffusers_folder_loads_like_the_bfl_file(tmp_path, files, variant):
    params = tiny_flux_params(variant)
    chroma = variant == "chroma"
    seed = 3 if chroma else 1
    diffusers_state = diffusers_converter(chroma, params.hidden_size)(flux_state_dict(variant, params, seed=seed))
    keys = sorted(diffusers_state)
    folder = tmp_path / "FLUX-diffusers"
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        save_file_atomic({k: diffusers_state[k] for k in part},
                         folder / "transformer" / f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors")
    info = inspect_flux_checkpoint(folder)
    assert info.layout == "diffusers" and info.variant == variant and len(info.files) == 2
    assert info.params == inspect_flux_checkpoint(files[variant]).params

    model, _ = load_flux_dit(folder, model_type="chroma" if chroma else "flux")
    reference, _ = load_flux_dit(files[variant], model_type="chroma" if chroma else "flux")
    ref_state = reference.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())

    # A single diffusers-layout file works too.
    single = tmp_path / "single.safetensors"
    save_file_atomic(diffusers_state, single)
    assert inspect_flux_checkpoint(single).layout == "diffusers"


# ---------------------------------------------------------------------------------------------
# Memory: one copy of the weights.

_RSS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from library.flux.loading import load_flux_dit, inspect_flux_checkpoint

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

    path, mode = sys.argv[1], sys.argv[2]
    info = inspect_flux_checkpoint(path)
    if mode == "naive":   # the two-copy way: allocated parameters + a loaded state dict
        from library.flux.model import Flux
        from safetensors.torch import load_file
        with torch.device("meta"):
            model = Flux(info.params)
        model = model.to(torch.bfloat16).to_empty(device="cpu")
    before = status("VmRSS")
    if mode == "ours":
        model, _ = load_flux_dit(path)
    else:
        model.load_state_dict(load_file(path))
    checksum = sum(float(p.float().sum()) for p in model.parameters())  # touch every weight
    print(json.dumps({"growth": status("VmHWM") - before, "checksum": checksum}))
""")


def _peak_growth(path: Path, mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), mode], cwd=REPO, capture_output=True,
                            text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["growth"]


def test_loading_holds_a_single_copy_of_the_weights(tmp_path):
    params = replace(tiny_flux_params("dev"), hidden_size=1024, num_heads=8, depth=2, depth_single_blocks=4)
    path = write_flux_dit(tmp_path / "mid.safetensors", "dev", params=params, dtype=torch.bfloat16)
    size = path.stat().st_size
    assert 200e6 < size < 400e6
    ours = _peak_growth(path, "ours")
    naive = _peak_growth(path, "naive")
    assert naive > 1.7 * size, "the measurement must be able to see a second copy"
    assert ours < 1.3 * size, f"peak grew by {ours / size:.2f}x the file size"
