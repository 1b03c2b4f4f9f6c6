#!/usr/bin/env bash
# One device call: everything that needs CUDA, logs to $OUT. Usage on the GPU machine:
#   bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch,transformers,accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)" | tee -a "$OUT/gpu.txt"

echo "== full-size FLUX.1-dev LoRA step (TARGETS setting)" | tee "$OUT/bench.jsonl.log"
python3 benchmarks/bench_flux_train.py --device cuda --steps 30 2>&1 | tail -1 | tee -a "$OUT/bench.jsonl"
python3 benchmarks/bench_flux_train.py --device cuda --steps 30 --compile 2>&1 | tail -1 | tee -a "$OUT/bench.jsonl"

echo "== CUDA bf16 end to end through the command line (tiny models)"
T=/tmp/e2e; rm -rf $T; python3 -m library.tiny flux --variant dev --out $T/models > /dev/null
python3 -c "from library.tiny.images import write_shapes_dataset; write_shapes_dataset('$T/images', 12)"
sed "s#quickstart_out/images#$T/images#" configs/quickstart/dataset.toml > $T/ds.toml
M=$T/models
python3 flux_train_network.py --pretrained_model_name_or_path $M/flux1-dev-tiny.safetensors \
  --clip_l $M/clip_l.safetensors --t5xxl $M/t5xxl.safetensors --ae $M/ae.safetensors --tokenizer_cache_dir $M/tokenizers \
  --dataset_config $T/ds.toml --output_dir $T/out --output_name cuda_tiny --network_module networks.lora_flux \
  --network_dim 8 --network_alpha 8 --network_train_unet_only --learning_rate 2e-3 --max_train_steps 60 \
  --mixed_precision bf16 --gradient_checkpointing --cache_latents --cache_text_encoder_outputs \
  --t5xxl_max_token_length 32 --guidance_scale 1.0 --timestep_sampling shift --discrete_flow_shift 3.1582 \
  --model_prediction_type raw --sample_prompts configs/quickstart/prompts.txt --sample_every_n_steps 30 \
  --save_every_n_steps 30 --save_state --seed 1 --save_precision bf16 > "$OUT/e2e_train.log" 2>&1
echo "train rc=$?" | tee -a "$OUT/e2e_train.log"
python3 flux_minimal_inference.py --ckpt $M/flux1-dev-tiny.safetensors --clip_l $M/clip_l.safetensors \
  --t5xxl $M/t5xxl.safetensors --ae $M/ae.safetensors --tokenizer_cache_dir $M/tokenizers --prompt "a red circle" \
  --width 128 --height 128 --steps 8 --seed 1 --dtype bf16 --t5xxl_max_token_length 32 \
  --lora "$T/out/cuda_tiny.safetensors;1.0" --out "$OUT/cuda_infer_lora.png" > "$OUT/e2e_infer.log" 2>&1
echo "infer rc=$?" | tee -a "$OUT/e2e_infer.log"
cp $T/out/cuda_tiny_log.jsonl "$OUT/" 2>/dev/null
echo "== GPU tests"
python3 -m pytest -q -m gpu tests 2>&1 | tail -5 | tee "$OUT/gpu_tests.log"
