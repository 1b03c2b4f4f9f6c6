"""library/training/memory.py: how the loop applies --blocks_to_swap (numbers and 'auto'),
--fp8_base and the option checks, on a tiny FLUX on the CPU (the swap bookkeeping is the same
code as on CUDA; the free GPU memory is faked for 'auto')."""

from __future__ import annotations

import argparse

import pytest
import torch

from library.errors import ConfigError
from library.offload import GiB, swappable_bytes
from library.training import memory
from tests.test_offload import flux_inputs, max_grad_diff, tiny_flux_with_lora, train_step


def lists(model):
    return [model.double_blocks, model.single_blocks]


def test_auto_picks_the_smallest_swap_that_fits_the_free_memory(monkeypatch):
    params, model, net = tiny_flux_with_lora()
    x = flux_inputs(params)
    expected, expected_grads = train_step(model, net, x)
    double, single = swappable_bytes(model.double_blocks), swappable_bytes(model.single_blocks)
    fixed, activations = 1000, 2000
    # --blocks_to_swap 3 = 1 double + 4 single blocks off the GPU: leaves 4 doubles and 2 singles resident.
    # Free memory is exactly what that needs (+ the 1 GiB margin), so 2 does not fit and 3 does.
    free = fixed + activations + GiB + 4 * double + 2 * single
    monkeypatch.setattr(memory, "cuda_allocatable_bytes", lambda device: free)
    placement = memory.place_denoiser(model, lists(model), torch.device("cpu"), "auto", model_name="tiny FLUX",
                                      auto_fixed_bytes=lambda: fixed, auto_activation_bytes=lambda: activations)
    assert placement.blocks_to_swap == 3
    assert "--blocks_to_swap auto: 3 of at most" in placement.message
    out, grads = train_step(model, net, x)
    assert torch.allclose(out, expected, atol=1e-6) and max_grad_diff(grads, expected_grads) < 1e-6
    assert placement.swap.stats.fallback_loads == 0


@pytest.mark.parametrize("fraction, expected_gib", [(1.0, 12), (0.3, 30 - 20), (0.25, 25 - 20)])
def test_allocatable_memory_counts_the_allocator_cache_and_a_memory_fraction(monkeypatch, fraction, expected_gib):
    # 100 GiB card, 8 GiB free at the driver, the process holds 24 GiB of which 20 are in use:
    # 8 + 4 cached are allocatable, unless a per-process fraction caps the process lower
    # (30 GiB: 10 more; 25 GiB: 5 more).
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * GiB, 100 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 24 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 20 * GiB)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: fraction)
    assert memory.cuda_allocatable_bytes(torch.device("cuda", 0)) == expected_gib * GiB


def test_auto_without_an_estimate_is_refused(monkeypatch):
    _, model, _ = tiny_flux_with_lora()
    monkeypatch.setattr(memory, "cuda_allocatable_bytes", lambda device: GiB)
    with pytest.raises(ConfigError, match="not available for tiny FLUX yet"):
        memory.place_denoiser(model, lists(model), torch.device("cpu"), "auto", model_name="tiny FLUX",
                              auto_activation_bytes=lambda: None)


def test_fp8_and_swap_need_block_lists():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="--blocks_to_swap is not supported for an SD UNet"):
        memory.place_denoiser(model, [], torch.device("cpu"), 2, model_name="an SD UNet")
    with pytest.raises(ConfigError, match="--fp8_base is not supported for an SD UNet"):
        memory.quantize_base(model, [], torch.device("cpu"), torch.float32, model_name="an SD UNet",
                             keep_on_device=True)


def test_quantize_base_converts_block_linears_only():
    from dataclasses import replace

    from library.tiny.flux import build_flux_model, tiny_flux_params

    model = build_flux_model(replace(tiny_flux_params("dev"), depth=2, depth_single_blocks=2)).requires_grad_(False)
    report = memory.quantize_base(model, lists(model), torch.device("cpu"), torch.float32, model_name="tiny",
                                  keep_on_device=True)
    assert report.quantized == 2 * 10 + 2 * 3        # double: 10 Linears each, single: 3
    assert model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert model.img_in.weight.dtype == torch.float32   # outside the blocks: compute dtype


def base_args(**kw):
    values = dict(blocks_to_swap=None, cpu_offload_checkpointing=False, unsloth_offload_checkpointing=False,
                  torch_compile=False, fp8_base=False, fp8_base_unet=False, gradient_checkpointing=False,
                  mixed_precision="bf16", disable_mmap_load_safetensors=False)
    values.update(kw)
    return argparse.Namespace(**values)


