# Tiny CPU full-LLM finetune: the whole LLM trains, LoRA on CLIP, projector trained fully (the shape of XTuner's
# llava_llama3_8b_instruct_full_clip_vit_large_p14_336_lora_e1_gpu8_finetune), over the bundled example photos.
_base_ = ['./tiny_llava_finetune_lora.py']
freeze_llm = False
llm_lora = None
