#!/usr/bin/env bash
# One device call: everything that needs CUDA, logs to $OUT. Usage on the GPU machine:
#   bash benchmarks/gpu_session.sh [base|features|memory|families|diagnose|steps|attention|probe|launch|launch_families|fp8|final|graphs|graphs_launch|open_a|open_b|open_c|open_d|open_e|open_i|open_j|open_k|all]
#     base:     full-size FLUX.1-dev LoRA step (+compile), CUDA e2e through the CLI, GPU tests
#     features: Chroma and text-encoder LoRA steps at full size, Chroma + TE-LoRA e2e on tiny models
#     memory:   GPU tests, full-size FLUX step with swap / fp8 / offloaded checkpoints, CUDA e2e with them
#     families: full-size SD3.5 L, Lumina 2, Anima steps; GPU tests; the families' e2e tests on CUDA
#     diagnose: FLUX step profile (GPU busy fraction, kernel time by kind), launch to first step at full
#               size, --blocks_to_swap auto under 24 and 16 GiB caps
#     steps:    GPU tests, FLUX step eager and compiled (both profiled), auto under 24 and 16 GiB caps
#     attention: FLUX step with each SDPA kernel first (cuDNN, flash, memory-efficient), flash-attn, xformers
#     probe:    straight-to-GPU read tests, FLUX eager profile, launch + loading routes, fp8 auto/upcast, SDPA flash
#     launch:   GPU tests (reads, fp8, swap), CUDA e2e, launch to first step (2 runs + a cProfile run)
#     launch_families: launch to first step of SD3.5 Large, Lumina 2 and Anima at full size
#     fp8:      fp8 GPU tests, upcast microbenchmark, FLUX step bf16 vs --fp8_base
#     final:    GPU tests, FLUX step plain / swap 18 / fp8, the other families' steps, launch, auto at 16 GiB
#     graphs:   GPU tests (LoRA, fp8), FLUX step eager (profiled) and as one CUDA graph (eager, compiled,
#               fp8), the other families' steps as CUDA graphs, auto at 16 GiB probed further down
#     graphs_launch: --cuda_graph GPU tests (trainer vs eager), straight-to-GPU loading tests of every
#               family, FLUX step compiled + graph, launch to first step of Anima, Lumina 2, SD3.5 Large
#     open_a:   what the 2026-12-02 sessions left unmeasured, part 1: GPU tests (fp8, step graphs), FLUX
#               fp8 eager and recorded (recomputed upcasts kept), compiled + recorded
#     open_b:   part 2: the other families with block swap and fp8 (eager)
#     open_c:   part 3: auto at 16 GiB with the 1.25x estimate, SD3.5 Large launch
#     open_d:   Lumina and SD 1.x recorded vs eager (GPU tests), Lumina 2 recorded, FLUX fp8 compiled + recorded, auto at 16 GiB
#     open_e:   --selective_checkpointing (GPU test; FLUX compiled + recorded, recorded, eager), fp8 recorded with
#               the upcast kernel, fp8 compiled + recorded + kept attention, N = 16 under a 16 GiB cap
#     open_f..open_h (2026-12-02, fifth session, now gone: their experiments became the defaults):
#               the selective checkpoint compiled with each block; the compiled LoRA add as a fused sum
#     open_i:   the selective-checkpointing GPU test (full report), FLUX compiled + recorded with and
#               without --selective_checkpointing, fp8 with it (profiled), auto under a 24 GiB cap
#     open_j:   fp8 GPU tests, FLUX fp8 compiled + recorded with and without --selective_checkpointing
#               (the compiled fp8 layers' scales from their tensors: one graph per block kind)
#     open_k:   Lumina 2, Anima, SD3.5 Large compiled + recorded with --selective_checkpointing
set -uo pipefail
WHAT=${1:-all}

