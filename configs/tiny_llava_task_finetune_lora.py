# Tiny CPU LoRA finetune on the synthetic task: LoRA on the LLM and on CLIP, projector trained fully.
_base_ = ['./tiny_llava_task_finetune_full.py']
freeze_llm = True
freeze_visual_encoder = True
llm_lora = dict(r=16, lora_alpha=32, lora_dropout=0.0)
visual_encoder_lora = dict(r=4, lora_alpha=8, lora_dropout=0.0)
max_epochs = 5  # LoRA moves less per step than a full finetune: 5 epochs answer the free question too
