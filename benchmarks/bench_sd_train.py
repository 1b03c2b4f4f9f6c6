"""Benchmark an SD 1.5 LoRA training step at full size with random weights.

    python benchmarks/bench_sd_train.py --device cuda --steps 40                 # SD 1.5, 512x512, batch 4, rank 16
    python benchmarks/bench_sd_train.py --tiny --device cpu --steps 3 --size 128 # quick check on CPU
    python benchmarks/bench_sd_train.py --v2 --v_parameterization --size 768     # SD 2.1 768-v
    python benchmarks/bench_sd_train.py --train_text_encoder                     # + CLIP LoRA (live encoding)

The step is the trainer's own code (SDNetworkTrainer.noisy_input / denoise / loss_terms, the
shared loss, LoRA-LierLa from networks.lora, the optimizer builder) on the diffusers UNet with
PyTorch SDPA attention, fed with synthetic cached latents and text states, i.e. what
`--cache_latents --cache_text_encoder_outputs --network_train_unet_only` gives the loop (with
--train_text_encoder the CLIP text encoder runs live with its LoRA). bf16 base weights under
bf16 autocast on CUDA, float32 on CPU. Prints one JSON line: median/p90 step time over steps
6.., peak memory, and the step's FLOPs as counted by torch.utils.flop_counter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.sd.model import SDUNet  # noqa: E402
from library.sd.text import CACHE_KEY, SDTextEncoding, load_sd_tokenizer  # noqa: E402
from library.tiny import sd as tiny_sd  # noqa: E402
from library.training.losses import compute_per_sample_loss  # noqa: E402
from library.training.optimizers import build_optimizer  # noqa: E402
from library.training.trainer import FamilyModels  # noqa: E402
from networks import lora  # noqa: E402
from train_network import SDNetworkTrainer  # noqa: E402


def build_text_encoder(a, device: torch.device, dtype: torch.dtype):
    """A random CLIP text encoder (ViT-L for SD 1.5, the 23-layer OpenCLIP-H tower for SD 2.1)."""
    from transformers import CLIPTextModel

    from library.text_encoders import clip_g_config, clip_l_config, wrap_clip_text_model

    if a.tiny:
        config = tiny_sd._clip_config(a.v2, tiny_sd.TINY_V2_TEXT_LAYERS if a.v2 else tiny_sd.TINY_V1_TEXT_LAYERS)
    elif a.v2:
        config = clip_g_config(hidden_size=1024, num_attention_heads=16, intermediate_size=4096, num_hidden_layers=23,
                               projection_dim=1024)
    else:
        config = clip_l_config()
    with torch.device(device):
        te = wrap_clip_text_model(CLIPTextModel(config)).to(dtype).eval()
    te.requires_grad_(False)
    cache = tiny_sd.write_tokenizer_cache(Path(tempfile.mkdtemp()) / "tokenizers", a.v2)
    return te, SDTextEncoding(load_sd_tokenizer(a.v2, cache_dir=cache), te)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny test UNet instead of the full-size one")
    ap.add_argument("--v2", action="store_true", help="SD 2.1 (OpenCLIP-H context, 64-wide heads) instead of SD 1.5")
    ap.add_argument("--v_parameterization", action="store_true")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--conv_dim", type=int, default=None, help="LoRA-C3Lier: rank of the 3x3 convolutions")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--grad_ckpt", action="store_true", help="--gradient_checkpointing")
    ap.add_argument("--optimizer", default="AdamW")
    ap.add_argument("--train_text_encoder", action="store_true", help="also train the text-encoder LoRA")
    a = ap.parse_args()

    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    unet = SDUNet(tiny_sd.build_unet(a.v2, full=not a.tiny, device=device, dtype=dtype)).requires_grad_(False)
    unet.set_attention("sdpa")
    build_s = time.perf_counter() - t0
    if a.grad_ckpt:
        unet.enable_gradient_checkpointing()
    te, text = build_text_encoder(a, device, dtype) if a.train_text_encoder else (None, None)

    trainer = SDNetworkTrainer()
    argv = ["--mixed_precision", "bf16" if dtype == torch.bfloat16 else "no"]
    if a.v_parameterization:
        argv.append("--v_parameterization")
    args = trainer.build_parser().parse_args(argv)
    trainer._loss_config = trainer.loss_config(args)
    models = FamilyModels(denoiser=unet, text_encoders=[te], vae=None, info=None, extra={"text": text})

    net_args = {"conv_dim": str(a.conv_dim)} if a.conv_dim else {}
    network = lora.create_network(1.0, a.rank, a.rank, None, [te], unet, **net_args)
    network.apply_to([te], unet, apply_text_encoder=a.train_text_encoder, apply_unet=True)
    network.to(device)
    groups, _ = network.prepare_optimizer_params(text_encoder_lr=None, unet_lr=None, default_lr=1e-4)
    opt = build_optimizer(a.optimizer, [], groups, 1e-4).optimizer

    context = unet.config.cross_attention_dim
    lat = a.size // 8
    latents = torch.randn(a.batch, 4, lat, lat, device=device)
    cached = {CACHE_KEY: torch.randn(a.batch, 77, context, device=device)}
    captions = ["a photograph of a cat sitting on a wooden table next to a window, soft morning light"] * a.batch

    def step() -> torch.Tensor:
        noisy = trainer.noisy_input(args, latents, torch.randn_like(latents))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            conds = cached
            if a.train_text_encoder:
                conds = trainer.encode_text_for_training(args, models, captions, None, frozenset({0}), device)
            pred = trainer.denoise(args, models, noisy, conds)
        p, w = trainer.loss_terms(args, pred.float(), noisy)
        loss = compute_per_sample_loss(trainer._loss_config, p, noisy.target.float(), timesteps=noisy.timesteps,
                                       sigmas=noisy.sigmas, weighting=w, mask=None,
                                       loss_weights=torch.ones(a.batch, device=device)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    measured = times[5:] if len(times) > 6 else times
    med = statistics.median(measured)
    p90 = sorted(measured)[int(0.9 * (len(measured) - 1))]
    out = {
        "model": ("tiny-" if a.tiny else "") + ("sd2.1" if a.v2 else "sd1.5") + ("-v" if a.v_parameterization else ""),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "size": a.size, "batch": a.batch, "rank": a.rank, "conv_dim": a.conv_dim, "grad_ckpt": a.grad_ckpt,
        "train_text_encoder": a.train_text_encoder, "lora_modules": len(network.loras), "build_s": round(build_s, 2),
        "median_s": round(med, 4), "p90_s": round(p90, 4), "steps": a.steps,
        "gflop_per_step": round(flops / 1e9, 1), "achieved_tflops": round(flops / med / 1e12, 2),
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
