#!/bin/bash
# Switch-KD finetuning with TinyLLaVA Factory, shaped like the Factory's finetune scripts.
#
#   bash scripts/train_switchkd.sh
#       No arguments: the built-in demo (tiny teacher and students on a synthetic visual task,
#       CPU, a few minutes): python -m switchkd_plugin.demo
#
#   bash scripts/train_switchkd.sh DATA_PATH IMAGE_PATH [LLM_VERSION VT_VERSION VT_VERSION2 \
#       CN_VERSION CONV_VERSION VERSION TRAIN_RECIPE MODEL_MAX_LENGTH] [-- EXTRA FLAGS...]
#       The Factory's ten finetune arguments (omitted ones default to the paper's main setting:
#       Qwen2.5-0.5B + SigLIP-so400m-patch14-384 + mlp2x_gelu, LLaVA-mix-665k), then any extra
#       Factory / Switch-KD flags after `--`.
#
# Environment (defaults in brackets):
#   FACTORY_DIR      TinyLLaVA Factory checkout, patched with `switchkd-patch apply` [required]
#   TEACHER_PATH     teacher TinyLLaVA checkpoint (Qwen2.5-3B + same vision tower) [required]
#   PRETRAINED_PATH  the student's pretrain-stage checkpoint [checkpoints/tiny-llava-$VERSION-pretrain]
#   OUTPUT_DIR       [checkpoints/tiny-llava-$VERSION-switchkd-finetune]
#   SWITCHKD_CONFIG  Switch-KD settings file [configs/switchkd.yaml of this repo]
#   DEEPSPEED_CONFIG [configs/zero3.json of this repo]
#   LAUNCHER_ARGS    DeepSpeed launcher arguments [--include localhost:0,1,2,3,4,5,6,7 --master_port 29501];
#                    multi-node: "--hostfile hostfile --master_addr HOST0 --master_port 29501"
#   BATCH_SIZE [8]  GRAD_ACCUM [4]  LEARNING_RATE [2e-5]  EPOCHS [1]
set -euo pipefail
PLUGIN_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ $# -eq 0 ]; then
    exec python -m switchkd_plugin.demo
fi

POSITIONAL=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do POSITIONAL+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
EXTRA=("$@")
if [ ${#POSITIONAL[@]} -lt 2 ] || [ ${#POSITIONAL[@]} -gt 10 ]; then
    sed -n '2,28p' "$0" >&2
    exit 2
fi
set -- "${POSITIONAL[@]}"
DATA_PATH="$1"
IMAGE_PATH="$2"
LLM_VERSION="${3:-Qwen/Qwen2.5-0.5B}"
VT_VERSION="${4:-google/siglip-so400m-patch14-384}"
VT_VERSION2="${5:-}"
CN_VERSION="${6:-mlp2x_gelu}"
CONV_VERSION="${7:-qwen2_base}"
VERSION="${8:-qwen2.5-0_5b-switchkd}"
TRAIN_RECIPE="${9:-common}"
MODEL_MAX_LENGTH="${10:-2048}"

: "${FACTORY_DIR:?set FACTORY_DIR to your TinyLLaVA Factory checkout (patched: switchkd-patch apply \$FACTORY_DIR)}"
: "${TEACHER_PATH:?set TEACHER_PATH to the teacher TinyLLaVA checkpoint directory}"
PRETRAINED_PATH="${PRETRAINED_PATH:-checkpoints/tiny-llava-${VERSION}-pretrain}"
OUTPUT_DIR="${OUTPUT_DIR:-checkpoints/tiny-llava-${VERSION}-switchkd-finetune}"
SWITCHKD_CONFIG="${SWITCHKD_CONFIG:-$PLUGIN_DIR/configs/switchkd.yaml}"
DEEPSPEED_CONFIG="${DEEPSPEED_CONFIG:-$PLUGIN_DIR/configs/zero3.json}"
read -r -a LAUNCHER <<< "${LAUNCHER_ARGS:---include localhost:0,1,2,3,4,5,6,7 --master_port 29501}"

switchkd-patch check "$FACTORY_DIR" >/dev/null || {
    echo "TinyLLaVA Factory at $FACTORY_DIR is not patched: run  switchkd-patch apply $FACTORY_DIR" >&2
    exit 1
}
cd "$FACTORY_DIR"
# --group_by_modality_length True, as the Factory's finetune.sh: on data of one modality (no
# text-only sample) the plugin groups by length alone and logs it (the Factory's sampler crashes).
deepspeed "${LAUNCHER[@]}" tinyllava/train/train.py \
    --distill switchkd \
    --teacher_model_path "$TEACHER_PATH" \
    --switchkd_config "$SWITCHKD_CONFIG" \
    --deepspeed "$DEEPSPEED_CONFIG" \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_PATH" \
    --is_multimodal True \
    --conv_version "$CONV_VERSION" \
    --model_name_or_path "$LLM_VERSION" \
    --vision_tower "$VT_VERSION" \
    --vision_tower2 "$VT_VERSION2" \
    --connector_type "$CN_VERSION" \
    --mm_vision_select_layer -2 \
    --image_aspect_ratio square \
    --attn_implementation flash_attention_2 \
    --bf16 True \
    --training_recipe "$TRAIN_RECIPE" \
    --tune_type_llm full \
    --tune_type_vision_tower full \
    --tune_vision_tower_from_layer 0 \
    --tune_type_connector full \
    --group_by_modality_length True \
    --pretrained_model_path "$PRETRAINED_PATH" \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs "${EPOCHS:-1}" \
    --per_device_train_batch_size "${BATCH_SIZE:-8}" \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps "${GRAD_ACCUM:-4}" \
    --save_strategy "steps" \
    --save_steps 50000 \
    --save_total_limit 1 \
    --learning_rate "${LEARNING_RATE:-2e-5}" \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --tf32 False \
    --model_max_length "$MODEL_MAX_LENGTH" \
    --gradient_checkpointing True \
    --dataloader_num_workers 8 \
    --lazy_preprocess True \
    --report_to tensorboard \
    --tokenizer_use_fast False \
    --run_name "tiny-llava-${VERSION}-switchkd-finetune" \
    "${EXTRA[@]}"
