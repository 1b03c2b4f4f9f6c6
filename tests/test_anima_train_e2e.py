"""Anima end to end through the real command lines on tiny files (CPU, no downloads).

Two training runs go in parallel at the start: (a) the seed guide's example command (cached latents
and text outputs, caption dropout, samples) and (b) a run that sets every selection knob at once
(include/exclude patterns, network_reg_dims, the LLM-adapter and Qwen3 LoRA, per-component learning
rates with one frozen component, l1 loss, shift sampling with cosmap weighting). The tests then check
the loss, the files (FORMATS 4.5 keys, ranks, metadata), diffusers' Anima LoRA loader, inference with
and without the LoRA, and that bad input ends with a clear message.

Every process runs with one OpenMP thread: the 2-core test machine is shared, and spinning OpenMP
threads make tiny matmuls several times slower there.
"""

from __future__ import annotations

import importlib.util

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from library.tiny.anima import write_tiny_anima_set
from library.tiny.images import write_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("anima_e2e")
    paths = write_tiny_anima_set(base / "models")
    datasets = {}
    for name, extra in (("a", "caption_dropout_rate = 0.25\n"), ("b", "")):
        images = write_shapes_dataset(base / f"images_{name}", count=6)
        datasets[name] = base / f"dataset_{name}.toml"
        datasets[name].write_text(
            f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 128\nbatch_size = 2\n'
            f'enable_bucket = true\nmin_bucket_reso = 64\nmax_bucket_reso = 256\n'
            f'[[datasets.subsets]]\nimage_dir = "{images.as_posix()}"\nnum_repeats = 2\n{extra}')
    prompts = base / "prompts.txt"
    prompts.write_text("a red circle on a blue background --n blurry --w 128 --h 128 --d 1 --s 2 --l 4.0\n")
    return SimpleNamespace(base=base, paths=paths, datasets=datasets, prompts=prompts)


def model_args(paths) -> list[str]:
    return ["--pretrained_model_name_or_path", str(paths.dit), "--qwen3", str(paths.qwen3), "--vae", str(paths.vae),
            "--tokenizer_cache_dir", str(paths.tokenizer_cache_dir)]


# The guide uses AdamW8bit (bitsandbytes); where bitsandbytes is not installed (macOS, some GPU
# images) the same command runs with plain AdamW, which the rest of the checks do not depend on.
SEED_OPTIMIZER = "AdamW8bit" if importlib.util.find_spec("bitsandbytes") is not None else "AdamW"


def seed_command(s, out: Path) -> list[str]:
    """The guide's example (section 4), on tiny files: lr 2e-3 instead of 1e-4 so 18 steps show learning,
    short token lengths, and the disk variants of the caches so the cached entries can be inspected."""
    return [
        sys.executable, str(ROOT / "anima_train_network.py"), *model_args(s.paths),
        "--dataset_config", str(s.datasets["a"]), "--output_dir", str(out), "--output_name", "tiny",
        "--save_model_as", "safetensors", "--network_module", "networks.lora_anima", "--network_dim", "8",
        "--learning_rate", "2e-3", "--optimizer_type", SEED_OPTIMIZER, "--lr_scheduler", "constant",
        "--timestep_sampling", "sigmoid", "--discrete_flow_shift", "1.0", "--max_train_epochs", "3",
        "--save_every_n_epochs", "1", "--mixed_precision", "bf16", "--gradient_checkpointing", "--cache_latents",
        "--cache_text_encoder_outputs", "--vae_chunk_size", "64", "--vae_disable_cache",
        # test-only additions
        "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk", "--qwen3_max_token_length", "16",
        "--t5_max_token_length", "16", "--seed", "3", "--max_data_loader_n_workers", "0",
        "--sample_prompts", str(s.prompts), "--sample_every_n_epochs", "3",
    ]


