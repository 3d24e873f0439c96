#!/usr/bin/env bash
# The whole vlmtune workflow on CPU, in a few minutes, ending with a model that has learned something:
#   make-tiny (tiny models + a synthetic task: which colour is the drawn shape? only the image says)
#   -> data check -> pretrain -> held-out accuracy before finetuning
#   -> QLoRA + CLIP LoRA finetune (DeepSpeed ZeRO-2, 2 processes) -> convert (xtuner + huggingface layouts)
#   -> merge (LLM and CLIP) -> chat about a held-out image -> held-out MMBench accuracy after -> summary
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
accuracy() {  # the headline (circular) Overall accuracy of the newest mmbench run in $1
  python -c 'import json, pathlib, sys
run = sorted(p for p in pathlib.Path(sys.argv[1]).iterdir() if p.is_dir())[-1]
rows = json.loads(next(run.glob("*_acc.json")).read_text())["accuracy"]
print(format(next(r["Overall"] for r in rows if r["eval"] == "circular"), ".3f"))' "$1"
}
HELDOUT="$T/task/heldout_mmbench.tsv"

step "1/9 tiny offline models, example data and the synthetic task -> $T"
vlmtune make-tiny "$T"

step "2/9 data check"
vlmtune data check "$T/task/finetune.json" --image-folder "$T/task" --config tiny_llava_task_finetune_qlora \
  --report "$W/data_check.json"

step "3/9 pretrain the projector (DeepSpeed ZeRO-2, $NPROC processes)"
NPROC_PER_NODE="$NPROC" vlmtune train tiny_llava_task_pretrain --deepspeed deepspeed_zero2 --work-dir "$W/pretrain"
PRE="$(last_ckpt "$W/pretrain")"

step "4/9 held-out accuracy before finetuning (the pretrained projector alone)"
vlmtune convert pth_to_hf "$PRE" "$W/pretrain_hf"
vlmtune mmbench "$T/llm" --llava "$W/pretrain_hf" --data-path "$HELDOUT" --work-dir "$W/mmbench_before"

step "5/9 finetune: QLoRA on the LLM + LoRA on CLIP, from $PRE"
NPROC_PER_NODE="$NPROC" vlmtune train tiny_llava_task_finetune_qlora --deepspeed deepspeed_zero2 --work-dir "$W/finetune" \
  --cfg-options "pretrained_pth=$PRE"
FT="$(last_ckpt "$W/finetune")"

step "6/9 convert $FT (xtuner and huggingface layouts)"
vlmtune convert pth_to_hf "$FT" "$W/hf"
vlmtune convert pth_to_hf "$FT" "$W/hf_llava" --save-format huggingface

step "7/9 merge the adapters into the LLM and into CLIP"
vlmtune convert merge "$T/llm" "$W/hf/llm_adapter" "$W/merged_llm"
vlmtune convert merge "$T/clip" "$W/hf/visual_encoder_adapter" "$W/merged_clip" --is-clip

step "8/9 chat about a held-out image"
IMAGE="images/heldout_0000.png"
vlmtune chat "$T/llm" --llava "$W/hf" --image "$T/task/$IMAGE" \
  --prompt "What colour is the shape in the picture?" --max-new-tokens 8 | tee "$W/chat.txt"
TRUTH="$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]]["colour"])' "$T/task/labels.json" "$IMAGE")"

step "9/9 held-out MMBench accuracy after finetuning"
vlmtune mmbench "$T/llm" --llava "$W/hf" --data-path "$HELDOUT" --work-dir "$W/mmbench" --batch-size 8

step "summary"
cat <<EOF
tiny models and data : $T   (synthetic task: $T/task)
pretrain checkpoint  : $PRE   (loss curve: $W/pretrain/loss_curve.png)
finetune checkpoint  : $FT   (loss curve: $W/finetune/loss_curve.png)
xtuner layout        : $W/hf    (llm_adapter/, visual_encoder_adapter/, projector/)
huggingface layout   : $W/hf_llava   (LlavaForConditionalGeneration + processor)
merged LLM / CLIP    : $W/merged_llm  $W/merged_clip
chat ($IMAGE, a $TRUTH shape): $(tail -n 1 "$W/chat.txt")
held-out accuracy    : before finetuning $(accuracy "$W/mmbench_before")  after $(accuracy "$W/mmbench")  (chance 0.25, 48 questions)
mmbench results      : $(ls -d "$W"/mmbench/*/ | tail -n 1)
EOF
echo "quickstart: done. Activate the environment with: source .venv/bin/activate" >&2
