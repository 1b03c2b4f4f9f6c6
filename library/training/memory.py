"""The memory options every family shares, from the command line to the placed denoiser.

    --blocks_to_swap N|auto        library/offload.py (block swap over the family's block lists)
    --fp8_base / --fp8_base_unet   library/fp8.py (frozen block Linears stored as float8_e4m3fn)
    --cpu_offload_checkpointing    library/block_checkpointing.py + offload_checkpointing.py
    --unsloth_offload_checkpointing  (the same mechanism: Anima's name for it)

The loop calls, in this order: `check_memory_args` (before anything loads), `quantize_base`
(before the LoRA wraps the Linears: the LoRA must wrap the fp8 forward), then, once the text
encoders are off the GPU, `place_denoiser` (block swap or a plain move to the device).
A family takes part by returning its block lists from `block_lists(models)`; a family with
none (the SD UNet) gets a clear refusal for swap and fp8.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from library.errors import ConfigError
from library.fp8 import Fp8Report, quantize_linears_
from library.safetensors_io import set_mmap_loading
from library.offload import (
    GiB, BlockSwap, SwapList, check_blocks_to_swap, check_offload_options, choose_blocks_to_swap,
    parse_blocks_to_swap, swappable_bytes,
)


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("memory: block swap, fp8 base weights, offloaded checkpointing")
    g.add_argument("--blocks_to_swap", type=parse_blocks_to_swap, default=None,
                   help="keep this many transformer blocks' weights in CPU memory and bring each to the GPU just "
                        "before it runs (copies overlap compute); 'auto' picks the smallest number that fits the "
                        "free VRAM. Slower the more blocks are swapped. Not with offloaded checkpointing.")
    g.add_argument("--fp8_base", action="store_true",
                   help="store the frozen base model's block weights as float8_e4m3fn (half the memory of bf16; "
                        "fp8 files load directly); LoRA stays in full precision. T5-XXL too where the family "
                        "has it, unless --fp8_base_unet.")
    g.add_argument("--fp8_base_unet", action="store_true",
                   help="fp8 for the diffusion model only; text encoders stay bf16/fp16 (implies --fp8_base)")
    g.add_argument("--cpu_offload_checkpointing", action="store_true",
                   help="keep gradient checkpoints in CPU memory (saves ~1-2 GB at 1024px; a little slower); "
                        "implies --gradient_checkpointing. Not with --blocks_to_swap.")
    g.add_argument("--unsloth_offload_checkpointing", action="store_true",
                   help="the same as --cpu_offload_checkpointing (asynchronous copies), under Anima's name")
    g.add_argument("--selective_checkpointing", action="store_true",
                   help="with --gradient_checkpointing, also keep each block's attention and MLP down-projection "
                        "outputs, so the recomputation before its backward skips those kernels (FLUX.1-dev at "
                        "1024x1024: about 3 GiB more). Use it with --torch_compile and/or --cuda_graph: it watches "
                        "every op of a block from Python, which makes a plain eager step slower")
    g.add_argument("--highvram", action="store_true",
                   help="keep the autoencoder and text encoders on the GPU after caching (faster sampling, "
                        "more VRAM); without it, text encoders whose outputs are cached are released")
    g.add_argument("--lowram", action="store_true",
                   help="load the models straight to the GPU instead of CPU memory (machines with more VRAM "
                        "than RAM). The DiT families (FLUX, SD3, Lumina, Anima) do so anyway when all their "
                        "files fit in the GPU's free memory")
    g.add_argument("--disable_mmap_load_safetensors", action="store_true",
                   help="read .safetensors files with plain reads instead of memory-mapping them (helps on "
                        "Windows and network drives)")


def check_memory_args(args: argparse.Namespace) -> list[str]:
    """Refuse impossible combinations; returns notes for the log (implied options)."""
    notes = []
    set_mmap_loading(not args.disable_mmap_load_safetensors)
    check_offload_options(blocks_to_swap=args.blocks_to_swap, cpu_offload_checkpointing=args.cpu_offload_checkpointing,
                          unsloth_offload_checkpointing=args.unsloth_offload_checkpointing)
    if args.blocks_to_swap not in (None, 0) and getattr(args, "torch_compile", False):
        raise ConfigError(f"--blocks_to_swap {args.blocks_to_swap} and --torch_compile cannot be used together yet "
                          "(the swap hooks sit on the uncompiled blocks). Keep one of them.")
    if args.blocks_to_swap == "auto" and not torch.cuda.is_available():
        raise ConfigError("--blocks_to_swap auto sizes the swap to the free GPU memory, and there is no GPU here. "
                          "Give a number, or remove it.")
    if args.fp8_base_unet and not args.fp8_base:
        args.fp8_base = True
        notes.append("--fp8_base_unet implies --fp8_base (the diffusion model in fp8, text encoders in full precision)")
    if getattr(args, "selective_checkpointing", False):
        if args.cpu_offload_checkpointing or args.unsloth_offload_checkpointing:
            raise ConfigError("--selective_checkpointing keeps some outputs beside GPU-side checkpoints; offloaded "
                              "checkpointing keeps only block inputs, in CPU memory. Keep one of them.")
        if not args.gradient_checkpointing:
            raise ConfigError("--selective_checkpointing changes what --gradient_checkpointing keeps; without "
                              "checkpointing every activation is kept anyway. Add --gradient_checkpointing or remove it.")
        if not (getattr(args, "torch_compile", False) or getattr(args, "cuda_graph", False)):
            notes.append("--selective_checkpointing without --torch_compile or --cuda_graph makes each step slower, "
                         "not faster: it watches every op of a block from Python (FLUX.1-dev on an H200, attention "
                         "outputs kept: 1.05 instead of 0.76 s/step). Add --cuda_graph and/or --torch_compile, or "
                         "remove it")
    elif (getattr(args, "torch_compile", False) and args.gradient_checkpointing
          and not (args.cpu_offload_checkpointing or args.unsloth_offload_checkpointing)):
        notes.append("--selective_checkpointing would make these compiled, checkpointed steps faster: blocks "
                     "keep their attention and MLP down-projection outputs instead of recomputing them (FLUX.1-dev "
                     "on an H200 with --cuda_graph: 0.45 instead of 0.51 s/step, about 3 GiB more reserved)")
    if (args.cpu_offload_checkpointing or args.unsloth_offload_checkpointing) and not args.gradient_checkpointing:
        args.gradient_checkpointing = True
        notes.append("offloaded checkpointing implies --gradient_checkpointing: enabled")
    if args.fp8_base and args.mixed_precision == "no":
        raise ConfigError("--fp8_base computes in the mixed-precision dtype: add --mixed_precision bf16 (or fp16)")
    return notes


# Room left on the GPU beyond the model files when they are all loaded straight to it: the
# caching passes (VAE encode, text encoders) and the allocator's slack.
LOAD_TO_GPU_RESERVE_BYTES = 6 * 2**30


def load_device(args, device: torch.device, files: Sequence[str | os.PathLike | None] = ()) -> torch.device | str:
    """Where a family's load_models puts the models.

    - --lowram: the GPU (as sd-scripts: spare the host's memory);
    - straight to the GPU also when every model file (`files`; one named twice counts once) fits
      in what the GPU has free, with LOAD_TO_GPU_RESERVE_BYTES to spare, and no --blocks_to_swap
      asks for weights in CPU memory: the files are read into GPU memory through pinned buffers,
      skipping a CPU copy of every weight and the move afterwards (most of the launch time of a
      12B model);
    - else the CPU; the models are moved when needed."""
    if args.lowram:
        return device
    device = torch.device(device)
    if device.type != "cuda" or args.blocks_to_swap not in (None, 0):
        return "cpu"
    files = list(dict.fromkeys(os.path.realpath(f) for f in files if f is not None))   # a file named twice counts once
    if not files or not all(os.path.isfile(f) for f in files):   # a folder (diffusers layout): not sized here
        return "cpu"
    need = sum(os.path.getsize(f) for f in files)
    if need + LOAD_TO_GPU_RESERVE_BYTES <= cuda_allocatable_bytes(device):
        # the index made explicit: loader threads have no current device of their own
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    return "cpu"


def release_module(module: nn.Module, why: str) -> None:
    """Drop a module's weights (wherever they are) for good: they become meta tensors, and
    running the module afterwards raises an error that says why it was released."""
    name = type(module).__name__

    def refuse(*_):
        raise RuntimeError(f"{name} was released after caching ({why}) and cannot run again; this is a bug: "
                           "please report it (--highvram keeps every model as a workaround).")

    module.to("meta")
    module.register_forward_pre_hook(refuse)
    module._released_because = why
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def place(module: nn.Module, device) -> nn.Module:
    """module.to(device), except for a released module (release_module): it stays released."""
    return module if hasattr(module, "_released_because") else module.to(device)


def offloads_checkpoints(args) -> bool:
    return bool(args.cpu_offload_checkpointing or args.unsloth_offload_checkpointing)


def _require_blocks(lists: Sequence[nn.ModuleList], option: str, model_name: str) -> None:
    if not lists:
        raise ConfigError(f"{option} is not supported for {model_name}: it works on transformer block lists, "
                          "which this model does not declare. Remove it.")


# How fp8 layers multiply while training. Measured on an H200 (full-size FLUX.1-dev LoRA step,
# docs/benchmarks.md): upcasting the weight per layer (1.006 s) beat the scaled fp8 matmul with
# per-token activation quantisation ("auto", 1.092 s); bf16 weights take 0.858 s.
FP8_TRAINING_MATMUL = "upcast"


def quantize_base(model: nn.Module, lists: Sequence[nn.ModuleList], device: torch.device,
                  compute_dtype: torch.dtype, *, model_name: str, keep_on_device: bool,
                  matmul: str = FP8_TRAINING_MATMUL) -> Fp8Report:
    """fp8 for the block Linears, converted one block at a time on `device` (fast, and the model
    is never on the GPU in bf16 all at once); blocks return to the CPU unless `keep_on_device`
    (block swap places them afterwards)."""
    _require_blocks(lists, "--fp8_base", model_name)
    totals = [0, 0, 0, 0]
    for blocks in lists:
        for block in blocks:
            home = next(block.parameters()).device
            block.to(device)
            report = quantize_linears_(block, [block], compute_dtype=compute_dtype, matmul=matmul)
            if not keep_on_device:
                block.to(home)
            for i, v in enumerate((report.quantized, report.kept, report.bytes_before, report.bytes_after)):
                totals[i] += v
    # Linears outside the blocks keep (or, from an fp8 file, get) the compute dtype.
    rest = quantize_linears_(model, [], compute_dtype=compute_dtype)
    return Fp8Report(totals[0], totals[1] + rest.kept, totals[2] + rest.bytes_before, totals[3] + rest.bytes_after)


@dataclass
class Placement:
    swap: BlockSwap | None
    blocks_to_swap: int
    message: str | None


def place_denoiser(model: nn.Module, lists: Sequence[nn.ModuleList], device: torch.device, blocks_to_swap,
                   *, model_name: str, auto_fixed_bytes: Callable[[], int] | None = None,
                   auto_activation_bytes: Callable[[], int | None] | None = None) -> Placement:
    """Move the denoiser to `device`, with block swap when asked. For 'auto', the free memory is
    read now (call this when everything else that stays on the GPU is already there)."""
    if blocks_to_swap in (None, 0):
        model.to(device)
        return Placement(None, 0, None)
    _require_blocks(lists, "--blocks_to_swap", model_name)
    depths = [len(b) for b in lists]
    message = None
    if blocks_to_swap == "auto":
        activation = auto_activation_bytes() if auto_activation_bytes is not None else None
        if activation is None:
            raise ConfigError(f"--blocks_to_swap auto is not available for {model_name} yet (no activation "
                              "estimate); give a number instead.")
        choice = choose_blocks_to_swap(free_bytes=cuda_allocatable_bytes(device),
                                       lists=[SwapList(d, swappable_bytes(b)) for d, b in zip(depths, lists)],
                                       fixed_bytes=auto_fixed_bytes() if auto_fixed_bytes else 0,
                                       activation_bytes=activation)
        blocks_to_swap, message = choice.blocks_to_swap, choice.reason
    split = check_blocks_to_swap(int(blocks_to_swap), depths, model_name)
    if sum(split) == 0:
        model.to(device)
        return Placement(None, 0, message)
    swap = BlockSwap(device, list(zip(lists, split)))
    swap.prepare(model)
    note = (f"block swap: {blocks_to_swap} ({', '.join(f'{n} of {d}' for n, d in zip(split, depths))} blocks per "
            f"list) in {swap.pinned_bytes() / GiB:.2f} GiB of {'pinned ' if device.type == 'cuda' else ''}CPU memory")
    return Placement(swap, int(blocks_to_swap), f"{message}\n{note}" if message else note)


def cuda_allocatable_bytes(device: torch.device) -> int:
    """What this process may still allocate on the GPU: the driver's free memory plus what
    PyTorch's allocator holds unused, and no more than a per-process memory fraction allows
    (torch.cuda.set_per_process_memory_fraction, which the driver's figure does not show)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    allocated = torch.cuda.memory_allocated(index)
    available = free + torch.cuda.memory_reserved(index) - allocated
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)   # torch >= 2.9
    fraction = get_fraction(index) if get_fraction is not None else 1.0
    if fraction < 1.0:
        available = min(available, int(fraction * total) - allocated)
    return max(available, 0)


def bytes_outside_blocks(model: nn.Module, lists: Sequence[nn.ModuleList], trainable: Sequence[torch.Tensor]) -> int:
    """What stays on the GPU whatever the swap: weights outside the blocks, the blocks' vectors
    (biases, norms), and the trained parameters with their gradients and two Adam states."""
    block_ids = {id(t) for b in lists for t in b.parameters()}
    outside = sum(t.numel() * t.element_size() for t in model.parameters() if id(t) not in block_ids)
    vectors = sum(t.numel() * t.element_size() for b in lists for t in b.parameters() if t.ndim < 2)
    lora = sum(p.numel() * 4 for p in trainable) * 4   # fp32 weights, grads, exp_avg, exp_avg_sq
    return outside + vectors + lora


def largest_batch_pixels(group) -> tuple[int, int, int]:
    """(batch size, height, width) of the most demanding batch the datasets can form."""
    best = (0, 0, 0)
    for ds in group.datasets:
        for (w, h) in ds.bucket_slots:
            if ds.batch_size * w * h > best[0] * best[1] * best[2]:
                best = (ds.batch_size, h, w)
    return best