# FLUX LoRA training on tiny models through the real command line, bf16 on CUDA, with sampling:
# tiny_flux_e2e IMAGES STEPS SAMPLE_EVERY [more options]; models and output under /tmp/e2e,
# the log in $OUT/e2e_train.log.
tiny_flux_e2e() {
  local T=/tmp/e2e images=$1 steps=$2 every=$3; shift 3
  rm -rf $T; python3 -m library.tiny flux --variant dev --out $T/models > /dev/null
  python3 -c "from library.tiny.images import write_shapes_dataset; write_shapes_dataset('$T/images', $images)"
  sed "s#quickstart_out/images#$T/images#" configs/quickstart/dataset.toml > $T/ds.toml
  local M=$T/models
  python3 flux_train_network.py --pretrained_model_name_or_path $M/flux1-dev-tiny.safetensors \
    --clip_l $M/clip_l.safetensors --t5xxl $M/t5xxl.safetensors --ae $M/ae.safetensors --tokenizer_cache_dir $M/tokenizers \
    --dataset_config $T/ds.toml --output_dir $T/out --output_name cuda_tiny --network_module networks.lora_flux \
    --network_dim 8 --network_alpha 8 --network_train_unet_only --learning_rate 2e-3 --max_train_steps $steps \
    --mixed_precision bf16 --gradient_checkpointing --cache_latents --cache_text_encoder_outputs \
    --t5xxl_max_token_length 32 --guidance_scale 1.0 --timestep_sampling shift --discrete_flow_shift 3.1582 \
    --model_prediction_type raw --sample_prompts configs/quickstart/prompts.txt --sample_every_n_steps $every \
    --seed 1 "$@" > "$OUT/e2e_train.log" 2>&1
}
# Launch to first step of one family's full-size set (bench_launch.py, 2 runs; run 2 is the figure):
# launch_family FAMILY TIMEOUT_S. SD3.5 Large writes 27 GB of files first: it needs about 330 s.
launch_family() {
  timeout $2 python3 benchmarks/bench_launch.py --family $1 --models /tmp/$1_full --runs 2 \
    --log "$OUT/launch_$1.txt" 2>&1 | tail -1 | tee -a "$OUT/launch_families.jsonl"
  rm -rf /tmp/$1_full
}
# FLUX step benchmark runs, one JSON line each to $OUT/open.jsonl: flux_runs TIMEOUT_S STEPS "OPTIONS" ...
flux_runs() {
  local limit=$1 steps=$2 extra; shift 2
  for extra in "$@"; do
    timeout $limit python3 benchmarks/bench_flux_train.py --device cuda --steps $steps $extra 2>>"$OUT/err.log" \
      | tail -1 | tee -a "$OUT/open.jsonl"
  done
}
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch,transformers,accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)" | tee -a "$OUT/gpu.txt"

if [ "$WHAT" = open_a ]; then
  echo "== GPU tests: fp8, --cuda_graph through the trainer"
  timeout 150 python3 -m pytest -q -m gpu tests/test_fp8_gpu.py tests/test_step_graphs.py -p no:randomly 2>&1 \
    | tail -5 | tee "$OUT/gpu_tests.log"
  echo "== FLUX.1-dev: bf16 and fp8, eager and recorded"
  flux_runs 90 15 "--fp8_base" "--fp8_base --cuda_graph" "--cuda_graph" "--cuda_graph --compile"
  exit 0
fi

if [ "$WHAT" = open_b ]; then
  echo "== SD3.5 Large, Lumina 2, Anima: block swap (about half the blocks) and fp8, eager"
  for run in "sd3 --blocks_to_swap 18" "sd3 --fp8_base" "lumina --blocks_to_swap 12" "lumina --fp8_base" \
             "anima --blocks_to_swap 14" "anima --fp8_base"; do
    set -- $run; fam=$1; shift
    timeout 80 python3 benchmarks/bench_${fam}_train.py --device cuda --steps 15 "$@" 2>>"$OUT/err.log" | tail -1 \
      | tee -a "$OUT/open.jsonl"
  done
  exit 0
fi

if [ "$WHAT" = open_c ]; then
  echo "== --blocks_to_swap auto under a 16 GiB cap (estimate 1.25 working sets)"
  timeout 200 python3 benchmarks/bench_auto_swap.py --caps 16 --max_probes 3 --out "$OUT/auto_swap16.jsonl" 2>&1 | tail -2
  echo "== SD3.5 Large launch to first step"
  launch_family sd3 330
  exit 0
fi

