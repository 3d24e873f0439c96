# Tiny CPU version of the SigLIP recipe on the synthetic task: the tiny SigLIP (384 px, 729 tokens, no CLS,
# 'full' features), LoRA on the LLM and on SigLIP, projector trained (no pretrain stage: the finetune trains it).
_base_ = ['./tiny_llava_task_finetune_lora.py']
visual_encoder_name_or_path = '{{$VLMTUNE_TINY_DIR:./work_dirs/tiny}}/siglip'
vision_feature_select_strategy = 'full'
max_length = 1280  # 729 image tokens + the prompt