def test_option_checks_and_implied_options():
    args = base_args(fp8_base_unet=True, unsloth_offload_checkpointing=True)
    notes = memory.check_memory_args(args)
    assert args.fp8_base and args.gradient_checkpointing and len(notes) == 2
    with pytest.raises(ConfigError, match="cannot be used together yet"):
        memory.check_memory_args(base_args(blocks_to_swap=4, torch_compile=True))
    with pytest.raises(ConfigError, match="cannot be used with --unsloth_offload_checkpointing"):
        memory.check_memory_args(base_args(blocks_to_swap=4, unsloth_offload_checkpointing=True))
    with pytest.raises(ConfigError, match="computes in the mixed-precision dtype"):
        memory.check_memory_args(base_args(fp8_base=True, mixed_precision="no"))
    assert memory.check_memory_args(base_args(selective_checkpointing=True, gradient_checkpointing=True,
                                              torch_compile=True)) == []
    (note,) = memory.check_memory_args(base_args(selective_checkpointing=True, gradient_checkpointing=True))
    assert "makes each step slower" in note
    (tip,) = memory.check_memory_args(base_args(gradient_checkpointing=True, torch_compile=True))
    assert tip.startswith("--selective_checkpointing would make these compiled")
    assert memory.check_memory_args(base_args(gradient_checkpointing=True, torch_compile=True,
                                              cpu_offload_checkpointing=True)) == []
    with pytest.raises(ConfigError, match="Add --gradient_checkpointing or remove it"):
        memory.check_memory_args(base_args(selective_checkpointing=True))
    with pytest.raises(ConfigError, match="offloaded checkpointing keeps only block inputs"):
        memory.check_memory_args(base_args(selective_checkpointing=True, cpu_offload_checkpointing=True,
                                           gradient_checkpointing=True))


def test_models_load_straight_to_the_gpu_only_when_all_files_fit(tmp_path, monkeypatch):
    from types import SimpleNamespace

    files = []
    for name, size in (("dit", 3000), ("t5", 1000)):
        (tmp_path / name).write_bytes(b"\0" * size)
        files.append(str(tmp_path / name))
    cuda = torch.device("cuda", 0)   # with its index (without one, load_device asks CUDA for the current device)
    args = SimpleNamespace(lowram=False, blocks_to_swap=None)
    monkeypatch.setattr(memory, "LOAD_TO_GPU_RESERVE_BYTES", 500)
    monkeypatch.setattr(memory, "cuda_allocatable_bytes", lambda device: 4500)
    assert memory.load_device(args, cuda, files + [None]) == cuda           # 4000 + 500 fit
    monkeypatch.setattr(memory, "cuda_allocatable_bytes", lambda device: 4499)
    assert memory.load_device(args, cuda, files) == "cpu"
    monkeypatch.setattr(memory, "cuda_allocatable_bytes", lambda device: 10**12)
    assert memory.load_device(SimpleNamespace(lowram=False, blocks_to_swap=4), cuda, files) == "cpu"   # swap: CPU copies
    assert memory.load_device(args, cuda, [str(tmp_path)]) == "cpu"        # a folder is not sized: the CPU route
    assert memory.load_device(args, torch.device("cpu"), files) == "cpu"
    assert memory.load_device(SimpleNamespace(lowram=True, blocks_to_swap=4), cuda, files) == cuda


def test_a_released_module_frees_its_weights_stays_released_and_refuses_to_run():
    layer = torch.nn.Linear(4, 4)
    memory.release_module(layer, "its outputs are cached")
    assert layer.weight.device.type == "meta"
    assert memory.place(layer, torch.device("cpu")) is layer and layer.weight.device.type == "meta"
    with pytest.raises(RuntimeError, match="released after caching"):
        layer(torch.zeros(1, 4))
    other = torch.nn.Linear(2, 2, dtype=torch.float64)
    assert memory.place(other, torch.float32).weight.dtype == torch.float32   # any other module: plain .to


def test_run_beside_returns_the_loaders_result_or_raises_its_error():
    from library.device_reader import run_beside

    assert run_beside(lambda a, b=0: a + b, "cpu", 2, b=3).result() == 5

    def broken():
        raise ValueError("bad file")

    with pytest.raises(ValueError, match="bad file"):
        run_beside(broken, "cpu").result()