# (b): ranks 4 for self-attention, 2 for cross-attention (DiT and adapter), MLPs out, the final layer in,
# adapter LoRA at lr 5e-4, cross-attention frozen, Qwen3 LoRA at 1e-3, DiT at 2e-3.
SELECTION_ARGS = [
    "--network_args", "include_patterns=['.*final_layer.*']", "exclude_patterns=['.*mlp.*']",
    "network_reg_dims=.*self_attn.*=4,.*cross_attn.*=2", "train_llm_adapter=True",
    "--cross_attn_lr", "0", "--llm_adapter_lr", "5e-4", "--text_encoder_lr", "1e-3",
    "--loss_type", "l1", "--timestep_sampling", "shift", "--discrete_flow_shift", "3", "--weighting_scheme", "cosmap",
]


def selection_command(s, out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "anima_train_network.py"), *model_args(s.paths),
            "--dataset_config", str(s.datasets["b"]), "--output_dir", str(out), "--output_name", "sel",
            "--network_module", "networks.lora_anima", "--network_dim", "8", "--learning_rate", "2e-3",
            "--max_train_steps", "4", "--cache_latents_to_disk", "--qwen3_max_token_length", "16",
            "--t5_max_token_length", "16", "--seed", "3", "--max_data_loader_n_workers", "0",
            "--sample_prompts", str(s.prompts), "--sample_every_n_steps", "4", *SELECTION_ARGS]


def refused_command(s, out: Path) -> list[str]:
    return [*seed_command(s, out), "--v2"]


