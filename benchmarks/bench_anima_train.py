"""Benchmark an Anima LoRA training step at full size with random weights (TARGETS.md setting).

    python benchmarks/bench_anima_train.py --device cuda --steps 40             # 28 blocks, 1024x1024
    python benchmarks/bench_anima_train.py --device cuda --compile               # + --torch_compile per block
    python benchmarks/bench_anima_train.py --device cuda --train_llm_adapter     # + LoRA on the LLM adapter
    python benchmarks/bench_anima_train.py --tiny --device cpu --steps 3         # quick check on CPU

The step is the trainer's own code (AnimaNetworkTrainer.noisy_input / denoise / loss_terms, the shared
loss, LoRA from networks.lora_anima with the default targets, the optimizer builder), fed with synthetic
cached latents and text outputs, i.e. what `--cache_latents --cache_text_encoder_outputs` gives the loop:
Qwen3 hidden states (512 tokens) and T5 ids (512) go into the DiT, whose LLM adapter runs every step as in
training. Setting of TARGETS.md: rank 16 (alpha 16), unet only, AdamW lr 1e-4, bf16, gradient
checkpointing, batch 1, --timestep_sampling sigmoid. Prints one JSON line: median/p90 step time over steps
6.., peak memory, and model FLOPs utilisation.

Useful FLOPs (TARGETS.md): F = sum over the DiT blocks of 2 x (token-wise linear parameters) x (their
tokens) + attention 4 x Lq x Lk x d; a LoRA step's useful work is 2F (forward + activation gradients).
Self-attention, cross-attention q/output and the MLP run on the image tokens; cross-attention k/v on the
512 context tokens; AdaLN modulation runs once per sample and does not count. The frozen LLM adapter runs
forward only (no gradient flows into it), so it adds its forward FLOPs once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anima_train_network import AnimaNetworkTrainer  # noqa: E402
from benchmarks.bench_common import (add_cuda_graph_argument, add_memory_arguments, fp8_base, graphed, place_with_swap, placement_fields, billions_of_parameters, device_name, lora_training_step,  # noqa: E402
                                     ready_to_train, synchronize, time_steps, timing_fields)
from library.anima.arguments import apply_attention_options  # noqa: E402
from library.anima.model import ANIMA_PARAMS, AnimaParams  # noqa: E402
from library.tiny.anima import build_anima_model, tiny_anima_params  # noqa: E402
from library.training.trainer import FamilyModels  # noqa: E402
from networks import lora_anima  # noqa: E402


def useful_flops(p: AnimaParams, img_tokens: int, ctx_tokens: int, t5_tokens: int, qwen3_tokens: int) -> float:
    d = p.model_channels
    mlp = int(d * p.mlp_ratio)
    on_image = 4 * d * d + 2 * d * d + 2 * d * mlp            # self q/k/v/o, cross q/o, MLP
    on_context = 2 * d * p.crossattn_emb_channels              # cross k/v
    attention = 4 * img_tokens * img_tokens * d + 4 * img_tokens * ctx_tokens * d
    dit_forward = p.num_blocks * (2 * on_image * img_tokens + 2 * on_context * ctx_tokens + attention)
    a = p.llm_adapter
    adapter_forward = 0
    if a is not None:
        m = a.model_dim
        on_t5 = (4 * m * m if a.self_attention else 0) + 2 * m * m + 2 * m * a.mlp_hidden   # self, cross q/o, MLP
        on_qwen3 = 2 * a.source_dim * m                                                       # cross k/v
        attn = (4 * t5_tokens * t5_tokens * m if a.self_attention else 0) + 4 * t5_tokens * qwen3_tokens * m
        adapter_forward = a.num_layers * (2 * on_t5 * t5_tokens + 2 * on_qwen3 * qwen3_tokens + attn)
    return 2 * dit_forward + adapter_forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model instead of the full 28-block DiT")
    ap.add_argument("--num_blocks", type=int, default=28, help="DiT depth (Anima ships 20, 28 and 36)")
    ap.add_argument("--size", type=int, default=1024, help="square image size in pixels")
    ap.add_argument("--text_len", type=int, default=512, help="Qwen3 and T5 token length (the defaults: 512)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--no_grad_ckpt", action="store_true")
    ap.add_argument("--compile", action="store_true", help="--torch_compile: compile each block")
    ap.add_argument("--attn_mode", default="torch", choices=["torch", "flash", "xformers"])
    ap.add_argument("--split_attn", action="store_true")
    ap.add_argument("--train_llm_adapter", action="store_true", help="LoRA on the LLM adapter blocks too")
    ap.add_argument("--optimizer", default="AdamW")
    ap.add_argument("--peak_tflops", type=float, default=790.0, help="measured bf16 matmul peak of the GPU")
    add_cuda_graph_argument(ap)
    add_memory_arguments(ap)
    a = ap.parse_args()

    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    params = tiny_anima_params() if a.tiny else replace(ANIMA_PARAMS, num_blocks=a.num_blocks)
    t0 = time.perf_counter()
    dit = build_anima_model(params, device=device, dtype=dtype)
    dit.requires_grad_(False).eval()
    synchronize(device)
    build_s = time.perf_counter() - t0
    if not a.no_grad_ckpt:
        dit.enable_gradient_checkpointing(selective=a.selective_checkpointing)

    trainer = AnimaNetworkTrainer()
    args = trainer.build_parser().parse_args([
        "--timestep_sampling", "sigmoid", "--mixed_precision", "bf16" if dtype == torch.bfloat16 else "no",
        "--attn_mode", a.attn_mode, *(["--split_attn"] if a.split_attn else [])])
    trainer._loss_config = trainer.loss_config(args)
    apply_attention_options(args, dit)
    models = FamilyModels(denoiser=dit, text_encoders=[None], vae=None, info=None, extra={"compute_dtype": dtype})

    fp8 = fp8_base(a, trainer, models, device, dtype)   # before the LoRA wraps the layers
    network = lora_anima.create_network(1.0, a.rank, a.rank, None, None, dit,
                                        train_llm_adapter=str(a.train_llm_adapter))
    network.apply_to(None, dit, apply_text_encoder=False, apply_unet=True)
    placed = placement_fields(place_with_swap(a, trainer, args, models, network, device, batch=1, size=a.size))
    opt = ready_to_train(network, trainer, models, device, optimizer=a.optimizer, compile=a.compile,
                         capturable=a.cuda_graph)

    lat = a.size // 8
    latents = torch.randn(1, 16, lat, lat, device=device)
    real = min(a.text_len, 128)   # tokens of a typical tag caption; the rest is padding, as after caching
    mask = torch.zeros(1, a.text_len, dtype=torch.long, device=device)
    mask[:, :real] = 1
    source_dim = params.llm_adapter.source_dim
    text = {"prompt_embeds": torch.randn(1, a.text_len, source_dim, device=device) * mask[..., None],
            "attn_mask": mask, "t5_input_ids": torch.randint(2, params.llm_adapter.vocab_size, (1, a.text_len), device=device) * mask,
            "t5_attn_mask": mask.clone()}

    step = lora_training_step(trainer, args, models, network, opt, latents, text, dtype=dtype)
    if a.cuda_graph:
        step = graphed(step, device)
    times, _ = time_steps(step, a.steps, device)
    ctx_tokens = max(a.text_len, 512)   # the adapter output is padded to 512 tokens
    flops = useful_flops(params, (lat // params.patch_spatial) ** 2, ctx_tokens, a.text_len, a.text_len)
    print(json.dumps({
        "model": "tiny-anima" if a.tiny else f"anima-{params.num_blocks}-blocks",
        "dit_params_b": billions_of_parameters(dit),
        "lora_modules": len(network.loras), "train_llm_adapter": a.train_llm_adapter,
        "device": device_name(device),
        "size": a.size, "text_len": a.text_len, "rank": a.rank, "grad_ckpt": not a.no_grad_ckpt,
        "compile": a.compile, "cuda_graph": a.cuda_graph, "selective_ckpt": a.selective_checkpointing, **placed, "fp8": fp8, "attn_mode": a.attn_mode, "split_attn": a.split_attn,
        **timing_fields(times, device, build_s=build_s, flops_per_step=flops, peak_tflops=a.peak_tflops),
    }))


if __name__ == "__main__":
    main()
