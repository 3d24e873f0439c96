# Tiny CPU version of the multi-image recipe on the synthetic task's multi.json: two-image records whose tags
# sit inside the text (interleaved), one-image and text-only records, mixed in every batch.
_base_ = ['./tiny_llava_task_finetune_lora.py']
data_path = '{{$VLMTUNE_TINY_DIR:./work_dirs/tiny}}/task/multi.json'
max_length = 1536  # two images of 576 tokens + the prompt