@pytest.fixture(scope="module")
def runs(setup):
    """The three command-line runs, started together (they mostly wait on imports: two cores serve them)."""
    started = {}
    for name, command in (("seed", seed_command), ("selection", selection_command), ("refused", refused_command)):
        out = setup.base / name
        started[name] = (out, subprocess.Popen(command(setup, out), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, text=True))
    yield started
    for _, proc in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def outcome(runs, name: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a run, waiting for it."""
    _, proc = runs[name]
    if not hasattr(proc, "log"):
        proc.log = proc.communicate(timeout=600)
    return proc.returncode, *proc.log


def finished(runs, name: str) -> Path:
    code, stdout, stderr = outcome(runs, name)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    return runs[name][0]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def losses(out: Path, name: str) -> list[float]:
    records = [json.loads(line) for line in (out / f"{name}_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in sorted(records, key=lambda r: r["step"]) if "loss" in r]


def ups(sd: dict, prefix: str) -> list[float]:
    return [float(v.abs().max()) for k, v in sd.items() if k.startswith(prefix) and k.endswith("lora_up.weight")]


# ---------------------------------------------------------------------------------------------- (a)

def test_seed_command_trains_and_the_loss_falls(runs):
    out = finished(runs, "seed")
    values = losses(out, "tiny")
    assert len(values) == 18                                   # 3 epochs x 6 batches
    assert np.mean(values[-5:]) < 0.6 * np.mean(values[:5]), values
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "tiny-000001.safetensors", "tiny-000002.safetensors", "tiny.safetensors"]
    samples = sorted((out / "sample").glob("*.png"))
    assert len(samples) == 1 and "_e000003_00_" in samples[0].name
    assert Image.open(samples[0]).size == (128, 128)


def test_lora_keys_ranks_and_metadata_follow_formats(runs):
    sd, meta = read(finished(runs, "seed") / "tiny.safetensors")
    # FORMATS 4.5: per block self_attn/cross_attn q/k/v/output_proj and mlp layer1/layer2; no modulation,
    # norms, embedders or final layer; no Qwen3 (text outputs are cached)
    expected = {f"lora_unet_blocks_{b}_{m}" for b in range(2) for m in
                [f"{a}_{p}" for a in ("self_attn", "cross_attn") for p in ("q_proj", "k_proj", "v_proj", "output_proj")]
                + ["mlp_layer1", "mlp_layer2"]}
    assert {k.split(".")[0] for k in sd} == expected
    assert len(sd) == 3 * len(expected)
    assert all(v.shape[0] == 8 for k, v in sd.items() if k.endswith("lora_down.weight"))
    assert all(float(v) == 1.0 for k, v in sd.items() if k.endswith(".alpha"))
    assert meta["ss_base_model_version"] == "anima" and meta["ss_network_module"] == "networks.lora_anima"
    assert meta["modelspec.architecture"] == "anima-preview/lora"
    assert meta["modelspec.implementation"] == "https://huggingface.co/circlestone-labs/Anima"
    assert "modelspec.prediction_type" not in meta                 # not "epsilon" (docs/compatibility.md)
    assert {k: meta[k] for k in ("ss_timestep_sampling", "ss_discrete_flow_shift", "ss_sigmoid_scale",
                                 "ss_weighting_scheme", "ss_logit_mean", "ss_logit_std", "ss_mode_scale")} == {
        "ss_timestep_sampling": "sigmoid", "ss_discrete_flow_shift": "1.0", "ss_sigmoid_scale": "1.0",
        "ss_weighting_scheme": "uniform", "ss_logit_mean": "0.0", "ss_logit_std": "1.0", "ss_mode_scale": "1.29"}
    assert "ss_model_prediction_type" not in meta
    assert meta["ss_steps"] == "18" and meta["ss_mixed_precision"] == "bf16"
    assert meta["ss_sd_model_name"] == "anima-tiny.safetensors" and meta["ss_vae_name"] == "qwen_image_vae-tiny.safetensors"


def test_caption_dropout_is_cached_as_sd_scripts_dropped_entry(setup, runs):
    finished(runs, "seed")
    folder = setup.datasets["a"].parent / "images_a"
    tensors, _ = read(folder / "__empty_caption___anima_te.safetensors")
    entry = {k.split(":", 1)[1]: v for k, v in tensors.items()}
    # FORMATS 2: a dropped sample gets embeds 0, mask 0, T5 ids [1, 0, ...] and T5 mask [1, 0, ...]
    assert float(entry["prompt_embeds"].abs().max()) == 0 and int(entry["attn_mask"].sum()) == 0
    assert entry["t5_input_ids"].tolist() == [1] + [0] * 15 and entry["t5_attn_mask"].tolist() == [1] + [0] * 15
    assert len(list(folder.glob("shape_*_anima_te.safetensors"))) == 6


# ---------------------------------------------------------------------------------------------- (b)

def test_patterns_reg_dims_component_lrs_adapter_and_qwen3_lora(runs):
    out = finished(runs, "selection")
    sd, meta = read(out / "sel.safetensors")
    ranks = {k.split(".")[0]: v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")}
    assert not any("mlp" in name for name in ranks)                                     # excluded
    assert {n for n in ranks if "final_layer" in n} == {                                # included back
        "lora_unet_final_layer_linear", "lora_unet_final_layer_adaln_modulation_1",
        "lora_unet_final_layer_adaln_modulation_2"}
    assert not any("adaln_modulation_self_attn" in n or "embedder" in n for n in ranks)  # still excluded
    for name, rank in ranks.items():
        expected = 4 if "self_attn" in name else 2 if "cross_attn" in name else 8
        assert rank == expected, name
    assert sum(n.startswith("lora_unet_llm_adapter_blocks_") for n in ranks) == 2 * 8   # q/k/v/o x 2 attn x 2 blocks
    assert sum(n.startswith("lora_te_layers_") for n in ranks) == 2 * 4                 # Qwen3 attention (MLP excluded)

    dit_self = ups(sd, "lora_unet_blocks_0_self_attn")
    assert ups(sd, "lora_unet_blocks_1_cross_attn") == [0.0] * 4 and ups(sd, "lora_unet_blocks_0_cross_attn") == [0.0] * 4
    adapter, qwen3 = ups(sd, "lora_unet_llm_adapter_"), ups(sd, "lora_te_")
    # Adam moves each weight by about lr per step: 5e-4 (adapter) < 1e-3 (Qwen3) < 2e-3 (DiT)
    assert 0 < max(adapter) < 0.4 * min(dit_self) and 0 < max(qwen3) < 0.7 * min(dit_self)
    assert max(adapter) < 0.7 * min(qwen3)
    assert meta["ss_loss_type"] == "l1" and meta["ss_timestep_sampling"] == "shift"
    assert meta["ss_weighting_scheme"] == "cosmap" and meta["ss_discrete_flow_shift"] == "3.0"
    assert meta["ss_text_encoder_lr"] == "0.001"
    assert len(list((out / "sample").glob("*.png"))) == 1      # sampled with the Qwen3 LoRA re-encoding prompts
    log = outcome(runs, "selection")[1]
    assert "--cross_attn_lr: 8 LoRA modules, frozen" in log and "--llm_adapter_lr: 16 LoRA modules" in log


# ---------------------------------------------------------------------------------------------- diffusers

def to_comfy(sd: dict, dit: torch.nn.Module) -> dict:
    """sd-scripts' Anima file -> the ComfyUI layout diffusers reads (FORMATS 4.5:
    `diffusion_model.<dotted>.lora_A/lora_B.weight`), alpha/rank folded into lora_B; Qwen3 modules dropped
    (diffusers' Anima pipeline has no Qwen3 LoRA)."""
    from networks.lora_core import to_lora_name

    dotted = {to_lora_name("lora_unet", n): n for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)}
    out = {}
    for key, value in sd.items():
        name, part = key.split(".", 1)
        if name.startswith("lora_te_") or part == "alpha":
            continue
        rank = sd[f"{name}.lora_down.weight"].shape[0]
        scale = float(sd[f"{name}.alpha"]) / rank
        if part == "lora_down.weight":
            out[f"diffusion_model.{dotted[name]}.lora_A.weight"] = value
        else:
            out[f"diffusion_model.{dotted[name]}.lora_B.weight"] = value * scale
    return out


