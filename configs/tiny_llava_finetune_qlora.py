# Tiny CPU QLoRA finetune: the LLM loaded 4-bit nf4 (bitsandbytes) with LoRA, CLIP LoRA, projector trained.
_base_ = ['./tiny_llava_finetune_lora.py']
quantization = '4bit'
