"""Benchmark a Lumina Image 2.0 LoRA training step at full size with random weights (TARGETS.md setting).

    python benchmarks/bench_lumina_train.py --device cuda --steps 40                    # 2.6 B DiT, 1024x1024, SDPA
    python benchmarks/bench_lumina_train.py --device cuda --steps 40 --use_flash_attn   # flash-attn (varlen)
    python benchmarks/bench_lumina_train.py --tiny --device cpu --steps 3               # quick check on CPU

The step (benchmarks/bench_common.py) is the trainer's own code
(LuminaNetworkTrainer.noisy_input / denoise / loss_terms with the guide's recommended options:
nextdit_shift, shift 6.0, raw prediction; the shared loss; LoRA from networks.lora_lumina; the
optimizer builder), fed with synthetic cached latents and Gemma2 outputs, i.e. what
`--cache_latents --cache_text_encoder_outputs --network_train_unet_only` gives the loop. The
caption is right-padded to --cap_len with --cap_tokens real tokens (the system prompt plus a
caption); the DiT drops the padding. Prints one JSON line: median/p90 step time over steps 6..,
peak memory, and model FLOPs utilisation as TARGETS.md defines it.
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
from library.attention import set_attention_backend  # noqa: E402
from library.errors import ConfigError  # noqa: E402
from library.lumina.model import VARIANTS, LuminaParams  # noqa: E402
from library.tiny.lumina import build_lumina_model, tiny_lumina_params  # noqa: E402
from library.training.trainer import FamilyModels  # noqa: E402
from lumina_train_network import LuminaNetworkTrainer  # noqa: E402
from networks import lora_lumina  # noqa: E402


def useful_flops(p: LuminaParams, img_tokens: int, cap_tokens: int, batch: int) -> float:
    """2F (TARGETS.md): F = sum over blocks of 2 x token-wise linear params x L + 4 L^2 d, where L
    is the block's own sequence: caption + image for `layers`, the image for the noise refiners,
    the caption for the context refiners. Modulation (once per sample) does not count."""
    d = p.dim
    qkv = d * (p.n_heads + 2 * p.n_kv_heads) * p.head_dim
    per_token = qkv + d * d + 3 * d * p.ffn_hidden_dim        # qkv + out + SwiGLU w1/w2/w3

    def block(length: int) -> float:
        return 2 * per_token * length + 4 * length * length * d

    forward = (p.n_layers * block(img_tokens + cap_tokens) + p.n_refiner_layers * block(img_tokens)
               + p.n_refiner_layers * block(cap_tokens))
    return 2 * forward * batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model (CPU check of this script)")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cap_len", type=int, default=256, help="--gemma2_max_token_length (padded length)")
    ap.add_argument("--cap_tokens", type=int, default=96, help="real caption tokens (system prompt + caption)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--no_grad_ckpt", action="store_true")
    ap.add_argument("--use_flash_attn", action="store_true", help="as the trainer's --use_flash_attn")
    ap.add_argument("--compile", action="store_true", help="--torch_compile: compile each of the 26 layers")
    ap.add_argument("--peak_tflops", type=float, default=790.0, help="measured bf16 matmul peak of the GPU")
    ap.add_argument("--optimizer", default="AdamW")
    add_cuda_graph_argument(ap)
    add_memory_arguments(ap)
    a = ap.parse_args()
    if not 1 <= a.cap_tokens <= a.cap_len:
        ap.error("--cap_tokens must lie in 1..--cap_len")
    if a.cuda_graph and a.use_flash_attn:
        ap.error("--cuda_graph with --use_flash_attn: the trainer refuses it (varlen reads lengths to the host)")

    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if a.use_flash_attn:
        try:
            set_attention_backend("flash")
        except ConfigError as e:
            sys.exit(f"--use_flash_attn: {e}")
    params = tiny_lumina_params() if a.tiny else VARIANTS["lumina2"].params
    t0 = time.perf_counter()
    dit = build_lumina_model(params, device=device, dtype=dtype)
    dit.requires_grad_(False)
    build_s = time.perf_counter() - t0
    if not a.no_grad_ckpt:
        dit.enable_gradient_checkpointing(selective=a.selective_checkpointing)

    trainer = LuminaNetworkTrainer()
    args = trainer.build_parser().parse_args([
        "--timestep_sampling", "nextdit_shift", "--discrete_flow_shift", "6.0", "--model_prediction_type", "raw",
        "--mixed_precision", "bf16" if dtype == torch.bfloat16 else "no",
        *(["--cuda_graph"] if a.cuda_graph else [])])   # denoise then keeps the caption's padded length
    trainer._loss_config = trainer.loss_config(args)
    models = FamilyModels(denoiser=dit, text_encoders=[None], vae=None)

    fp8 = fp8_base(a, trainer, models, device, dtype)   # before the LoRA wraps the layers
    network = lora_lumina.create_network(1.0, a.rank, a.rank, None, None, dit)
    network.apply_to(None, dit, apply_text_encoder=False, apply_unet=True)
    placed = placement_fields(place_with_swap(a, trainer, args, models, network, device, batch=a.batch, size=a.size))
    opt = ready_to_train(network, trainer, models, device, optimizer=a.optimizer, compile=a.compile,
                         capturable=a.cuda_graph)

    lat = a.size // 8
    latents = torch.randn(a.batch, params.in_channels, lat, lat, device=device)
    mask = torch.zeros(a.batch, a.cap_len, dtype=torch.long, device=device)
    mask[:, :a.cap_tokens] = 1
    text = {"hidden_state": torch.randn(a.batch, a.cap_len, params.cap_feat_dim, device=device),
            "attention_mask": mask, "input_ids": torch.zeros(a.batch, a.cap_len, dtype=torch.long, device=device)}

    step = lora_training_step(trainer, args, models, network, opt, latents, text, dtype=dtype)
    if a.cuda_graph:
        step = graphed(step, device)
    times, _ = time_steps(step, a.steps, device)
    img_tokens = (lat // params.patch_size) ** 2
    flops = useful_flops(params, img_tokens, a.cap_tokens, a.batch)
    out = {
        "model": ("tiny-" if a.tiny else "") + "lumina2",
        "device": device_name(device), "dit_params_b": billions_of_parameters(dit),
        "attention": "flash" if a.use_flash_attn else "sdpa", "size": a.size, "batch": a.batch,
        "cap_len": a.cap_len, "cap_tokens": a.cap_tokens, "rank": a.rank, "grad_ckpt": not a.no_grad_ckpt,
        "compile": a.compile, "cuda_graph": a.cuda_graph, "selective_ckpt": a.selective_checkpointing, **placed, "fp8": fp8, "lora_modules": len(network.loras),
        **timing_fields(times, device, build_s=build_s, flops_per_step=flops, peak_tflops=a.peak_tflops,
                        tflop_digits=4),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