if [ "$WHAT" = open_d ]; then
  echo "== GPU tests: Lumina and SD 1.x recorded (--cuda_graph) vs eager through the CLI"
  timeout 170 python3 -m pytest -q -m gpu tests/test_lumina_train_e2e.py tests/test_sd_train_e2e.py -p no:randomly \
    -k recorded 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
  echo "== Lumina 2 as a CUDA graph; FLUX.1-dev fp8 compiled + recorded"
  timeout 100 python3 benchmarks/bench_lumina_train.py --device cuda --steps 15 --cuda_graph 2>>"$OUT/err.log" \
    | tail -1 | tee -a "$OUT/open.jsonl"
  timeout 150 python3 benchmarks/bench_flux_train.py --device cuda --steps 15 --fp8_base --cuda_graph --compile \
    2>>"$OUT/err.log" | tail -1 | tee -a "$OUT/open.jsonl"
  echo "== --blocks_to_swap auto under a 16 GiB cap (estimate 1.25 working sets), probed down"
  timeout 180 python3 benchmarks/bench_auto_swap.py --caps 16 --max_probes 3 --out "$OUT/auto_swap16.jsonl" 2>&1 | tail -2
  echo "== FLUX.1-dev compiled + recorded, profiled (what is left in the step)"
  timeout 100 python3 benchmarks/bench_flux_train.py --device cuda --steps 12 --cuda_graph --compile --profile \
    --profile_tables "$OUT/prof_compile_graph.txt" 2>>"$OUT/err.log" | tail -1 | tee -a "$OUT/open.jsonl"
  exit 0
fi

if [ "$WHAT" = open_e ]; then
  echo "== GPU tests: kept attention outputs (cuDNN), the recorded fp8 upcast kernel"
  timeout 90 python3 -m pytest -q -m gpu tests/test_block_checkpointing.py tests/test_fp8_gpu.py -p no:randomly 2>&1 \
    | tail -4 | tee "$OUT/gpu_tests.log"
  echo "== FLUX.1-dev with --selective_checkpointing: compiled + recorded, recorded, eager; fp8 recorded (upcast kernel)"
  flux_runs 120 15 "--cuda_graph --compile --selective_checkpointing" "--cuda_graph --selective_checkpointing" \
    "--selective_checkpointing" "--fp8_base --cuda_graph" "--fp8_base --cuda_graph --compile --selective_checkpointing"
  echo "== 16 GiB cap: N = 16 (auto chose 19; 17 ran at 15.53 GiB)"
  timeout 60 python3 benchmarks/bench_flux_train.py --device cuda --steps 4 --memory_cap_gib 16 --blocks_to_swap 16 \
    2>>"$OUT/err.log" | tail -1 | tee -a "$OUT/auto_swap16.jsonl"
  exit 0
fi

if [ "$WHAT" = open_i ]; then
  echo "== GPU tests: selective checkpointing on CUDA (full report in gpu_tests.log)"
  timeout 60 python3 -m pytest -q -m gpu tests/test_block_checkpointing.py -p no:randomly --tb=long \
    > "$OUT/gpu_tests.log" 2>&1; tail -3 "$OUT/gpu_tests.log"
  flux_runs 120 12 "--cuda_graph --compile --selective_checkpointing" "--cuda_graph --compile"
  timeout 130 python3 benchmarks/bench_flux_train.py --device cuda --steps 12 --fp8_base --cuda_graph --compile \
    --selective_checkpointing --profile --profile_tables "$OUT/prof_fp8_selective.txt" 2>>"$OUT/err.log" \
    | tail -1 | tee -a "$OUT/open.jsonl"
  echo "== --blocks_to_swap auto under a 24 GiB cap"
  timeout 170 python3 benchmarks/bench_auto_swap.py --caps 24 --max_probes 2 --out "$OUT/auto_swap24.jsonl" 2>&1 | tail -2
  exit 0
fi

if [ "$WHAT" = open_j ]; then
  echo "== GPU tests: fp8, selective checkpointing"
  timeout 120 python3 -m pytest -q -m gpu tests/test_fp8_gpu.py tests/test_block_checkpointing.py -p no:randomly \
    --tb=short > "$OUT/gpu_tests.log" 2>&1; tail -3 "$OUT/gpu_tests.log"
  flux_runs 150 12 "--fp8_base --cuda_graph --compile --selective_checkpointing" "--fp8_base --cuda_graph --compile"
  exit 0
