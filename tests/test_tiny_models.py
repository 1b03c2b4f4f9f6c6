"""The tiny-checkpoint generator: real key layouts, usable tokenizers, non-degenerate weights, CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library.flux.chroma import Chroma
from library.flux.model import VARIANTS, Flux
from library.flux.sampling import prepare_img_ids, prepare_txt_ids
from library.safetensors_io import tensor_shapes
from library.tiny import tokenizers as tiny_tok
from library.tiny.flux import build_flux_model, tiny_flux_params, write_tiny_flux_set

REPO = Path(__file__).resolve().parents[1]


def _full_size_keys(variant: str, depth: int, depth_single: int) -> set[str]:
    """The real model's keys, restricted to the first blocks (tiny files have fewer blocks)."""
    with torch.device("meta"):
        model = (Chroma if variant == "chroma" else Flux)(VARIANTS[variant].params)
    keep = set()
    for k in model.state_dict():
        m = re.match(r"(double_blocks|single_blocks|distilled_guidance_layer\.(?:layers|norms))\.(\d+)\.", k)
        limit = {"double_blocks": depth, "single_blocks": depth_single}.get(m.group(1), 2) if m else None
        if m is None or int(m.group(2)) < limit:
            keep.add(k)
    return keep


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return {v: write_tiny_flux_set(tmp_path_factory.mktemp(v), variant=v, seed=1) for v in ("dev", "chroma")}


@pytest.mark.parametrize("variant", ["dev", "chroma"])
def test_tiny_dit_has_the_real_key_layout(sets, variant):
    shapes = tensor_shapes(sets[variant].dit)
    assert set(shapes) == _full_size_keys(variant, 2, 2)
    assert shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0] == (128,), "real head size"
    assert shapes["img_in.weight"][0] == (256, 64)


def test_tiny_set_contents(sets):
    dev, chroma = sets["dev"], sets["chroma"]
    assert dev.clip_l is not None and chroma.clip_l is None
    for p in (dev.dit, dev.ae, dev.clip_l, dev.t5xxl):
        assert p.is_file()
    clip = tensor_shapes(dev.clip_l)
    assert "text_model.embeddings.token_embedding.weight" in clip and "text_projection.weight" in clip
    assert clip["text_model.encoder.layers.0.self_attn.q_proj.weight"][0] == (128, 128)
    t5 = tensor_shapes(dev.t5xxl)
    assert "shared.weight" in t5 and "encoder.final_layer_norm.weight" in t5
    assert t5["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"][0] == (32, 2)
    ae = tensor_shapes(dev.ae)
    assert ae["encoder.conv_in.weight"][0] == (32, 3, 3, 3) and ae["decoder.conv_in.weight"][0][1] == 16


def test_tokenizers_follow_the_real_conventions(sets):
    from transformers import CLIPTokenizer, T5TokenizerFast

    cache = sets["dev"].tokenizer_cache_dir
    clip = CLIPTokenizer.from_pretrained(str(cache / "openai_clip-vit-large-patch14"))
    n = tiny_tok.clip_vocab_size()
    assert (clip.bos_token_id, clip.eos_token_id, clip.pad_token_id) == (n - 2, n - 1, n - 1)
    ids = clip("A Photo of a CAT", padding="max_length", max_length=10).input_ids
    assert ids[0] == n - 2 and ids[6] == n - 1 and ids[-1] == n - 1
    assert clip.convert_ids_to_tokens(ids[2]) == "photo</w>", "lower-cased whole-word BPE tokens"

    t5 = T5TokenizerFast.from_pretrained(str(cache / "google_t5-v1_1-xxl"))
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert t5.convert_tokens_to_ids("<extra_id_0>") == tiny_tok.t5_vocab_size() - 1
    ids = t5("a photo of a cat", padding="max_length", max_length=8).input_ids
    assert ids[5:] == [1, 0, 0] and 2 not in ids
    assert t5.convert_ids_to_tokens(ids[1]) == "▁photo"


@pytest.mark.parametrize("variant", ["dev", "chroma"])
@torch.no_grad()
def test_random_models_are_not_degenerate(variant):
    params = tiny_flux_params(variant)
    model = build_flux_model(params, chroma=variant == "chroma", seed=3)
    assert model.final_layer.linear.weight.abs().sum() > 0
    g = torch.Generator().manual_seed(0)
    x = dict(img=torch.randn(1, 9, 64, generator=g), img_ids=prepare_img_ids(1, 3, 3),
             txt=torch.randn(1, 5, params.context_in_dim, generator=g), txt_ids=prepare_txt_ids(1, 5),
             timesteps=torch.tensor([0.5]), y=torch.randn(1, params.vec_in_dim, generator=g),
             guidance=torch.tensor([3.5]))
    out = model(**x)
    assert 0.2 < out.std() < 5, "activations stay O(1)"
    for name, change in [("timesteps", torch.tensor([0.9])), ("txt", x["txt"] + 1), ("img", x["img"].flip(1))]:
        assert (model(**(x | {name: change})) - out).abs().max() > 1e-3, f"output must depend on {name}"
    again = build_flux_model(params, chroma=variant == "chroma", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters())), "seeded"


def test_build_flux_model_in_bf16_on_the_target_device():
    model = build_flux_model(tiny_flux_params("schnell"), device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


def test_cli_writes_a_set(tmp_path):
    result = subprocess.run([sys.executable, "-m", "library.tiny", "flux", "--variant", "schnell", "--out",
                             str(tmp_path), "--dtype", "bf16"], cwd=REPO, capture_output=True, text=True, check=True)
    written = json.loads(result.stdout)
    assert written["variant"] == "schnell"
    shapes = tensor_shapes(written["dit"])
    assert "guidance_in.in_layer.weight" not in shapes
    assert shapes["img_in.weight"][1] == "BF16"
    assert (Path(written["tokenizer_cache_dir"]) / "google_t5-v1_1-xxl" / "tokenizer.json").is_file()
