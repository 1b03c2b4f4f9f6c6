#!/usr/bin/env bash
# The quickstart: tiny random FLUX-format models + 12 synthetic captioned pictures, a short real
# training run through `accelerate launch flux_train_network.py` on the CPU, then inference with
# and without the LoRA. Nothing is downloaded. Run from anywhere:  bash configs/quickstart/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=quickstart_out
rm -rf "$OUT"
M="$OUT/models"

echo "== 1/4 tiny models and tokenizers -> $M"
python -m library.tiny flux --variant dev --out "$M" > /dev/null
python -c "from library.tiny.images import write_shapes_dataset; write_shapes_dataset('$OUT/images', 12)"

MODELS=(--pretrained_model_name_or_path "$M/flux1-dev-tiny.safetensors" --clip_l "$M/clip_l.safetensors"
        --t5xxl "$M/t5xxl.safetensors" --ae "$M/ae.safetensors" --tokenizer_cache_dir "$M/tokenizers")

echo "== 2/4 training (accelerate launch flux_train_network.py)"
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  --num_cpu_threads_per_process 2 flux_train_network.py "${MODELS[@]}" \
  --dataset_config configs/quickstart/dataset.toml --output_dir "$OUT/lora" --output_name quickstart_lora \
  --network_module networks.lora_flux --network_dim 8 --network_alpha 8 --network_train_unet_only \
  --learning_rate 2e-3 --optimizer_type AdamW --lr_scheduler constant --max_train_epochs 5 \
  --save_every_n_epochs 2 --cache_latents --cache_text_encoder_outputs --t5xxl_max_token_length 32 \
  --guidance_scale 1.0 --timestep_sampling shift --discrete_flow_shift 3.1582 --model_prediction_type raw \
  --sample_prompts configs/quickstart/prompts.txt --sample_every_n_epochs 1 --sample_at_first \
  --logging_dir "$OUT/logs" --seed 42 --max_data_loader_n_workers 1

echo "== 3/4 inference without and with the LoRA"
INFER=(python flux_minimal_inference.py --ckpt "$M/flux1-dev-tiny.safetensors" --clip_l "$M/clip_l.safetensors"
       --t5xxl "$M/t5xxl.safetensors" --ae "$M/ae.safetensors" --tokenizer_cache_dir "$M/tokenizers"
       --prompt "a red circle on a blue background" --width 128 --height 128 --steps 8 --guidance 1.0
       --seed 1 --dtype float32 --t5xxl_max_token_length 32)
"${INFER[@]}" --out "$OUT/without_lora.png"
"${INFER[@]}" --out "$OUT/with_lora.png" --lora "$OUT/lora/quickstart_lora.safetensors;1.0"

echo "== 4/4 done"
echo "LoRA:            $OUT/lora/quickstart_lora.safetensors"
echo "samples:         $OUT/lora/sample/index.html  (open in a browser)"
echo "loss log:        $OUT/lora/quickstart_lora_log.jsonl   tensorboard: tensorboard --logdir $OUT/logs"
echo "inference:       $OUT/without_lora.png  $OUT/with_lora.png"