fi

if [ "$WHAT" = open_k ]; then
  for fam in lumina anima sd3; do
    timeout 80 python3 benchmarks/bench_${fam}_train.py --device cuda --steps 12 --cuda_graph --compile \
      --selective_checkpointing 2>>"$OUT/err.log" | tail -1 | tee -a "$OUT/open.jsonl"
  done
  exit 0
fi

if [ "$WHAT" = graphs_launch ]; then
  echo "== GPU tests: --cuda_graph through the trainer, every family's straight-to-GPU loading"
  timeout 150 python3 -m pytest -q -m gpu tests/test_step_graphs.py tests/test_family_model_loading.py \
    tests/test_device_reader.py -p no:randomly 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
  echo "== FLUX.1-dev step, compiled, as one CUDA graph"
  timeout 120 python3 benchmarks/bench_flux_train.py --device cuda --steps 15 --cuda_graph --compile \
    2>>"$OUT/graphs_err.log" | tail -1 | tee -a "$OUT/graphs.jsonl"
  echo "== launch to first step, Anima / Lumina 2 / SD3.5 Large (files in the page cache; run 2 is the figure)"
  launch_family anima 110
  launch_family lumina 110
  launch_family sd3 330
  exit 0
fi

if [ "$WHAT" = graphs ]; then
  echo "== GPU tests: LoRA and fp8"
  timeout 90 python3 -m pytest -q -m gpu tests/test_fp8_gpu.py tests/test_lora_core.py -p no:randomly 2>&1 | tail -2 | tee "$OUT/gpu_tests.log"
  echo "== FLUX.1-dev step: eager (profiled), then captured as one CUDA graph: eager, compiled, fp8"
  timeout 90 python3 benchmarks/bench_flux_train.py --device cuda --steps 12 --profile \
    --profile_tables "$OUT/prof_eager.txt" 2>/dev/null | tail -1 | tee -a "$OUT/graphs.jsonl"
  for extra in "--cuda_graph --profile" "--cuda_graph --compile" "--cuda_graph --fp8_base"; do
    timeout 150 python3 benchmarks/bench_flux_train.py --device cuda --steps 15 $extra \
      --profile_tables "$OUT/prof_graph.txt" 2>>"$OUT/graphs_err.log" | tail -1 | tee -a "$OUT/graphs.jsonl"
  done
  echo "== SD3.5 Large, Lumina 2 and Anima steps as CUDA graphs"
  for fam in sd3 lumina anima; do
    timeout 100 python3 benchmarks/bench_${fam}_train.py --device cuda --steps 15 --cuda_graph \
      2>>"$OUT/graphs_err.log" | tail -1 | tee -a "$OUT/graphs.jsonl"
  done
  echo "== --blocks_to_swap auto under a 16 GiB cap, probed further below auto's choice"
  timeout 200 python3 benchmarks/bench_auto_swap.py --caps 16 --max_probes 5 --out "$OUT/auto_swap16.jsonl" \
    2>&1 | tail -2
  exit 0
fi

if [ "$WHAT" = probe ]; then
  echo "== GPU tests: straight-to-GPU reads"
  timeout 60 python3 -m pytest -q -m gpu tests/test_device_reader.py -p no:randomly 2>&1 | tail -2 | tee "$OUT/gpu_tests.log"
  echo "== FLUX.1-dev step, eager, profiled (top kernels in prof_eager.txt)"
  timeout 90 python3 benchmarks/bench_flux_train.py --device cuda --steps 12 --profile \
    --profile_tables "$OUT/prof_eager.txt" 2>/dev/null | tail -1 | tee -a "$OUT/probe.jsonl"
  echo "== launch to first step, then loading routes, on the full-size set"
  timeout 200 python3 benchmarks/bench_launch.py --models /tmp/flux_full --runs 1 --log "$OUT/launch_log.txt" \
    2>&1 | tail -1 | tee -a "$OUT/probe.jsonl"
  timeout 100 python3 benchmarks/bench_load.py --models /tmp/flux_full 2>&1 | tail -1 | tee -a "$OUT/probe.jsonl"
  rm -rf /tmp/flux_full
  echo "== fp8: scaled matmul where it pays (auto) vs upcast; SDPA flash first vs cuDNN first"
  for extra in "--fp8_base --fp8_matmul auto" "--fp8_base --fp8_matmul upcast" "--sdpa_kernels flash"; do
    timeout 70 python3 benchmarks/bench_flux_train.py --device cuda --steps 12 $extra 2>&1 | tail -1 | tee -a "$OUT/probe.jsonl"
  done
  exit 0
