# Tiny CPU QLoRA finetune on the synthetic task: the LLM loaded 4-bit nf4 (bitsandbytes) with LoRA, CLIP LoRA.
_base_ = ['./tiny_llava_task_finetune_lora.py']
quantization = '4bit'
