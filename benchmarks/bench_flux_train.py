"""Benchmark a FLUX LoRA training step at full size with random weights (TARGETS.md setting).

    python benchmarks/bench_flux_train.py --device cuda --steps 40          # FLUX.1-dev, 1024x1024
    python benchmarks/bench_flux_train.py --tiny --device cpu --steps 3     # quick check on CPU
    python benchmarks/bench_flux_train.py --variant chroma                  # Chroma (T5 mask applied)
    python benchmarks/bench_flux_train.py --train_text_encoders clip_l+t5   # + CLIP-L and T5-XXL LoRA
    python benchmarks/bench_flux_train.py --blocks_to_swap 18 --fp8_base    # the memory options

The step (benchmarks/bench_common.py) is the trainer's own code (FluxNetworkTrainer.noisy_input /
denoise / loss_terms, the shared loss, LoRA from networks.lora_flux, the optimizer builder), fed
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

from benchmarks.bench_common import (add_cuda_graph_argument, add_memory_arguments, device_name,  # noqa: E402
                                     fp8_base, graphed, lora_optimizer, lora_training_step, place_with_swap,
                                     placement_fields, profile_steps, time_steps, timing_fields)
from flux_train_network import FluxNetworkTrainer  # noqa: E402
from library import attention  # noqa: E402
from library.flux.model import VARIANTS  # noqa: E402
from library.training import memory  # noqa: E402
from library.tiny.flux import build_flux_model, tiny_flux_params  # noqa: E402
from library.training.trainer import FamilyModels, compile_blocks  # noqa: E402
from networks import lora_flux  # noqa: E402


def useful_flops(params, img_tokens: int, txt_tokens: int) -> float:
    """2F, F = sum over blocks of 2 x token-wise linear params x L + 4 L^2 d (TARGETS.md)."""
    h, mlp = params.hidden_size, params.mlp_hidden_dim
    per_block = h * 3 * h + h * h + 2 * h * mlp          # qkv + proj + mlp (one stream) == single block
    L = img_tokens + txt_tokens
    blocks = params.depth + params.depth_single_blocks
    forward = blocks * (2 * per_block * L + 4 * L * L * h)
    return 2 * forward


def build_text_encoders(a, device: torch.device, dtype: torch.dtype):
    """Random CLIP-L and T5-XXL (full size unless --tiny) made directly on the device."""
    import tempfile

    from transformers import CLIPTextModel, T5EncoderModel

    from library import text_encoders as te
    from library.flux.text import FluxTextEncoding
    from library.tiny import tokenizers as tiny_tok
    from library.tiny.flux import tiny_clip_config_overrides, tiny_t5_config_overrides

    with torch.device(device):
        clip = te.wrap_clip_text_model(CLIPTextModel(te.clip_l_config(
            **(tiny_clip_config_overrides() if a.tiny else {})))).to(dtype).eval()
        t5 = T5EncoderModel(te.t5xxl_config(**(tiny_t5_config_overrides() if a.tiny else {}))).to(dtype).eval()
    for model in (clip, t5):
        model.requires_grad_(False)
    cache = tiny_tok.write_tokenizer_cache(Path(tempfile.mkdtemp()) / "tokenizers")
    return FluxTextEncoding(te.load_clip_l_tokenizer(cache), te.load_t5xxl_tokenizer(cache), clip, t5, a.t5_len,
                            apply_t5_attn_mask=a.variant == "chroma")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--t5_len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--no_grad_ckpt", action="store_true")
    ap.add_argument("--peak_tflops", type=float, default=790.0, help="measured bf16 matmul peak of the GPU")
    ap.add_argument("--optimizer", default="AdamW")
    ap.add_argument("--compile", action="store_true", help="--torch_compile: compile each block")
    ap.add_argument("--variant", choices=["dev", "chroma"], default="dev")
    ap.add_argument("--train_text_encoders", choices=["none", "clip_l", "clip_l+t5"], default="none",
                    help="also train text-encoder LoRA (live encoding; T5 outputs cached with clip_l alone)")
    add_memory_arguments(ap)
    ap.add_argument("--cpu_offload_checkpointing", action="store_true")
    ap.add_argument("--fp8_matmul", default=memory.FP8_TRAINING_MATMUL, choices=["auto", "upcast", "scaled"],
                    help="with --fp8_base: scaled fp8 matmuls where they pay (auto), never, or always")
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "flash", "xformers"],
                    help="attention backend (flash/xformers need their packages)")
    ap.add_argument("--sdpa_kernels", default=None,
                    help="with --attention sdpa: comma-separated kernel order, e.g. flash or cudnn,flash "
                         "(default: cuDNN first, as the trainer)")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, profile 2 steps: GPU busy fraction, kernel time by kind, launches per step "
                         "(in the JSON line) and the top ops (stderr, or --profile_tables)")
    ap.add_argument("--profile_tables", default=None, help="file for the profiler's top-ops tables")
    ap.add_argument("--memory_cap_gib", type=float, default=None,
                    help="emulate a smaller card: cap this process's CUDA memory (set_per_process_memory_fraction) "
                         "before the DiT is placed")
    add_cuda_graph_argument(ap)
    a = ap.parse_args()

    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attention.set_attention_backend(a.attention)
    if a.sdpa_kernels:
        attention.set_sdpa_kernel_order(a.sdpa_kernels.split(","))
    chroma = a.variant == "chroma"
    params = tiny_flux_params(a.variant) if a.tiny else VARIANTS[a.variant].params
    t0 = time.perf_counter()
    dit = build_flux_model(params, device=device, dtype=dtype, chroma=chroma)
    dit.requires_grad_(False)
    build_s = time.perf_counter() - t0
    if not a.no_grad_ckpt:
        dit.enable_gradient_checkpointing(cpu_offload=a.cpu_offload_checkpointing,
                                          selective=a.selective_checkpointing)
    trainer = FluxNetworkTrainer()
    args = trainer.build_parser().parse_args([
        "--timestep_sampling", "shift", "--discrete_flow_shift", "3.1582", "--model_prediction_type", "raw",
        "--guidance_scale", "0.0" if chroma else "1.0", "--mixed_precision", "bf16" if dtype == torch.bfloat16 else "no",
        *(["--apply_t5_attn_mask"] if chroma else [])])
    trainer._loss_config = trainer.loss_config(args)
    trained_tes = {"none": frozenset(), "clip_l": frozenset({0}), "clip_l+t5": frozenset({0, 1})}[a.train_text_encoders]
    text_encoding = build_text_encoders(a, device, dtype) if trained_tes else None
    encoders = [text_encoding.clip_l, text_encoding.t5] if text_encoding else [None, None]
    models = FamilyModels(denoiser=dit, text_encoders=encoders, vae=None,
                          info=type("Info", (), {"variant": a.variant})(), extra={"text": text_encoding})
    fp8_report = fp8_base(a, trainer, models, device, dtype)   # before the LoRA wraps the layers

    network = lora_flux.create_network(1.0, a.rank, a.rank, None, encoders, dit,
                                       train_t5xxl=str(1 in trained_tes))
    network.apply_to(apply_text_encoder=bool(trained_tes), apply_unet=True)
    network.to(device)
    args.t5xxl_max_token_length = a.t5_len
    try:
        placement = place_with_swap(a, trainer, args, models, network, device, batch=1, size=a.size,
                                    memory_cap_gib=a.memory_cap_gib)
    except torch.cuda.OutOfMemoryError:
        print(json.dumps({"model": "flux1-dev", "memory_cap_gib": a.memory_cap_gib, "blocks_to_swap": a.blocks_to_swap,
                          "oom": True, "oom_at": "placing the model"}))
        return
    if a.compile:
        compile_blocks(trainer.block_lists(models), "inductor")
    opt = lora_optimizer(network, a.optimizer, capturable=a.cuda_graph)

    lat_hw = a.size // 8
    latents = torch.randn(1, 16, lat_hw, lat_hw, device=device)
    text = {"t5_out": torch.randn(1, a.t5_len, params.context_in_dim, device=device),
            "l_pooled": torch.randn(1, params.vec_in_dim, device=device),
            "txt_ids": torch.zeros(1, a.t5_len, 3, device=device),
            "t5_attn_mask": torch.ones(1, a.t5_len, dtype=torch.long, device=device)}

    captions = ["a photograph of a cat sitting on a wooden table next to a window, soft morning light"]

    def conditioning() -> dict:
        if not trained_tes:
            return text
        # CLIP-L alone: T5 outputs come from the "cache" (as in the loop)
        cached = text if trained_tes == frozenset({0}) else None
        return trainer.encode_text_for_training(args, models, captions, cached, trained_tes, device)

    step = lora_training_step(trainer, args, models, network, opt, latents, conditioning, dtype=dtype)
    if a.cuda_graph:
        step = graphed(step, device)
    try:
        times, _ = time_steps(step, a.steps, device)
    except torch.cuda.OutOfMemoryError:
        print(json.dumps({"model": "flux1-dev", "memory_cap_gib": a.memory_cap_gib, "blocks_to_swap": a.blocks_to_swap,
                          "swap": placement.message, "oom": True, "oom_at": "training step"}))
        return
    profiled = profile_steps(step, device, table_path=a.profile_tables) if a.profile else {}
    img_tokens = (lat_hw // 2) ** 2
    flops = useful_flops(params, img_tokens, a.t5_len)
    out = {
        "model": ("tiny-" if a.tiny else "") + ("chroma" if chroma else "flux1-dev"),
        "train_text_encoders": a.train_text_encoders, "device": device_name(device),
        "size": a.size, "t5_len": a.t5_len, "rank": a.rank, "grad_ckpt": not a.no_grad_ckpt, "compile": a.compile,
        "cuda_graph": a.cuda_graph, "selective_ckpt": a.selective_checkpointing,
        "attention": a.attention, "sdpa_kernels": a.sdpa_kernels, "memory_cap_gib": a.memory_cap_gib, "oom": False,
        "fp8_base": a.fp8_base, "cpu_offload_checkpointing": a.cpu_offload_checkpointing,
        "fp8": fp8_report, "fp8_matmul": a.fp8_matmul if a.fp8_base else None, **placement_fields(placement),
        **timing_fields(times, device, build_s=build_s, flops_per_step=flops, peak_tflops=a.peak_tflops,
                        tflop_digits=1),
        "first_steps_s": [round(t, 2) for t in times[:3]], **profiled,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