fi

if [ "$WHAT" = launch ]; then
  echo "== GPU tests: straight-to-GPU reads, fp8, offload"
  timeout 90 python3 -m pytest -q -m gpu tests/test_device_reader.py tests/test_fp8_gpu.py tests/test_offload_gpu.py -p no:randomly > "$OUT/gpu_tests.log" 2>&1; tail -2 "$OUT/gpu_tests.log"
  echo "== CUDA e2e through the CLI, tiny models (straight-to-GPU loading, encoders released, sampling)"
  timeout 120 bash -c "$(declare -f tiny_flux_e2e); OUT=$OUT tiny_flux_e2e 8 20 10"
  echo "e2e rc=$? $(grep -c 'error' $OUT/e2e_train.log) error lines; samples: $(ls /tmp/e2e/out/sample 2>/dev/null | grep -c png)"
  echo "== launch to first step (files in the page cache), then once under cProfile"
  timeout 360 python3 benchmarks/bench_launch.py --models /tmp/flux_full --runs 2 --log "$OUT/launch_log.txt" \
    --cprofile "$OUT/launch_cprofile.txt" 2>&1 | tail -1 | tee -a "$OUT/launch.jsonl"
  rm -rf /tmp/flux_full
  exit 0
fi

if [ "$WHAT" = fp8 ]; then
  echo "== GPU tests: fp8"
  timeout 60 python3 -m pytest -q -m gpu tests/test_fp8_gpu.py -k "upcast or quantiser or equal" -p no:randomly 2>&1 | tail -2 | tee "$OUT/gpu_tests.log"
  echo "== fp8 weight upcast: PyTorch's cast vs the compiled one"
  timeout 60 python3 benchmarks/bench_fp8_upcast.py 2>&1 | tail -1 | tee -a "$OUT/fp8.jsonl"
  echo "== FLUX.1-dev step: bf16, --fp8_base"
  for extra in "" "--fp8_base"; do
    timeout 70 python3 benchmarks/bench_flux_train.py --device cuda --steps 12 $extra 2>&1 | tail -1 | tee -a "$OUT/fp8.jsonl"
  done
  exit 0
fi

if [ "$WHAT" = launch_families ]; then
  echo "== launch to first step, SD3.5 Large / Lumina 2 / Anima (files in the page cache; run 2 is the figure)"
  for f in sd3 lumina anima; do
    launch_family $f 330
  done
  exit 0
fi

if [ "$WHAT" = attention ]; then
  echo "== FLUX.1-dev step per SDPA kernel (and flash-attn / xformers when installed)"
  for k in cudnn flash efficient; do
    timeout 80 python3 benchmarks/bench_flux_train.py --device cuda --steps 15 --sdpa_kernels $k 2>&1 | tail -1 \
      | tee -a "$OUT/attention.jsonl"
  done
  for backend in flash xformers; do
    timeout 80 python3 benchmarks/bench_flux_train.py --device cuda --steps 15 --attention $backend 2>&1 | tail -1 \
      | tee -a "$OUT/attention.jsonl"
  done
  exit 0
fi

if [ "$WHAT" = final ]; then
  echo "== GPU tests"
  timeout 110 python3 -m pytest -q -m gpu tests -p no:randomly > "$OUT/gpu_tests.log" 2>&1; tail -3 "$OUT/gpu_tests.log"
  echo "== FLUX.1-dev step: eager, --blocks_to_swap 18, --fp8_base"
  for extra in "" "--blocks_to_swap 18" "--fp8_base"; do
    timeout 70 python3 benchmarks/bench_flux_train.py --device cuda --steps 15 $extra 2>&1 | tail -1 | tee -a "$OUT/final.jsonl"
  done
  echo "== families, eager"
  for cmd in bench_sd3_train.py bench_lumina_train.py bench_anima_train.py; do
    timeout 45 python3 benchmarks/$cmd --device cuda --steps 12 2>&1 | tail -1 | tee -a "$OUT/final.jsonl"
  done
  echo "== launch to first step"
  timeout 170 python3 benchmarks/bench_launch.py --models /tmp/flux_full --runs 1 --log "$OUT/launch_log.txt" \
    2>&1 | tail -2 | tee -a "$OUT/final.jsonl"
  rm -rf /tmp/flux_full
  echo "== --blocks_to_swap auto under a 16 GiB cap"
  timeout 130 python3 benchmarks/bench_auto_swap.py --caps 16 --max_probes 2 --out "$OUT/auto_swap16.jsonl" \
    2>&1 | tail -2 | tee -a "$OUT/final.jsonl"
  exit 0