def test_diffusers_anima_lora_loader_reads_the_files(setup, runs, monkeypatch, one_thread):
    """diffusers 0.42 has `_convert_non_diffusers_anima_lora_to_diffusers` (used by AnimaLoraLoaderMixin).
    peft is not installed here, so instead of load_lora_weights the converted deltas are merged by hand into
    diffusers' CosmosTransformer3DModel: its output must equal ours with the LoRA applied. The adapter and
    final-layer modules of run (b) must name modules of the right shapes in diffusers' models."""
    from diffusers import AnimaTextConditioner
    from diffusers.loaders.lora_pipeline import AnimaLoraLoaderMixin

    from library.anima.llm_adapter import MIN_CONTEXT_LENGTH
    from library.anima.loading import load_anima_dit
    from networks import lora_anima
    from tests.test_anima_model import _torchvision_stub, diffusers_dit

    _torchvision_stub(monkeypatch)
    ours, info = load_anima_dit(setup.paths.dit, dtype=torch.float32)
    ref = diffusers_dit(info.params, ours.state_dict())
    p = info.params.llm_adapter
    conditioner = AnimaTextConditioner(source_dim=p.source_dim, target_dim=p.target_dim, model_dim=p.model_dim,
                                       num_layers=p.num_layers, num_attention_heads=p.num_heads,
                                       mlp_ratio=p.mlp_hidden / p.model_dim, target_vocab_size=p.vocab_size,
                                       min_sequence_length=MIN_CONTEXT_LENGTH)

    for file in (finished(runs, "seed") / "tiny.safetensors", finished(runs, "selection") / "sel.safetensors"):
        sd, _ = read(file)
        converted = AnimaLoraLoaderMixin.lora_state_dict(to_comfy(sd, ours))
        assert all("lora" in k and k.startswith(("transformer.", "text_conditioner.")) for k in converted)
        for key, value in converted.items():
            if not key.endswith("lora_A.weight"):
                continue
            root, path = key.split(".", 1)
            module = (ref if root == "transformer" else conditioner).get_submodule(path[: -len(".lora_A.weight")])
            up = converted[key.replace("lora_A", "lora_B")]
            assert isinstance(module, torch.nn.Linear), key
            assert (module.in_features, module.out_features) == (value.shape[1], up.shape[0]), key
    # run (a)'s DiT LoRA merged into diffusers' model == ours with the LoRA applied
    sd, _ = read(finished(runs, "seed") / "tiny.safetensors")
    converted = AnimaLoraLoaderMixin.lora_state_dict(to_comfy(sd, ours))
    with torch.no_grad():
        for key, a in converted.items():
            if key.endswith("lora_A.weight"):
                b = converted[key.replace("lora_A", "lora_B")]
                ref.get_submodule(key[len("transformer."): -len(".lora_A.weight")]).weight += b @ a
    network, weights = lora_anima.create_network_from_weights(1.0, None, None, None, ours, weights_sd=sd,
                                                             for_inference=True)
    network.apply_to(None, ours, apply_text_encoder=False)
    network.load_weights(weights)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 8, 12, generator=g)
    sigma, context = torch.tensor([0.6]), torch.randn(1, 20, info.params.crossattn_emb_channels, generator=g)
    with torch.no_grad():
        expected = ref(x, sigma, context, padding_mask=torch.zeros(1, 1, 8, 12), return_dict=False)[0]
        got = ours(x, sigma, context)
        network.set_multiplier(0.0)
        base = ours(x, sigma, context)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (got - base).abs().max() > 1e-3 * expected.abs().max()     # the LoRA is not a no-op


