"""Lumina Image 2.0 end to end on tiny files (CPU, no downloads).

Two training runs go through the real command line, side by side:
  A. the seed guide's example command (plus --network_train_unet_only, which it needs here because
     it caches text-encoder outputs, and --cache_text_encoder_outputs_to_disk so the encoded tokens
     can be read back): the loss falls, the LoRA has the sd-scripts keys and metadata, the system
     prompt is in every encoded caption, sample images appear;
  B. a Gemma2 LoRA with per-component ranks on a DiT of the real width (2304, 24 heads, 8 KV heads;
     one block of each kind), in Comfy-Org's key layout: the ranks in the file are the asked ones,
     Gemma2's LoRA trains, and diffusers' Lumina2 LoRA converter + loader take the file's blocks
     with the same weight deltas.
Inference (with and without LoRA) and the refusals run in this process through the scripts'
own `main`/`run` with real argument lists (no interpreter start-up per case).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import lumina_minimal_inference
from library.lumina.gemma2 import load_gemma2_tokenizer
from library.lumina.model import LuminaParams, NextDiT
from library.lumina.text import RECOMMENDED_SYSTEM_PROMPTS, LuminaTextEncoding
from library.tiny.images import write_shapes_dataset
from library.tiny.lumina import tiny_lumina_params, write_lumina_dit, write_tiny_lumina_set
from library.training.trainer import FamilyModels
from lumina_train_network import LuminaNetworkTrainer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SYSTEM_PROMPT = RECOMMENDED_SYSTEM_PROMPTS[0]
# The real width and head layout (so diffusers' converter, which hard-codes the 2B model's q/k/v
# split, applies), one block of each kind, a small FFN and the tiny Gemma2's caption width.
WIDE = LuminaParams(dim=2304, n_layers=1, n_refiner_layers=1, n_heads=24, n_kv_heads=8, ffn_hidden_dim=256,
                    cap_feat_dim=128)
RUN_B_DIMS = ("attn_dim=8", "mlp_dim=6", "mod_dim=2", "refiner_dim=5", "embedder_dims=[3,0,7]")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The in-process parts use one thread: on a small shared machine, two threads contending
    with other work run these tiny models ten times slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("lumina_e2e")
    paths = write_tiny_lumina_set(base / "models")
    wide = write_lumina_dit(base / "models" / "lumina_2_wide_bf16.safetensors", layout="comfy", params=WIDE,
                            dtype=torch.bfloat16)
    deep = write_lumina_dit(base / "models" / "lumina_4_layers.safetensors",
                            params=dataclasses.replace(tiny_lumina_params(), n_layers=4))
    images = write_shapes_dataset(base / "images", count=4)
    dataset = base / "my_lumina_dataset_config.toml"
    dataset.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\nbatch_size = 2\n'
                       f'[[datasets.subsets]]\nimage_dir = "{images.as_posix()}"\nnum_repeats = 1\n')
    prompts = base / "prompts.txt"
    prompts.write_text("a red circle on a blue background --n blurry --w 64 --h 64 --d 1 --s 3 --l 4.0 "
                       "--ctr 0.5 --rcfg 1.0\n")
    return {"base": base, "paths": paths, "wide": wide, "deep": deep, "images": images, "dataset": dataset,
            "prompts": prompts}


def seed_command(f, out: Path) -> list[str]:
    """The guide's example command on the tiny files (learning rate raised for a 20-step run)."""
    p = f["paths"]
    return [
        f"--pretrained_model_name_or_path={p.dit}", f"--gemma2={p.gemma2}", f"--ae={p.ae}",
        f"--dataset_config={f['dataset']}", f"--output_dir={out}", "--output_name=my_lumina_lora",
        "--save_model_as=safetensors", "--network_module=networks.lora_lumina", "--network_dim=8",
        "--network_alpha=8", "--learning_rate=3e-3", "--optimizer_type=AdamW", "--lr_scheduler=constant",
        "--timestep_sampling=nextdit_shift", "--discrete_flow_shift=6.0", "--model_prediction_type=raw",
        f"--system_prompt={SYSTEM_PROMPT}", "--max_train_epochs=10", "--save_every_n_epochs=1",
        "--mixed_precision=bf16", "--gradient_checkpointing", "--cache_latents", "--cache_text_encoder_outputs",
    ]


