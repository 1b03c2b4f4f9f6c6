"""What the bench_<family>_train.py scripts share: the LoRA training step on cached inputs, its
timing, and the figures of the JSON line (median/p90 step time, peak memory, MFU).

Each script builds its family's model, trainer arguments and synthetic cached inputs; the step
and the figures come from here, so that the families' numbers are measured the same way.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping

import torch
from torch import nn

from library.training.losses import compute_per_sample_loss
from library.training import memory
from library.training.optimizers import build_optimizer
from library.training.step_graphs import StepGraphs
from library.training.trainer import compile_blocks

# The TARGETS.md setting's learning rate, for every LoRA parameter.
LEARNING_RATE = 1e-4
# Steps left out of the median/p90 when there are enough: the first ones pay for the allocator's
# growth, cuDNN/SDPA autotuning and torch.compile.
WARMUP_STEPS = 5


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else "cpu"


def billions_of_parameters(model: nn.Module) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e9, 3)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def lora_optimizer(network: Any, name: str, *, capturable: bool = False) -> torch.optim.Optimizer:
    """The optimizer `name` over the network's parameter groups at LEARNING_RATE, built by the
    trainer's optimizer builder; `capturable` (for a CUDA graph) keeps its step counts on the GPU."""
    groups, _ = network.prepare_optimizer_params(text_encoder_lr=None, unet_lr=None, default_lr=LEARNING_RATE)
    return build_optimizer(name, ["capturable=True"] if capturable else [], groups, LEARNING_RATE).optimizer


def ready_to_train(network: Any, trainer: Any, models: Any, device: torch.device, *, optimizer: str,
                   compile: bool, capturable: bool = False) -> torch.optim.Optimizer:
    """After `apply_to`: the LoRA moved to the device, the blocks compiled as --torch_compile does
    (each block with inductor) when `compile`, and the optimizer (lora_optimizer)."""
    network.to(device)
    if compile:
        compile_blocks(trainer.block_lists(models), "inductor")
    return lora_optimizer(network, optimizer, capturable=capturable)


def add_memory_arguments(ap: Any) -> None:
    ap.add_argument("--blocks_to_swap", type=memory.parse_blocks_to_swap, default=0,
                    help="block swap (N or auto), as the trainer places the denoiser")
    ap.add_argument("--fp8_base", action="store_true", help="fp8 block weights, as the trainer converts them")
    ap.add_argument("--selective_checkpointing", action="store_true",
                    help="checkpointed blocks keep attention and MLP down-projection outputs (the trainer's option)")


def fp8_base(a: Any, trainer: Any, models: Any, device: torch.device, dtype: torch.dtype) -> str | None:
    """--fp8_base: the trainer's own conversion of the block Linears (before the LoRA wraps them);
    FLUX's benchmark also picks the matmul mode (--fp8_matmul)."""
    if not a.fp8_base:
        return None
    mode = {"matmul": a.fp8_matmul} if getattr(a, "fp8_matmul", None) else {}
    return str(memory.quantize_base(models.denoiser, trainer.block_lists(models), device, dtype,
                                    model_name=trainer.model_name(models), keep_on_device=True, **mode))


def place_with_swap(a: Any, trainer: Any, args: Any, models: Any, network: Any, device: torch.device, *,
                    batch: int, size: int, memory_cap_gib: float | None = None) -> memory.Placement:
    """The denoiser placed by the trainer's own code, with --blocks_to_swap N|auto (after the LoRA
    is built). As in a run, the denoiser arrives from the CPU when 'auto' reads the free memory
    or a smaller card is emulated (`memory_cap_gib`: this process's CUDA memory capped first)."""
    if a.blocks_to_swap == "auto" or memory_cap_gib:
        models.denoiser.to("cpu")   # the LoRA is not part of the denoiser's modules: it stays where it is
        torch.cuda.empty_cache()
    if memory_cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(memory_cap_gib * 2**30 / total, index)
    lists = trainer.block_lists(models)
    args.gradient_checkpointing = not a.no_grad_ckpt
    args.selective_checkpointing = a.selective_checkpointing   # counted by auto's activation estimate
    placement = memory.place_denoiser(
        models.denoiser, lists, device, a.blocks_to_swap, model_name=trainer.model_name(models),
        auto_fixed_bytes=lambda: memory.bytes_outside_blocks(models.denoiser, lists, network.get_trainable_params()),
        auto_activation_bytes=lambda: trainer.activation_bytes_estimate(args, models, batch, size, size))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return placement


def placement_fields(placement: memory.Placement) -> dict[str, Any]:
    """The JSON line's swap fields: the N used, the swap's message, blocks it failed to prefetch."""
    return {"blocks_to_swap": placement.blocks_to_swap, "swap": placement.message,
            "fallback_loads": placement.swap.stats.fallback_loads if placement.swap else None}


def add_cuda_graph_argument(ap: Any) -> None:
    ap.add_argument("--cuda_graph", action="store_true",
                    help="capture the whole training step (forward, backward, clipping, optimizer) as one CUDA "
                         "graph and time its replays: what the step costs without per-kernel host work")