fi

if [ "$WHAT" = steps ]; then
  echo "== GPU tests"
  timeout 150 python3 -m pytest -q -m gpu tests -p no:randomly > "$OUT/gpu_tests.log" 2>&1; tail -3 "$OUT/gpu_tests.log"
  echo "== FLUX.1-dev step: eager (profiled), per-block compile (profiled)"
  timeout 100 python3 benchmarks/bench_flux_train.py --device cuda --steps 15 --profile \
    --profile_tables "$OUT/prof_eager.txt" 2>"$OUT/prof_eager.err" | tail -1 | tee -a "$OUT/steps.jsonl"
  timeout 130 python3 benchmarks/bench_flux_train.py --device cuda --steps 15 --compile --profile \
    --profile_tables "$OUT/prof_compile.txt" 2>"$OUT/prof_compile.err" | tail -1 | tee -a "$OUT/steps.jsonl"
  echo "== --blocks_to_swap auto under memory caps"
  timeout 200 python3 benchmarks/bench_auto_swap.py --caps 24 16 --max_probes 3 --out "$OUT/auto_swap.jsonl" \
    2>&1 | tail -4 | tee -a "$OUT/steps.jsonl"
  exit 0
fi

if [ "$WHAT" = diagnose ]; then
  echo "== FLUX.1-dev step, eager, profiled"
  timeout 100 python3 benchmarks/bench_flux_train.py --device cuda --steps 12 --profile \
    --profile_tables "$OUT/prof_eager.txt" 2>"$OUT/prof_eager.err" | tail -1 | tee -a "$OUT/diagnose.jsonl"
  echo "== launch to first step, full-size files in the page cache"
  timeout 230 python3 benchmarks/bench_launch.py --models /tmp/flux_full --runs 2 --log "$OUT/launch_log.txt" \
    2>&1 | tail -3 | tee -a "$OUT/diagnose.jsonl"
  rm -rf /tmp/flux_full
  echo "== --blocks_to_swap auto under memory caps"
  timeout 220 python3 benchmarks/bench_auto_swap.py --caps 24 16 --max_probes 3 --out "$OUT/auto_swap.jsonl" \
    2>&1 | tail -4 | tee -a "$OUT/diagnose.jsonl"
  exit 0
fi

if [ "$WHAT" = families ] || [ "$WHAT" = all ]; then
  echo "== full-size LoRA steps per family (1024x1024, rank 16, bf16, grad ckpt, cached inputs)"
  for cmd in "bench_sd3_train.py" "bench_lumina_train.py" "bench_anima_train.py"; do
    timeout 150 python3 benchmarks/$cmd --device cuda --steps 25 2>&1 | tail -1 | tee -a "$OUT/bench_families.jsonl"
  done
  echo "== FLUX: offloaded checkpoints after the fix; fp8 profile"
  timeout 100 python3 benchmarks/bench_flux_train.py --device cuda --steps 15 --cpu_offload_checkpointing 2>&1 | tail -1 | tee -a "$OUT/bench_families.jsonl"
  timeout 120 python3 benchmarks/bench_flux_train.py --device cuda --steps 10 --fp8_base --profile > "$OUT/fp8_profile.txt" 2>&1
  echo "== GPU tests"
  timeout 150 python3 -m pytest -q -m gpu tests > "$OUT/gpu_tests.log" 2>&1; tail -3 "$OUT/gpu_tests.log"
  echo "== family e2e tests with CUDA visible"
  OMP_NUM_THREADS=4 timeout 170 python3 -m pytest -q -x tests/test_sd3_train_e2e.py tests/test_lumina_train_e2e.py \
    tests/test_anima_train_e2e.py > "$OUT/e2e_families_cuda.log" 2>&1; tail -3 "$OUT/e2e_families_cuda.log"
  echo "== per-block torch.compile"
  for cmd in "bench_sd3_train.py" "bench_lumina_train.py" "bench_anima_train.py"; do
    timeout 120 python3 benchmarks/$cmd --device cuda --steps 15 --compile 2>&1 | tail -1 | tee -a "$OUT/bench_families.jsonl"
  done
  [ "$WHAT" = families ] && exit 0