def run_b_command(f, out: Path) -> list[str]:
    p = f["paths"]
    return [
        f"--pretrained_model_name_or_path={f['wide']}", f"--gemma2={p.gemma2}", f"--ae={p.ae}",
        f"--dataset_config={f['dataset']}", f"--output_dir={out}", "--output_name=te",
        "--network_module=networks.lora_lumina", "--network_dim=4", "--network_alpha=2", "--learning_rate=1e-3",
        "--text_encoder_lr=5e-4", f"--system_prompt={SYSTEM_PROMPT}", "--max_train_steps=3",
        "--mixed_precision=bf16", "--cache_latents", "--seed=2", "--max_data_loader_n_workers=0",
        f"--sample_prompts={f['prompts']}", "--sample_every_n_steps=3", "--network_args", *RUN_B_DIMS,
    ]


@pytest.fixture(scope="module")
def runs(files):
    base = files["base"]
    commands = {
        "A": seed_command(files, base / "A") + [
            "--network_train_unet_only", "--cache_text_encoder_outputs_to_disk", "--seed=3",
            "--max_data_loader_n_workers=0", f"--sample_prompts={files['prompts']}", "--sample_every_n_epochs=5"],
        "B": run_b_command(files, base / "B"),
    }
    # Both runs at once, one thread each: two cores, no oversubscription.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "lumina_train_network.py"), *cmd], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in commands.items()}
    logs = {name: proc.communicate(timeout=600)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"run {name} failed:\n{logs[name][-4000:]}"
    return {"A": base / "A", "B": base / "B", "logs": logs}


def tensors_and_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def ranks(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    return {k.removesuffix(".lora_down.weight"): v.shape[0] for k, v in sd.items() if k.endswith(".lora_down.weight")}


# ---- run A: the guide's command -----------------------------------------------------------------

def test_loss_falls(runs):
    records = [json.loads(line) for line in (runs["A"] / "my_lumina_lora_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 20                       # 4 images, batch 2, 10 epochs
    assert np.mean(losses[-6:]) < 0.8 * np.mean(losses[:6]), losses


def test_lora_keys_and_metadata(runs):
    names = sorted(p.name for p in runs["A"].glob("*.safetensors"))
    assert names == [f"my_lumina_lora-{e:06d}.safetensors" for e in range(1, 10)] + ["my_lumina_lora.safetensors"]
    sd, meta = tensors_and_metadata(runs["A"] / "my_lumina_lora.safetensors")
    blocks = ("attention_qkv", "attention_out", "feed_forward_w1", "feed_forward_w2", "feed_forward_w3")
    expected = {f"lora_unet_{kind}_{i}_{layer}" for kind in ("layers", "noise_refiner") for i in range(2)
                for layer in (*blocks, "adaLN_modulation_1")}
    expected |= {f"lora_unet_context_refiner_{i}_{layer}" for i in range(2) for layer in blocks}
    expected |= {"lora_unet_final_layer_linear", "lora_unet_final_layer_adaLN_modulation_1"}
    assert set(ranks(sd)) == expected and set(ranks(sd).values()) == {8}      # unet only: no lora_te_
    assert len(sd) == 3 * len(expected)
    assert float(sd["lora_unet_layers_0_attention_qkv.alpha"]) == 8.0
    assert sd["lora_unet_layers_0_attention_qkv.lora_up.weight"].shape == (4 * 96, 8)   # 2 q + 1 k + 1 v heads
    assert meta["ss_base_model_version"] == "lumina2" and meta["ss_network_module"] == "networks.lora_lumina"
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_steps"] == "20" and meta["ss_epoch"] == "10"
    assert (meta["ss_timestep_sampling"], meta["ss_discrete_flow_shift"], meta["ss_model_prediction_type"]) == \
        ("nextdit_shift", "6.0", "raw")
    for key in ("ss_weighting_scheme", "ss_logit_mean", "ss_logit_std", "ss_mode_scale", "ss_sigmoid_scale"):
        assert key in meta
    assert meta["ss_mixed_precision"] == "bf16" and meta["ss_gradient_checkpointing"] == "True"
    assert meta["modelspec.architecture"] == "lumina-2/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Alpha-VLLM/Lumina-Image-2.0"
    assert "modelspec.prediction_type" not in meta     # "epsilon" would be false for a flow model
    assert meta["ss_sd_model_name"] == "lumina-image-2-tiny.safetensors"
    assert len(meta["sshs_model_hash"]) == 64 and len(meta["ss_new_sd_model_hash"]) == 64


def test_system_prompt_is_in_every_encoded_caption(runs, files):
    tokenizer = load_gemma2_tokenizer(files["paths"].gemma2)
    caches = sorted(files["images"].glob("*_lumina_te.safetensors"))
    assert len(caches) == 4
    for cache in caches:
        caption = (files["images"] / cache.name.replace("_lumina_te.safetensors", ".txt")).read_text()
        sd = load_file(str(cache))
        (ids_key,) = [k for k in sd if k.endswith("input_ids")]
        mask = sd[ids_key.replace("input_ids", "attention_mask")].bool()
        text = tokenizer.decode(sd[ids_key][mask])
        assert text == f"<bos>{SYSTEM_PROMPT} <Prompt Start> {caption}"
        assert sd[ids_key.replace("input_ids", "hidden_state")].shape == (256, 128)   # max length 256, Gemma2 width


def test_sample_images(runs):
    pngs = sorted((runs["A"] / "sample").glob("*.png"))
    assert [p.name.split("_")[3] for p in pngs] == ["e000005", "e000010"]
    assert Image.open(pngs[0]).size == (64, 64)
    assert "epoch 10" in (runs["A"] / "sample" / "index.html").read_text()


def infer(files, out: Path, *extra: str, dit: Path | None = None) -> tuple[np.ndarray, str]:
    p = files["paths"]
    argv = ["--pretrained_model_name_or_path", str(dit or p.dit), "--gemma2_path", str(p.gemma2), "--ae_path",
            str(p.ae), "--output_dir", str(out), "--seed", "1234", "--prompt", "a red circle on a blue background",
            "--negative_prompt", "blurry", "--system_prompt", SYSTEM_PROMPT, "--image_width", "64",
            "--image_height", "64", "--steps", "4", "--guidance_scale", "4.0", "--dtype", "float32",
            "--gemma2_dtype", "float32", "--ae_dtype", "float32", "--device", "cpu", "--offload", *extra]
    assert lumina_minimal_inference.main(argv) == 0
    (png,) = out.glob("image_*_1234.png")
    return np.asarray(Image.open(png), dtype=np.float32)


def test_inference_with_lora_differs_from_without(runs, files, tmp_path):
    base = infer(files, tmp_path / "base")
    lora = infer(files, tmp_path / "lora", "--lora_weights", f"{runs['A'] / 'my_lumina_lora.safetensors'};1.0")
    half = infer(files, tmp_path / "half", "--lora_weights", f"{runs['A'] / 'my_lumina_lora.safetensors'};0.5",
                 "--merge_lora_weights")
    assert base.shape == (64, 64, 3)
    assert np.abs(base - lora).mean() > 0.5
    assert 0 < np.abs(base - half).mean() < np.abs(base - lora).mean()


# ---- run B: Gemma2 LoRA, per-component ranks, full width ---------------------------------------

def test_per_component_ranks_are_in_the_file(runs):
    sd, meta = tensors_and_metadata(runs["B"] / "te.safetensors")
    r = ranks(sd)
    for name in ("layers_0_attention_qkv", "layers_0_attention_out", "noise_refiner_0_attention_qkv",
                 "context_refiner_0_attention_out"):
        assert r[f"lora_unet_{name}"] == 8, name                          # attn_dim
    assert r["lora_unet_layers_0_feed_forward_w2"] == 6                   # mlp_dim
    assert r["lora_unet_noise_refiner_0_feed_forward_w1"] == r["lora_unet_context_refiner_0_feed_forward_w3"] == 5
    assert r["lora_unet_layers_0_adaLN_modulation_1"] == r["lora_unet_noise_refiner_0_adaLN_modulation_1"] == 2
    assert r["lora_unet_final_layer_adaLN_modulation_1"] == 2 and r["lora_unet_final_layer_linear"] == 4
    assert r["lora_unet_x_embedder"] == 3 and r["lora_unet_cap_embedder_1"] == 7
    assert not any(n.startswith("lora_unet_t_embedder") for n in r)       # embedder_dims t = 0
    assert float(sd["lora_unet_layers_0_attention_qkv.alpha"]) == 2.0
    assert json.loads(meta["ss_network_args"])["refiner_dim"] == "5"


def test_gemma2_lora_trains(runs):
    sd, meta = tensors_and_metadata(runs["B"] / "te.safetensors")
    te = {n: rank for n, rank in ranks(sd).items() if n.startswith("lora_te_")}
    assert len(te) == 2 * 7 and set(te.values()) == {4}                  # tiny Gemma2: 2 layers x q,k,v,o,gate,up,down
    assert "lora_te_layers_1_self_attn_q_proj" in te and "lora_te_layers_0_mlp_down_proj" in te
    # Lumina reads Gemma2's hidden_states[-2], the output of the second-to-last layer: the last
    # layer's LoRA never gets a gradient (as in sd-scripts, it is created and saved all the same).
    trained = {n for n in te if float(sd[f"{n}.lora_up.weight"].abs().max()) > 0}
    assert trained == {n for n in te if n.startswith("lora_te_layers_0_")}
    assert meta["ss_text_encoder_lr"] == "0.0005"
    assert len(list((runs["B"] / "sample").glob("*.png"))) == 1          # re-encoded with the Gemma2 LoRA


def test_inference_applies_a_gemma2_lora(runs, files, tmp_path, capsys):
    infer(files, tmp_path / "te", "--lora_weights", f"{runs['B'] / 'te.safetensors'}", dit=files["wide"])
    assert "(35 modules)" in capsys.readouterr().out                      # 21 DiT + 14 Gemma2 modules


def test_diffusers_lumina2_converter_and_loader_take_the_blocks(runs):
    """diffusers reads Lumina 2 LoRAs named `diffusion_model.<module>.lora_A/B` (no alpha) and only
    the blocks' layers. Renamed that way, with alpha/rank folded into lora_B, the trained file's
    blocks convert and load into diffusers' Lumina2Transformer2DModel with exactly our deltas."""
    from diffusers import Lumina2Transformer2DModel
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lumina2_lora_to_diffusers

    sd, _ = tensors_and_metadata(runs["B"] / "te.safetensors")
    with torch.device("meta"):
        ours = NextDiT(WIDE)
    paths = {"lora_unet_" + n.replace(".", "_"): n for n, _ in ours.named_modules() if n}

    def delta(name: str) -> torch.Tensor:
        down, up = sd[f"{name}.lora_down.weight"].float(), sd[f"{name}.lora_up.weight"].float()
        return up @ down * (float(sd[f"{name}.alpha"]) / down.shape[0])

    renamed, outside = {}, []
    for name in ranks(sd):
        if name.startswith("lora_unet_") and paths[name].split(".")[0] in ("layers", "noise_refiner", "context_refiner"):
            down, up = sd[f"{name}.lora_down.weight"].float(), sd[f"{name}.lora_up.weight"].float()
            renamed[f"diffusion_model.{paths[name]}.lora_A.weight"] = down
            renamed[f"diffusion_model.{paths[name]}.lora_B.weight"] = up * (float(sd[f"{name}.alpha"]) / down.shape[0])
        else:
            outside.append(name)
    assert sorted(n for n in outside if n.startswith("lora_unet_")) == [
        "lora_unet_cap_embedder_1", "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_final_layer_linear",
        "lora_unet_x_embedder"]
    converted = _convert_non_diffusers_lumina2_lora_to_diffusers(dict(renamed))

    with torch.device("meta"):
        ref = Lumina2Transformer2DModel(hidden_size=2304, num_layers=1, num_refiner_layers=1, cap_feat_dim=128,
                                        ffn_dim_multiplier=256 / (4 * 2304))
    ref = ref.to_empty(device="cpu")
    ref.load_lora_adapter(converted, prefix="transformer", adapter_name="ours")
    modules = dict(ref.named_modules())
    checked = 0
    for block in ("layers.0", "noise_refiner.0", "context_refiner.0"):
        ours_name = "lora_unet_" + block.replace(".", "_")
        qkv = delta(f"{ours_name}_attention_qkv")
        expected = dict(zip(("attn.to_q", "attn.to_k", "attn.to_v"), qkv.split([2304, 768, 768])))
        expected["attn.to_out.0"] = delta(f"{ours_name}_attention_out")
        expected |= {f"feed_forward.linear_{i}": delta(f"{ours_name}_feed_forward_w{i}") for i in (1, 2, 3)}
        if block != "context_refiner.0":
            expected["norm1.linear"] = delta(f"{ours_name}_adaLN_modulation_1")
        for path, want in expected.items():
            got = modules[f"{block}.{path}"].get_delta_weight("ours")
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
            checked += 1
    assert checked == 8 + 8 + 7


# ---- refusals (in process, before or right after loading) ---------------------------------------

def train_in_process(argv: list[str], capsys) -> tuple[int, str]:
    code = LuminaNetworkTrainer().run(argv)
    return code, capsys.readouterr().out


def test_the_guides_command_as_printed_trains_the_dit_from_cached_text(files, tmp_path, capsys):
    """The guide caches text outputs without --network_train_unet_only: it runs unchanged, and
    the log says that only the DiT LoRA is trained (as for Anima)."""
    code, out = train_in_process(seed_command(files, tmp_path / "o") + ["--dataset_report"], capsys)
    assert code == 0, out[-2000:]
    assert "the text outputs are cached, so only the DiT LoRA is trained" in out


@pytest.mark.parametrize("extra, message", [
    (["--v2"], "--v2 is a Stable Diffusion 1.x/2.x option"),
    (["--v_parameterization", "--clip_skip=2"], "--clip_skip is a Stable Diffusion 1.x/2.x option"),
    (["--use_sage_attn"], "SageAttention has no backward pass"),
    (["--gemma2_max_token_length=300"], "use a multiple of 8 between 8 and 296"),
    (["--text_encoder_lr", "1e-4", "1e-5"], "Lumina has one text encoder"),
    (["--timestep_sampling=logit"], "invalid choice: 'logit'"),
    (["--network_args", "atn_dim=4"], "did you mean 'attn_dim'"),
])
def test_bad_options_are_refused(files, tmp_path, capsys, extra, message):
    argv = seed_command(files, tmp_path / "o") + ["--network_train_unet_only", "--max_data_loader_n_workers=0", *extra]
    try:
        code, out = train_in_process(argv, capsys)
    except SystemExit as e:           # argparse's own errors (a choice that does not exist)
        code, out = e.code, capsys.readouterr().err
    assert code == 2 and message in out, out[-2000:]


def test_flash_attention_without_the_package_is_a_clear_error(files, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    argv = seed_command(files, tmp_path / "o") + ["--network_train_unet_only", "--use_flash_attn"]
    code, out = train_in_process(argv, capsys)
    assert code == 2 and "--use_flash_attn" in out and "pip install flash-attn" in out


def test_wrong_files_and_prompt_options_are_named(files, tmp_path, capsys):
    p = files["paths"]
    base = seed_command(files, tmp_path / "o") + ["--network_train_unet_only", "--max_data_loader_n_workers=0"]
    code, out = train_in_process(base + [f"--pretrained_model_name_or_path={p.ae}"], capsys)
    assert code == 2 and "expected a Lumina Image 2.0 DiT" in out and "autoencoder" in out
    code, out = train_in_process(base + [f"--gemma2={p.dit}"], capsys)
    assert code == 2 and "expected a Gemma2 text encoder" in out
    flux_prompts = tmp_path / "flux_prompts.txt"
    flux_prompts.write_text("a cat --w 64 --h 64 --g 3.5\n")
    code, out = train_in_process(base + [f"--sample_prompts={flux_prompts}"], capsys)
    assert code == 2 and "--g (FLUX embedded guidance) is not used by Lumina Image 2.0" in out
    missing = [a for a in base if not a.startswith("--gemma2=")]
    code, out = train_in_process(missing, capsys)
    assert code == 2 and "--gemma2 is required" in out


def test_block_swap_and_fp8_use_the_main_layers(files, tmp_path, capsys):
    """The shared memory options reach Lumina through block_lists: the 4-layer DiT swaps at most
    2 layers; --fp8_base stores the layers' and Gemma2's matrices in fp8 (with a Gemma2 LoRA)."""
    p = files["paths"]
    argv = [f"--pretrained_model_name_or_path={files['deep']}", f"--gemma2={p.gemma2}", f"--ae={p.ae}",
            f"--dataset_config={files['dataset']}", f"--output_dir={tmp_path / 'o'}", "--network_module=networks.lora_lumina",
            "--max_train_steps=2", "--mixed_precision=bf16", "--gradient_checkpointing", "--seed=1",
            "--max_data_loader_n_workers=0", "--fp8_base"]
    code, out = train_in_process(argv + ["--blocks_to_swap=2"], capsys)
    assert code == 0, out[-3000:]
    assert "block swap: 2 (2 of 4 blocks per list)" in out
    assert "Gemma2: fp8 base: 14 Linear layers in float8_e4m3fn" in out
    assert "fp8 base: 24 Linear layers in float8_e4m3fn" in out            # 4 layers x qkv, out, w1-w3, adaLN
    sd, _ = tensors_and_metadata(tmp_path / "o" / "last.safetensors")
    assert any(k.startswith("lora_te_") for k in sd) and any(k.startswith("lora_unet_layers_3_") for k in sd)
    code, out = train_in_process(argv + ["--blocks_to_swap=3"], capsys)
    assert code == 2 and "--blocks_to_swap 3 is too many for Lumina Image 2.0 (4 layers): at most 2" in out


def test_inference_refuses_a_missing_lora_and_fp16_gemma2(files, tmp_path, capsys):
    p = files["paths"]
    argv = ["--pretrained_model_name_or_path", str(p.dit), "--gemma2_path", str(p.gemma2), "--ae_path", str(p.ae),
            "--output_dir", str(tmp_path), "--device", "cpu"]
    assert lumina_minimal_inference.main(argv + ["--lora_weights", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors: file not found" in capsys.readouterr().out
    assert lumina_minimal_inference.main(argv + ["--gemma2_dtype", "fp16"]) == 2
    assert "overflow in float16" in capsys.readouterr().out


def test_negative_prompts_for_samples_get_no_system_prompt(files):
    p = files["paths"]
    text = LuminaTextEncoding.from_files(gemma2_path=p.gemma2, system_prompt=SYSTEM_PROMPT, max_length=64)
    models = FamilyModels(denoiser=None, text_encoders=[text.gemma2], vae=None, extra={"text": text})
    conds = LuminaNetworkTrainer()._encode_sample_texts(models, [("prompt", "a cat"), ("negative", "blurry")])

    def decoded(key):
        entry = conds[key]
        return text.tokenizer.decode(entry["input_ids"][entry["attention_mask"].bool()])

    assert decoded(("prompt", "a cat")) == f"<bos>{SYSTEM_PROMPT} <Prompt Start> a cat"
    assert decoded(("negative", "blurry")) == "<bos>blurry"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_recorded_training_matches_eager_training_on_cuda(files, tmp_path):
    # --cuda_graph keeps the captions' padded length and masks on the device (no host read of the
    # lengths): the same losses as the eager run, which cuts the padding, within bf16 noise.
    def run(out: Path, *extra: str) -> tuple[dict[int, float], str]:
        cmd = [c for c in seed_command(files, out) if not c.startswith("--max_train_epochs")]
        result = subprocess.run([sys.executable, str(ROOT / "lumina_train_network.py"), *cmd,
                                 "--network_train_unet_only", "--max_train_steps=10", "--seed=4",
                                 "--max_data_loader_n_workers=0", *extra],
                                cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "--cuda_graph is off" not in result.stdout, result.stdout[-3000:]
        records = map(json.loads, (out / "my_lumina_lora_log.jsonl").read_text().splitlines())
        return {r["step"]: r["loss"] for r in records if "loss" in r}, result.stdout

    eager, _ = run(tmp_path / "eager")
    graphed, log = run(tmp_path / "graphed", "--cuda_graph")
    assert "--cuda_graph: step recorded for input shape 1" in log
    assert sorted(eager) == sorted(graphed) and len(eager) == 10
    for step in eager:
        assert graphed[step] == pytest.approx(eager[step], rel=2e-2, abs=1e-3), (step, eager[step], graphed[step])
