"""Block swap and fp8 base weights on the full-size FLUX.1-dev DiT (random weights): step time
and peak memory of a LoRA step per configuration, and `--blocks_to_swap auto` under a memory cap.

    python benchmarks/bench_offload.py --configs bf16:0,bf16:18,fp8-upcast:0,fp8-auto:0,fp8-auto:18 --caps 24,16
    python benchmarks/bench_offload.py --tiny --device cpu --configs bf16:0,bf16:2,fp8-upcast:2 --steps 2

Setting: 1024x1024 (4096 image tokens), 512 T5 tokens, batch 1, LoRA rank 16 on every block
Linear, per-block gradient checkpointing, AdamW on the LoRA; the step is forward + MSE loss +
backward + optimizer step. A configuration is `<weights>:<blocks_to_swap>` with weights bf16,
fp8-upcast (fp8 storage, upcast per layer), fp8-auto (scaled fp8 matmul where it pays) or
fp8-autofast (the same with Hopper's fast fp8 accumulation, library.fp8.SCALED_MM_FAST_ACCUM).
One JSON line per configuration; configurations run in the given order on one model (bf16
ones first: fp8 conversion is one-way).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.flux.model import VARIANTS  # noqa: E402
from library.flux.sampling import prepare_img_ids, prepare_txt_ids  # noqa: E402
import library.fp8 as fp8_lib  # noqa: E402
from library.fp8 import is_fp8_linear, quantize_linears_  # noqa: E402
from library.offload import (  # noqa: E402
    GiB,
    BlockSwap,
    SwapList,
    blocks_per_list,
    choose_blocks_to_swap,
    estimate_activation_bytes,
    swappable_bytes,
)
from library.tiny.flux import build_flux_model, tiny_flux_params  # noqa: E402
from networks import lora_flux  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--t5_len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--configs", default="bf16:0,bf16:18,fp8-upcast:0,fp8-auto:0")
    ap.add_argument("--caps", default="", help="GiB caps for the auto test (e.g. 24,16), CUDA only")
    a = ap.parse_args()

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16 if cuda else torch.float32
    params = replace(tiny_flux_params("dev"), depth=4, depth_single_blocks=6) if a.tiny else VARIANTS["dev"].params
    t0 = time.perf_counter()
    model = build_flux_model(params, device=device, dtype=dtype).requires_grad_(False)
    model.enable_gradient_checkpointing()
    net = lora_flux.create_network(1.0, a.rank, a.rank, None, [None, None], model)
    net.apply_to(apply_text_encoder=False, apply_unet=True)
    net.to(device)
    opt = torch.optim.AdamW(net.get_trainable_params(), lr=1e-4)
    info = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "build_s": round(time.perf_counter() - t0, 1), "size": a.size, "t5_len": a.t5_len, "rank": a.rank}
    print(json.dumps(info), flush=True)

    h = a.size // 16
    g = torch.Generator().manual_seed(0)
    x = dict(img=torch.randn(1, h * h, 64, generator=g),
             txt=torch.randn(1, a.t5_len, params.context_in_dim, generator=g), y=torch.randn(1, params.vec_in_dim, generator=g), timesteps=torch.rand(1, generator=g),
             guidance=torch.ones(1))
    x = {k: v.to(device, dtype) for k, v in x.items()}
    x.update(img_ids=prepare_img_ids(1, h, h).to(device), txt_ids=prepare_txt_ids(1, a.t5_len).to(device))
    target = torch.randn(1, h * h, 64, generator=g).to(device)
    depths = (params.depth, params.depth_single_blocks)
    lists = [model.double_blocks, model.single_blocks]

    def step():
        out = model(**x)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def measure(n_steps: int) -> dict:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(a.warmup + n_steps):
            sync()
            t = time.perf_counter()
            step()
            sync()
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
        return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
                "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / GiB, 2) if cuda else None,
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 2) if cuda else None}

    def with_swap(n: int, fn):
        swap = None
        if n:
            t = time.perf_counter()
            swap = BlockSwap(device, list(zip(lists, blocks_per_list(n, depths))))
            swap.prepare(model)
            prep = time.perf_counter() - t
        try:
            result = fn()
        finally:
            if swap is not None:
                stats = swap.stats
                result_extra = {"prepare_s": round(prep, 1), "pinned_gib": round(swap.pinned_bytes() / GiB, 1),
                                "fallback_loads": stats.fallback_loads}
                swap.remove()
                model.to(device)
        return result | (result_extra if swap is not None else {})

    fp8_mode = None
    for cfg in [c for c in a.configs.split(",") if c]:
        weights, n = cfg.split(":")
        n = int(n)
        if weights.startswith("fp8"):
            mode = weights.split("-", 1)[1]
            fp8_lib.SCALED_MM_FAST_ACCUM = mode == "autofast"
            mode = "auto" if mode == "autofast" else mode
            if fp8_mode is None:
                net.restore()
                t = time.perf_counter()
                report = quantize_linears_(model, lists, compute_dtype=dtype, matmul=mode)
                net.reapply()
                print(json.dumps({"fp8": str(report), "quantize_s": round(time.perf_counter() - t, 1)}), flush=True)
            for m in model.modules():
                if is_fp8_linear(m):
                    m._fp8_matmul = mode
            fp8_mode = mode
        elif fp8_mode is not None:
            raise SystemExit("put bf16 configurations before fp8 ones")
        try:
            result = with_swap(n, lambda: measure(a.steps))
        except torch.OutOfMemoryError as e:
            result = {"error": f"OOM: {str(e).splitlines()[0]}"}
        print(json.dumps({"config": cfg, "blocks_to_swap": n, "weights": weights} | result), flush=True)

    if cuda and a.caps:
        # --blocks_to_swap auto under a cap that emulates a smaller card.
        total = torch.cuda.get_device_properties(device).total_memory
        swap_lists = [SwapList(d, swappable_bytes(b)) for d, b in zip(depths, lists)]
        block_ids = {id(t) for b in lists for t in b.parameters()}
        fixed = sum(t.numel() * t.element_size() for t in model.parameters() if id(t) not in block_ids)
        fixed += sum(t.numel() * t.element_size() for b in lists for t in b.parameters() if t.ndim < 2)
        fixed += 4 * sum(p.numel() * 4 for p in net.get_trainable_params())   # weights, grads, 2 Adam states
        act = estimate_activation_bytes(batch=1, tokens=h * h + a.t5_len, hidden=params.hidden_size,
                                        mlp_hidden=params.mlp_hidden_dim, num_blocks=sum(depths))
        for cap in [float(c) for c in a.caps.split(",")]:
            choice = choose_blocks_to_swap(free_bytes=int(cap * GiB), lists=swap_lists, fixed_bytes=fixed,
                                           activation_bytes=act)
            print(json.dumps({"cap_gib": cap, "auto": choice.blocks_to_swap, "reason": choice.reason}), flush=True)
            for n in sorted({choice.blocks_to_swap, max(choice.blocks_to_swap - 2, 0)}):
                def capped():
                    torch.cuda.empty_cache()
                    torch.cuda.set_per_process_memory_fraction(cap * GiB / total, device)
                    try:
                        return measure(3)
                    except torch.OutOfMemoryError as e:
                        return {"error": f"OOM: {str(e).splitlines()[0][:160]}"}
                    finally:
                        torch.cuda.set_per_process_memory_fraction(1.0, device)
                        opt.zero_grad(set_to_none=True)
                result = with_swap(n, capped)
                print(json.dumps({"cap_gib": cap, "blocks_to_swap": n} | result), flush=True)


if __name__ == "__main__":
    main()
