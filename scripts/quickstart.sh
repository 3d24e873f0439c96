#!/usr/bin/env bash
# The whole vlmtune workflow on the bundled tiny example, on CPU, in a few minutes:
#   make-tiny -> data check -> pretrain -> QLoRA + CLIP LoRA finetune (DeepSpeed ZeRO-2, 2 processes)
#   -> convert (xtuner + huggingface layouts) -> merge (LLM and CLIP) -> chat -> mmbench -> summary
# Usage: bash scripts/quickstart.sh [WORK_DIR]        (default work_dirs/quickstart; rerunning starts over)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh"
set -euo pipefail
cd "$ROOT"

W="${1:-work_dirs/quickstart}"
rm -rf "$W"
export VLMTUNE_TINY_DIR="$W/tiny"
T="$VLMTUNE_TINY_DIR"
NPROC="${QUICKSTART_NPROC:-2}"
PORT="${PORT:-$((29500 + RANDOM % 1000))}"
export PORT
step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
last_ckpt() { ls "$1"/iter_*.pth | sort -V | tail -n 1; }

step "1/8 tiny offline models + example data -> $T"
vlmtune make-tiny "$T"

step "2/8 data check"
vlmtune data check "$T/data/finetune.json" --image-folder "$T/data" --config tiny_llava_finetune_qlora \
  --report "$W/data_check.json"

step "3/8 pretrain the projector (DeepSpeed ZeRO-2, $NPROC processes)"
NPROC_PER_NODE="$NPROC" vlmtune train tiny_llava_pretrain --deepspeed deepspeed_zero2 --work-dir "$W/pretrain"
PRE="$(last_ckpt "$W/pretrain")"

step "4/8 finetune: QLoRA on the LLM + LoRA on CLIP, from $PRE"
NPROC_PER_NODE="$NPROC" vlmtune train tiny_llava_finetune_qlora --deepspeed deepspeed_zero2 --work-dir "$W/finetune" \
  --cfg-options "pretrained_pth=$PRE"
FT="$(last_ckpt "$W/finetune")"

step "5/8 convert $FT (xtuner and huggingface layouts)"
vlmtune convert pth_to_hf tiny_llava_finetune_qlora "$FT" "$W/hf"
vlmtune convert pth_to_hf tiny_llava_finetune_qlora "$FT" "$W/hf_llava" --save-format huggingface

step "6/8 merge the adapters into the LLM and into CLIP"
vlmtune convert merge "$T/llm" "$W/hf/llm_adapter" "$W/merged_llm"
vlmtune convert merge "$T/clip" "$W/hf/visual_encoder_adapter" "$W/merged_clip" --is-clip

step "7/8 chat about a photo"
vlmtune chat "$T/llm" --visual-encoder "$T/clip" --llava "$W/hf" --prompt-template internlm2_chat \
  --image "$T/data/images/chelsea.jpg" --prompt "What animal is in the photo?" --max-new-tokens 16 | tee "$W/chat.txt"

step "8/8 MMBench-format evaluation"
vlmtune mmbench "$T/llm" --visual-encoder "$T/clip" --llava "$W/hf" --prompt-template internlm2_chat \
  --data-path vlmtune/assets/example/mmbench_dev_en_tiny.tsv --work-dir "$W/mmbench" --batch-size 4

step "summary"
cat <<EOF
tiny models and data : $T
pretrain checkpoint  : $PRE   (loss curve: $W/pretrain/loss_curve.png)
finetune checkpoint  : $FT   (loss curve: $W/finetune/loss_curve.png)
xtuner layout        : $W/hf    (llm_adapter/, visual_encoder_adapter/, projector/)
huggingface layout   : $W/hf_llava   (LlavaForConditionalGeneration + processor)
merged LLM / CLIP    : $W/merged_llm  $W/merged_clip
chat answer          : $(cat "$W/chat.txt" | tail -n 1)
mmbench results      : $(ls -d "$W"/mmbench/*/ | tail -n 1)
$(cat "$(ls -d "$W"/mmbench/*/ | tail -n 1)"/*_acc.csv 2>/dev/null || true)
EOF
echo "quickstart: done. Activate the environment with: source .venv/bin/activate" >&2
