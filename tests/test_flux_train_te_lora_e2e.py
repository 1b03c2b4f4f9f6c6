"""Text-encoder LoRA through flux_train_network.py on tiny models: CLIP-L (with cached T5
outputs), CLIP-L + T5-XXL (train_t5xxl=True), text encoders only, the two --text_encoder_lr
values, split_qkv and GGPO in a real run, and the combinations the seed forbids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.test_flux_train_e2e import setup, train  # noqa: F401  (module fixture reused)

pytestmark = pytest.mark.slow


def trained_tensors(out: Path) -> dict:
    with safe_open(str(out / "tiny.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def moved(tensors: dict, prefix: str) -> bool:
    ups = [v for k, v in tensors.items() if k.startswith(prefix) and k.endswith("lora_up.weight")]
    return bool(ups) and all(float(u.abs().max()) > 0 for u in ups)


def run(setup, out, *extra, **kw):  # noqa: F811
    result = train(setup, out, "--max_train_steps", "4", *extra, **kw)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return trained_tensors(out)


def test_flux_and_clip_l_with_cached_t5_outputs(setup, tmp_path):  # noqa: F811
    sd, meta = run(setup, tmp_path / "o", "--text_encoder_lr", "1e-3", "--sample_prompts", str(setup[3]),
                   "--sample_every_n_steps", "2", unet_only=False)
    assert moved(sd, "lora_unet_") and moved(sd, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj")
    assert not any(k.startswith("lora_te3_") for k in sd)
    assert meta["ss_text_encoder_lr"] == "0.001"
    assert len(list((tmp_path / "o" / "sample").glob("*.png"))) == 2


def test_flux_clip_l_and_t5_with_two_learning_rates(setup, tmp_path):  # noqa: F811
    sd, _ = run(setup, tmp_path / "o", "--network_args", "train_t5xxl=True", "--text_encoder_lr", "1e-3", "5e-4",
                unet_only=False, cache_text=False)
    assert moved(sd, "lora_te1_") and moved(sd, "lora_te3_encoder_block_0_layer_0_SelfAttention_q")
    assert moved(sd, "lora_unet_")


def test_text_encoders_only(setup, tmp_path):  # noqa: F811
    sd, _ = run(setup, tmp_path / "o", "--network_train_text_encoder_only", unet_only=False)
    assert moved(sd, "lora_te1_") and not any(k.startswith("lora_unet_") for k in sd)


def test_split_qkv_and_ggpo_train(setup, tmp_path):  # noqa: F811
    sd, meta = run(setup, tmp_path / "o", "--network_args", "split_qkv=True", "ggpo_sigma=0.03", "ggpo_beta=0.01")
    down = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    up = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert down.shape[0] == 12 and float(sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 12.0
    third = up.shape[0] // 3
    assert float(up[:third, 4:].abs().max()) == 0 and float(up[:third, :4].abs().max()) > 0   # block-diagonal
    assert json.loads(meta["ss_network_args"])["split_qkv"] == "True"


@pytest.mark.parametrize("extra, kw, message", [
    (["--network_args", "train_t5xxl=True"], dict(unet_only=False),
     "cannot be used while training a T5-XXL LoRA"),
    (["--network_train_text_encoder_only"], dict(),
     "--network_train_unet_only and --network_train_text_encoder_only exclude each other"),
])
def test_forbidden_combinations(setup, tmp_path, extra, kw, message):  # noqa: F811
    result = train(setup, tmp_path / "o", "--max_train_steps", "2", *extra, **kw)
    assert result.returncode == 2 and message in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