fi

if [ "$WHAT" = memory ] || [ "$WHAT" = all ]; then
  echo "== GPU tests"
  python3 -m pytest -q -m gpu tests -p no:randomly 2>&1 | tail -15 | tee "$OUT/gpu_tests_memory.log"
  echo "== CUDA bf16 e2e: no swap vs --blocks_to_swap 2 vs --fp8_base vs offloaded checkpoints (tiny, 4+4 blocks)"
  M=/tmp/mem; rm -rf $M; python3 -m library.tiny flux --variant dev --out $M/m > /dev/null
  python3 -c "
from dataclasses import replace
from library.tiny.flux import tiny_flux_params, write_flux_dit
from library.tiny.images import write_shapes_dataset
write_flux_dit('$M/deep.safetensors', 'dev', params=replace(tiny_flux_params('dev'), depth=4, depth_single_blocks=4), seed=4)
write_shapes_dataset('$M/images', 8)"
  printf '[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 128\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = "%s"\n' "$M/images" > $M/ds.toml
  for cfg in "base:" "swap:--blocks_to_swap 2" "fp8:--fp8_base" "fp8swap:--fp8_base --blocks_to_swap 2" "offck:--cpu_offload_checkpointing"; do
    name=${cfg%%:*}; extra=${cfg#*:}
    python3 flux_train_network.py --pretrained_model_name_or_path $M/deep.safetensors --clip_l $M/m/clip_l.safetensors \
      --t5xxl $M/m/t5xxl.safetensors --ae $M/m/ae.safetensors --tokenizer_cache_dir $M/m/tokenizers \
      --dataset_config $M/ds.toml --output_dir $M/out_$name --output_name mem --network_module networks.lora_flux \
      --network_dim 8 --network_alpha 8 --network_train_unet_only --learning_rate 2e-3 --max_train_steps 12 \
      --mixed_precision bf16 --gradient_checkpointing --cache_latents --cache_text_encoder_outputs \
      --t5xxl_max_token_length 32 --guidance_scale 1.0 --timestep_sampling shift --discrete_flow_shift 3.1582 \
      --model_prediction_type raw --seed 1 --sample_prompts configs/quickstart/prompts.txt --sample_every_n_steps 12 \
      $extra > "$OUT/e2e_mem_$name.log" 2>&1
    echo "$name rc=$? losses: $(python3 -c "import json;print([round(json.loads(l)['loss'],5) for l in open('$M/out_$name/mem_log.jsonl') if 'loss' in l])" 2>&1)" | tee -a "$OUT/e2e_mem.txt"
  done
  echo "== full-size FLUX.1-dev LoRA step: memory options (trainer code path)"
  for extra in "" "--blocks_to_swap 18" "--fp8_base" "--fp8_base --blocks_to_swap 18" "--cpu_offload_checkpointing" "--blocks_to_swap 35"; do
    python3 benchmarks/bench_flux_train.py --device cuda --steps 25 $extra 2>&1 | tail -1 | tee -a "$OUT/bench_memory.jsonl"
  done
  [ "$WHAT" = memory ] && exit 0
fi

if [ "$WHAT" = features ] || [ "$WHAT" = all ]; then
  echo "== full-size Chroma and text-encoder LoRA steps (1024x1024, rank 16, bf16, grad ckpt)"
  for extra in "--variant chroma" "--train_text_encoders clip_l" "--train_text_encoders clip_l+t5"; do
    python3 benchmarks/bench_flux_train.py --device cuda --steps 25 $extra 2>&1 | tail -1 | tee -a "$OUT/bench_features.jsonl"
  done
  echo "== CUDA bf16 e2e: Chroma, and FLUX + CLIP-L + T5 LoRA with validation and masked loss (tiny models)"
  F=/tmp/feat; rm -rf $F; python3 -m library.tiny flux --variant chroma --out $F/chroma > /dev/null
  python3 -m library.tiny flux --variant dev --out $F/dev > /dev/null
  python3 -c "from library.tiny.images import write_shapes_dataset; write_shapes_dataset('$F/images', 12)"
  printf '[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 128\nbatch_size = 2\nvalidation_split = 0.25\n[[datasets.subsets]]\nimage_dir = "%s"\n' "$F/images" > $F/ds.toml
  COMMON="--dataset_config $F/ds.toml --network_module networks.lora_flux --network_dim 8 --network_alpha 8 \
    --learning_rate 2e-3 --max_train_steps 40 --mixed_precision bf16 --gradient_checkpointing --cache_latents \
    --t5xxl_max_token_length 32 --timestep_sampling shift --discrete_flow_shift 3.1582 --model_prediction_type raw \
    --validate_every_n_steps 20 --seed 1"
  C=$F/chroma
  python3 flux_train_network.py --model_type chroma --pretrained_model_name_or_path $C/chroma-tiny.safetensors \
    --t5xxl $C/t5xxl.safetensors --ae $C/ae.safetensors --tokenizer_cache_dir $C/tokenizers $COMMON \
    --guidance_scale 0.0 --network_train_unet_only --cache_text_encoder_outputs --output_dir $F/out_chroma \
    --output_name chroma > "$OUT/e2e_chroma.log" 2>&1
  echo "chroma rc=$?" | tee -a "$OUT/e2e_chroma.log"
  D=$F/dev
  python3 flux_train_network.py --pretrained_model_name_or_path $D/flux1-dev-tiny.safetensors --clip_l $D/clip_l.safetensors \
    --t5xxl $D/t5xxl.safetensors --ae $D/ae.safetensors --tokenizer_cache_dir $D/tokenizers $COMMON --guidance_scale 1.0 \
    --network_args train_t5xxl=True split_qkv=True --text_encoder_lr 1e-3 5e-4 --output_dir $F/out_te --output_name te \
    > "$OUT/e2e_te.log" 2>&1
  echo "te-lora rc=$?" | tee -a "$OUT/e2e_te.log"
  cp $F/out_chroma/chroma_log.jsonl $F/out_te/te_log.jsonl "$OUT/" 2>/dev/null
  [ "$WHAT" = features ] && exit 0
fi

echo "== full-size FLUX.1-dev LoRA step (TARGETS setting)" | tee "$OUT/bench.jsonl.log"
python3 benchmarks/bench_flux_train.py --device cuda --steps 30 2>&1 | tail -1 | tee -a "$OUT/bench.jsonl"
python3 benchmarks/bench_flux_train.py --device cuda --steps 30 --compile 2>&1 | tail -1 | tee -a "$OUT/bench.jsonl"

echo "== CUDA bf16 end to end through the command line (tiny models)"
T=/tmp/e2e; M=$T/models
tiny_flux_e2e 12 60 30 --save_every_n_steps 30 --save_state --save_precision bf16
echo "train rc=$?" | tee -a "$OUT/e2e_train.log"
python3 flux_minimal_inference.py --ckpt $M/flux1-dev-tiny.safetensors --clip_l $M/clip_l.safetensors \
  --t5xxl $M/t5xxl.safetensors --ae $M/ae.safetensors --tokenizer_cache_dir $M/tokenizers --prompt "a red circle" \
  --width 128 --height 128 --steps 8 --seed 1 --dtype bf16 --t5xxl_max_token_length 32 \
  --lora "$T/out/cuda_tiny.safetensors;1.0" --out "$OUT/cuda_infer_lora.png" > "$OUT/e2e_infer.log" 2>&1
echo "infer rc=$?" | tee -a "$OUT/e2e_infer.log"
cp $T/out/cuda_tiny_log.jsonl "$OUT/" 2>/dev/null
echo "== GPU tests"
python3 -m pytest -q -m gpu tests 2>&1 | tail -5 | tee "$OUT/gpu_tests.log"
