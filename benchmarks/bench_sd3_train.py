"""Benchmark an SD3 LoRA training step at full size with random weights (TARGETS.md setting).

    python benchmarks/bench_sd3_train.py --device cuda --steps 40          # SD3.5 Large, 1024x1024
    python benchmarks/bench_sd3_train.py --variant 5-medium                # SD3.5 Medium
    python benchmarks/bench_sd3_train.py --tiny --device cpu --steps 3     # quick check on CPU

The step (benchmarks/bench_common.py) is the trainer's own code (SD3NetworkTrainer.noisy_input /
denoise / loss_terms, the shared loss, LoRA from networks.lora_sd3, the optimizer builder), fed
with synthetic cached latents and text outputs, i.e. what
`--cache_latents --cache_text_encoder_outputs` gives the loop. Prints one JSON line: median/p90
step time over steps 6.., peak memory, and model FLOPs utilisation as TARGETS.md defines it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_common import (add_cuda_graph_argument, add_memory_arguments, fp8_base, graphed, place_with_swap, placement_fields, billions_of_parameters, device_name, lora_training_step,  # noqa: E402
                                     ready_to_train, time_steps, timing_fields)
from library.sd3.model import VARIANTS  # noqa: E402
from library.sd3.text import CLIP_MAX_LENGTH  # noqa: E402
from library.tiny.sd3 import build_mmdit, tiny_sd3_params  # noqa: E402
from library.training.trainer import FamilyModels  # noqa: E402
from networks import lora_sd3  # noqa: E402
from sd3_train_network import SD3NetworkTrainer  # noqa: E402


def useful_flops(params, img_tokens: int, txt_tokens: int) -> float:
    """2F (TARGETS.md): F = sum over joint blocks of 2 x token-wise linear params x their tokens
    + 4 L^2 d for the joint attention (L = image + text tokens), plus x_block attn2 on SD3.5 M.
    Each stream has its own weights: qkv 3h^2, proj h^2, mlp 2 x h x mlp; the last block's
    context stream is pre-only (qkv alone). Modulation runs once per sample and does not count."""
    h, mlp = params.hidden_size, params.mlp_hidden_dim
    stream = 3 * h * h + h * h + 2 * h * mlp
    L = img_tokens + txt_tokens
    forward = 0.0
    for i in range(params.depth):
        context = 3 * h * h if i == params.depth - 1 else stream
        forward += 2 * (stream * img_tokens + context * txt_tokens) + 4 * L * L * h
        if i in params.x_block_self_attn_layers:
            forward += 2 * 4 * h * h * img_tokens + 4 * img_tokens * img_tokens * h
    return 2 * forward


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model (with --device cpu: a quick check)")
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="5-large")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--t5_len", type=int, default=256, help="--t5xxl_max_token_length (SD3 default 256)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--no_grad_ckpt", action="store_true")
    ap.add_argument("--peak_tflops", type=float, default=790.0, help="measured bf16 matmul peak of the GPU")
    ap.add_argument("--optimizer", default="AdamW")
    ap.add_argument("--weighting_scheme", default="uniform")
    ap.add_argument("--compile", action="store_true", help="--torch_compile: compile each block")
    add_cuda_graph_argument(ap)
    add_memory_arguments(ap)
    a = ap.parse_args()

    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    params = tiny_sd3_params(a.variant) if a.tiny else VARIANTS[a.variant].params
    if a.tiny:
        a.size = min(a.size, params.pos_embed_max_size * 16)
    t0 = time.perf_counter()
    mmdit = build_mmdit(params, device=device, dtype=dtype)
    mmdit.requires_grad_(False)
    build_s = time.perf_counter() - t0
    if not a.no_grad_ckpt:
        mmdit.enable_gradient_checkpointing(selective=a.selective_checkpointing)

    trainer = SD3NetworkTrainer()
    args = trainer.build_parser().parse_args([
        "--weighting_scheme", a.weighting_scheme, "--t5xxl_max_token_length", str(a.t5_len),
        "--mixed_precision", "bf16" if dtype == torch.bfloat16 else "no"])
    trainer._loss_config = trainer.loss_config(args)
    info = type("Info", (), {"params": params, "variant": VARIANTS[a.variant]})()
    models = FamilyModels(denoiser=mmdit, text_encoders=[None, None, None], vae=None, info=info)

    fp8 = fp8_base(a, trainer, models, device, dtype)   # before the LoRA wraps the layers
    network = lora_sd3.create_network(1.0, a.rank, a.rank, None, None, mmdit)
    network.apply_to(apply_text_encoder=False, apply_unet=True)
    placed = placement_fields(place_with_swap(a, trainer, args, models, network, device, batch=a.batch, size=a.size))
    opt = ready_to_train(network, trainer, models, device, optimizer=a.optimizer, compile=a.compile,
                         capturable=a.cuda_graph)

    b, lat_hw = a.batch, a.size // 8
    latents = torch.randn(b, params.in_channels, lat_hw, lat_hw, device=device)
    # cached text outputs: CLIP-L + CLIP-G states (77 tokens), T5 states, pooled vectors, masks
    text = {"lg_out": torch.randn(b, CLIP_MAX_LENGTH, params.adm_in_channels, device=device),
            "t5_out": torch.randn(b, a.t5_len, params.context_in_features, device=device),
            "lg_pooled": torch.randn(b, params.adm_in_channels, device=device),
            "clip_l_attn_mask": torch.ones(b, CLIP_MAX_LENGTH, dtype=torch.long, device=device),
            "clip_g_attn_mask": torch.ones(b, CLIP_MAX_LENGTH, dtype=torch.long, device=device),
            "t5_attn_mask": torch.ones(b, a.t5_len, dtype=torch.long, device=device)}

    step = lora_training_step(trainer, args, models, network, opt, latents, text, dtype=dtype)
    if a.cuda_graph:
        step = graphed(step, device)
    times, last_loss = time_steps(step, a.steps, device)
    img_tokens = (lat_hw // params.patch_size) ** 2
    flops = useful_flops(params, img_tokens, CLIP_MAX_LENGTH + a.t5_len) * b
    out = {
        "model": ("tiny-" if a.tiny else "") + VARIANTS[a.variant].label.replace(" ", "-").lower(),
        "device": device_name(device),
        "size": a.size, "batch": b, "t5_len": a.t5_len, "rank": a.rank, "grad_ckpt": not a.no_grad_ckpt,
        "compile": a.compile, "cuda_graph": a.cuda_graph, "selective_ckpt": a.selective_checkpointing, **placed, "fp8": fp8, "weighting_scheme": a.weighting_scheme, "dit_params_b": billions_of_parameters(mmdit),
        "lora_modules": len(network.loras), "last_loss": round(float(last_loss), 4),
        **timing_fields(times, device, build_s=build_s, flops_per_step=flops, peak_tflops=a.peak_tflops),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