def graphed(step: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
    """`step` run through the trainer's --cuda_graph machinery (library/training/step_graphs.py):
    eager twice (the second time with CUDA's synchronisation check), then recorded and replayed.
    A step that cannot be recorded fails here, with the reason, rather than timing eager steps."""
    graphs = StepGraphs(lambda _inputs, _key: step(), device)

    def run() -> torch.Tensor:
        loss = graphs({})
        if graphs.disabled_because is not None:
            raise RuntimeError(f"--cuda_graph turned itself off: {graphs.disabled_because}")
        return loss

    for _ in range(3):   # eager, checked, recorded
        run()
    return run


def lora_training_step(trainer: Any, args: Any, models: Any, network: Any, optimizer: torch.optim.Optimizer,
                       latents: torch.Tensor, text: Mapping[str, torch.Tensor] | Callable[[], Any], *,
                       dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """One training step along the trainer's own code path, on fixed cached latents: noise and
    timesteps, the family's forward (bf16 autocast when `dtype` is bf16), the shared loss,
    backward, gradient clipping at 1.0, the optimizer step. `text` is the cached text outputs, or
    a function returning the conditioning, called under autocast (text-encoder LoRA encodes live).
    The step returns the detached loss."""
    device = latents.device
    loss_weights = torch.ones(latents.shape[0], device=device)

    def step() -> torch.Tensor:
        noisy = trainer.noisy_input(args, latents, torch.randn_like(latents))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            pred = trainer.denoise(args, models, noisy, text() if callable(text) else text)
        p, w = trainer.loss_terms(args, pred.float(), noisy)
        loss = compute_per_sample_loss(trainer._loss_config, p, noisy.target.float(), timesteps=noisy.timesteps,
                                       sigmas=noisy.sigmas, weighting=w, mask=None, loss_weights=loss_weights).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_steps(step: Callable[[], Any], steps: int, device: torch.device) -> tuple[list[float], Any]:
    """Run `step` `steps` times: the wall time of each (the device synchronised before and after,
    so a step's time is its work, not its launch) and the last step's result. The CUDA peak
    memory counter starts here, so peak_alloc_gib covers the timed steps."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, result = [], None
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        result = step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times, result


def profile_steps(step: Callable[[], Any], device: torch.device, *, steps: int = 2,
                  table_path: str | None = None) -> dict[str, Any]:
    """Run `step` `steps` times under torch.profiler: per step the wall time, the GPU's busy time
    (union of kernel intervals), the summed kernel time by kind (matmul, attention, copy/cast,
    other) and the number of kernel launches; the top ops by GPU and by CPU time go to
    `table_path` (or stderr). A busy fraction well under 1 means the host sets the pace."""
    import sys

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        wall = (time.perf_counter() - start) / steps
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    by_kind: dict[str, float] = {}
    intervals = []
    for e in kernels:
        name = e.name.lower()
        kind = ("attention" if any(k in name for k in ("flash", "fmha", "cudnn", "attention", "sdpa")) else
                "matmul" if any(k in name for k in ("gemm", "nvjet", "cutlass", "xmma", "matmul", "sm90")) else
                "copy/cast" if any(k in name for k in ("copy", "memcpy", "cast", "convert", "to_copy")) else "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + e.time_range.elapsed_us() / 1e6 / steps
        intervals.append((e.time_range.start, e.time_range.end))
    busy, end = 0.0, float("-inf")
    for s, t in sorted(intervals):
        if t > end:
            busy += (t - max(s, end))
            end = t
    busy_s = busy / 1e6 / steps
    sort_gpu = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables = (prof.key_averages().table(sort_by=sort_gpu, row_limit=30) + "\n" +
              prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    if table_path:
        with open(table_path, "w") as f:
            f.write(tables)
    else:
        print(tables, file=sys.stderr)
    return {"profiled_wall_s": round(wall, 4), "gpu_busy_s": round(busy_s, 4),
            "gpu_busy_fraction": round(busy_s / wall, 3) if wall else None,
            "kernel_s_by_kind": {k: round(v, 4) for k, v in sorted(by_kind.items())},
            "kernels_per_step": len(kernels) // steps}


def timing_fields(times: list[float], device: torch.device, *, build_s: float, flops_per_step: float,
                  peak_tflops: float, tflop_digits: int = 2) -> dict[str, Any]:
    """The JSON line's shared figures: build time, median and p90 step time (after the warm-up
    steps when there are more than WARMUP_STEPS + 1), useful TFLOP per step, and on CUDA the MFU
    against `peak_tflops` and the peak allocated memory."""
    measured = times[WARMUP_STEPS:] if len(times) > WARMUP_STEPS + 1 else times
    median = statistics.median(measured)
    p90 = sorted(measured)[int(0.9 * (len(measured) - 1))]
    cuda = device.type == "cuda"
    return {
        "build_s": round(build_s, 2), "median_s": round(median, 4), "p90_s": round(p90, 4), "steps": len(times),
        "useful_tflop_per_step": round(flops_per_step / 1e12, tflop_digits),
        "mfu": round(flops_per_step / median / (peak_tflops * 1e12), 3) if cuda else None,
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        # what the caching allocator held at most: what a smaller card must have (fragmentation
        # and, with --cuda_graph, the recording's pool beside the eager steps' blocks)
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "torch": torch.__version__,
    }