# ---------------------------------------------------------------------------------------------- inference

def test_inference_with_and_without_lora(setup, runs, tmp_path, capsys, one_thread):
    import anima_minimal_inference

    p = setup.paths
    seed_lora, selection_lora = finished(runs, "seed") / "tiny.safetensors", finished(runs, "selection") / "sel.safetensors"
    common = ["--dit", str(p.dit), "--text_encoder", str(p.qwen3), "--vae", str(p.vae), "--tokenizer_cache_dir",
              str(p.tokenizer_cache_dir), "--prompt", "a red circle on a blue background", "--negative_prompt", "blurry",
              "--image_size", "128", "128", "--infer_steps", "3", "--guidance_scale", "4.0", "--seed", "5",
              "--dtype", "float32", "--device", "cpu", "--qwen3_max_token_length", "16", "--t5_max_token_length", "16"]
    cases = {"base": [], "lora": ["--lora_weights", f"{seed_lora};1.0"], "zero": ["--lora_weights", f"{seed_lora};0"],
             "both": ["--lora_weight", str(seed_lora), str(selection_lora), "--lora_multiplier", "1.0", "0.8"],
             "merged": ["--lora", f"{seed_lora};1.0", "--merge_lora_weights"]}
    images = {}
    for name, extra in cases.items():
        out = tmp_path / f"{name}.png"
        assert anima_minimal_inference.main(common + ["--save_path", str(out)] + extra) == 0, capsys.readouterr().out
        images[name] = np.asarray(Image.open(out), dtype=np.float32)
    log = capsys.readouterr().out
    assert images["base"].shape == (128, 128, 3)
    assert np.abs(images["base"] - images["lora"]).mean() > 0.5
    assert np.array_equal(images["base"], images["zero"])
    assert np.abs(images["both"] - images["lora"]).mean() > 0.5
    assert np.abs(images["merged"] - images["lora"]).max() <= 2       # merged == applied, up to rounding
    assert "+ 8 Qwen3 modules" in log                                     # run (b)'s Qwen3 LoRA is applied


