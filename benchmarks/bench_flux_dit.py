"""Time forward + backward of the FLUX.1 / Chroma DiT with random weights; print JSON.

Full size on a GPU (builds the 12B model directly on the device, nothing is downloaded):

    python benchmarks/bench_flux_dit.py --device cuda --dtype bf16 --size 1024 --steps 10 --grad_ckpt

CPU smoke check with a tiny config:

    python benchmarks/bench_flux_dit.py --device cpu --tiny --size 256 --steps 2 --warmup 1

By default the base weights are frozen and the packed latents require grad, so backward runs
through every block computing activation gradients only: the cost of LoRA training without the
LoRA matmuls. `--train_base` makes every weight trainable (full fine-tune memory).
See docs/benchmarks_flux_model.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from library.attention import BACKENDS, set_attention_backend  # noqa: E402
from library.flux.model import VARIANTS  # noqa: E402
from library.flux.sampling import prepare_img_ids, prepare_txt_ids  # noqa: E402
from library.tiny.flux import build_flux_model, tiny_flux_params  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights and activations")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="dev")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (latent tokens = (size/16)^2)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--txt_len", type=int, default=512, help="T5 tokens (512 dev/Chroma, 256 schnell)")
    p.add_argument("--t5_mask_tokens", type=int, default=0,
                   help="if > 0, pass a T5 mask: sample i has this many + 16*i real tokens (the models drop "
                        "unattended text; a batch of one then runs unmasked, larger batches keep a mask)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, cuDNN autotune)")
    p.add_argument("--grad_ckpt", action="store_true", help="per-block gradient checkpointing")
    p.add_argument("--train_base", action="store_true", help="make every base weight trainable")
    p.add_argument("--attention", choices=BACKENDS, default="sdpa")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--tiny", action="store_true", help="tiny config (CPU check of this script)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    set_attention_backend(args.attention)
    variant = VARIANTS[args.variant]
    params = tiny_flux_params(args.variant) if args.tiny else variant.params
    if args.size % 16:
        raise SystemExit("--size must be a multiple of 16")

    t_build = time.perf_counter()
    model = build_flux_model(params, device=device, dtype=dtype, chroma=variant.is_chroma, seed=args.seed)
    model.train().requires_grad_(args.train_base)
    if args.grad_ckpt:
        model.enable_gradient_checkpointing()
    if args.compile:
        for blocks in (model.double_blocks, model.single_blocks):
            for i, block in enumerate(blocks):
                blocks[i] = torch.compile(block)
    synchronize(device)
    build_s = time.perf_counter() - t_build
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    g = torch.Generator(device=device).manual_seed(args.seed)
    b, side = args.batch_size, args.size // 16
    img = torch.randn(b, side * side, params.in_channels, device=device, dtype=dtype, generator=g)
    inputs = dict(
        img_ids=prepare_img_ids(b, side, side, device=device),
        txt=torch.randn(b, args.txt_len, params.context_in_dim, device=device, dtype=dtype, generator=g),
        txt_ids=prepare_txt_ids(b, args.txt_len, device=device),
        timesteps=torch.rand(b, device=device, generator=g).to(dtype),
        y=torch.randn(b, params.vec_in_dim, device=device, dtype=dtype, generator=g),
        guidance=torch.full((b,), 3.5, device=device, dtype=dtype) if params.guidance_embed else None,
    )
    if args.t5_mask_tokens > 0:
        lengths = torch.tensor([min(args.t5_mask_tokens + 16 * i, args.txt_len) for i in range(b)], device=device)
        mask = (torch.arange(args.txt_len, device=device)[None] < lengths[:, None]).long()
        inputs["txt_attention_mask"] = mask

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.steps):
        x = img.detach().requires_grad_(True)
        synchronize(device)
        t0 = time.perf_counter()
        out = model(x, **inputs)
        loss = out.float().square().mean()
        loss.backward()
        synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)

    gib = 1024**3
    result = {
        "variant": args.variant, "tiny": args.tiny, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "dtype": args.dtype, "size": args.size, "batch_size": b,
        "image_tokens": side * side, "txt_len": args.txt_len, "t5_mask_tokens": args.t5_mask_tokens,
        "grad_ckpt": args.grad_ckpt, "train_base": args.train_base, "attention": args.attention,
        "compile": args.compile, "params_billion": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "model_gib": round(model_bytes / gib, 3), "build_s": round(build_s, 2), "steps": args.steps,
        "median_step_s": round(statistics.median(times), 4), "mean_step_s": round(statistics.fmean(times), 4),
        "min_step_s": round(min(times), 4), "step_times_s": [round(t, 4) for t in times],
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / gib, 3) if device.type == "cuda" else None,
        "loss_finite": bool(torch.isfinite(loss).item()),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
