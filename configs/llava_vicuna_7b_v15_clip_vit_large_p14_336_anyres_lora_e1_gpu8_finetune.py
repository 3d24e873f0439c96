# LLaVA-NeXT-style (LLaVA-v1.6) AnyRes finetune of Vicuna-7B + CLIP-L/336: each image is resized into the best
# of five grids (1x2, 2x1, 2x2, 3x1, 1x3 tiles of 336 px) plus a 336 px overview, its features unpadded and a
# learned image_newline closing every row: 576 + up to 2352 positions per image (at most 2928) instead of 576.
# LoRA on the LLM and CLIP, projector and image_newline trained fully, from the LLaVA-1.5 pretrain's projector
# (the newline starts fresh, as in LLaVA-NeXT). Global batch 8 GPUs x 4 x 4 = 128 and max_length 4096, LLaVA-NeXT's.
#   NPROC_PER_NODE=8 vlmtune train llava_vicuna_7b_v15_clip_vit_large_p14_336_anyres_lora_e1_gpu8_finetune --deepspeed deepspeed_zero2
_base_ = ['./llava_vicuna_7b_v15_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune.py']
quantization = None  # LoRA over bf16 weights: AnyRes sequences are long, and 4-bit dequantisation would slow every one
llm_lora = dict(r=128, lora_alpha=256, lora_dropout=0.05, bias='none')
image_aspect_ratio = 'anyres'
image_grid_pinpoints = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]  # transformers' LlavaNext default
pad_image_to_square = False  # the base pads (LLaVA-1.5); AnyRes tiles each image at its own aspect ratio
max_length = 4096  # counts every image at its own grid's positions (read from the image headers when the data is first read)
batch_size = 4  # per device
accumulative_counts = 4
use_gradient_checkpointing = True