def test_inference_refuses_bad_lora_arguments(setup, capsys):
    import anima_minimal_inference

    p = setup.paths
    base = ["--dit", str(p.dit), "--qwen3", str(p.qwen3), "--vae", str(p.vae), "--prompt", "x"]
    assert anima_minimal_inference.main(base + ["--lora_weights", "missing.safetensors;1"]) == 2
    assert "missing.safetensors: file not found" in capsys.readouterr().out
    assert anima_minimal_inference.main(base + ["--lora_weights", "a;b"]) == 2
    assert "write 'path;multiplier'" in capsys.readouterr().out
    assert anima_minimal_inference.main(base + ["--image_size", "100", "128"]) == 2
    assert "multiples of 16" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- refusals

def test_sd_option_is_refused_through_the_command_line(runs):
    code, stdout, stderr = outcome(runs, "refused")
    assert code == 2, stdout[-2000:] + stderr[-2000:]
    assert "--v2 is for Stable Diffusion 2.x, not Anima" in stdout and "Traceback" not in stderr
    assert not runs["refused"][0].exists()                      # refused before anything was written


@pytest.mark.parametrize("extra, message", [
    (["--attn_mode", "xformers"], "--attn_mode xformers needs --split_attn"),
    (["--xformers"], "--attn_mode xformers needs --split_attn"),
    (["--attn_mode", "sageattn"], "--attn_mode sageattn has no backward pass"),
    (["--cache_text_encoder_outputs", "--text_encoder_lr", "1e-4"], "no Qwen3 LoRA is trained"),
    (["--cache_text_encoder_outputs", "--network_train_text_encoder_only"], "needs Qwen3 to run live"),
    (["--text_encoder_lr", "1e-4", "2e-4"], "Anima has one text encoder (Qwen3)"),
    (["--self_attn_lr", "-1"], "--self_attn_lr must be 0 (frozen) or more"),
    (["--clip_skip", "2"], "--clip_skip is for Stable Diffusion's CLIP"),
    (["--weighting_scheme", "logit_normal"], "--weighting_scheme logit_normal has no effect"),
    (["--mod_lr", "1e-4"], "--mod_lr: the LoRA has no AdaLN modulation module"),
    (["--llm_adapter_lr", "0"], 'add --network_args "train_llm_adapter=True"'),
    (["--network_args", "exclude_patterns=.*mlp.*"], "expected a Python list of quoted patterns"),
    (["--vae", "{dit}"], "expected the Qwen-Image VAE"),
    (["--pretrained_model_name_or_path", "{vae}"], "expected an Anima DiT"),
])
def test_bad_input_is_a_clear_error(setup, tmp_path, capsys, one_thread, extra, message):
    from anima_train_network import AnimaNetworkTrainer

    p = setup.paths
    extra = [e.format(dit=p.dit, vae=p.vae) for e in extra]
    argv = [*model_args(p), "--dataset_config", str(setup.datasets["b"]), "--output_dir", str(tmp_path),
            "--network_module", "networks.lora_anima", "--max_train_steps", "1", "--max_data_loader_n_workers", "0",
            "--qwen3_max_token_length", "16", "--t5_max_token_length", "16", *extra]
    assert AnimaNetworkTrainer().run(argv) == 2
    assert message in capsys.readouterr().out
    assert not list(tmp_path.glob("*.safetensors"))


def test_fp8_base_is_disabled_with_a_warning(setup, tmp_path, capsys):
    from anima_train_network import AnimaNetworkTrainer

    trainer = AnimaNetworkTrainer()
    argv = [*model_args(setup.paths), "--dataset_config", str(setup.datasets["b"]), "--output_dir", str(tmp_path),
            "--network_module", "networks.lora_anima", "--mixed_precision", "bf16"]
    if "--fp8_base" not in trainer.build_parser()._option_string_actions:
        pytest.skip("--fp8_base is not declared by the shared arguments yet")
    args = trainer.parse_args(argv + ["--fp8_base"])
    trainer.check_args(args)
    assert args.fp8_base is False
    assert "--fp8_base is not supported for Anima" in capsys.readouterr().out
