# LLaVA-Llama-3-8B-Instruct, multi-image finetune (LLaVA-NeXT-Interleave-style): records with an `image` list and
# one <image> per image, tags kept where the text puts them when a turn has several; one-image and text-only
# records train alongside. From a stage-1 projector (llava_llama3_8b_instruct_clip_vit_large_p14_336_e1_gpu8_pretrain).
# Data: the M4-Instruct json of LLaVA-NeXT-Interleave, or your own in that format (docs/en/data.md).
#   NPROC_PER_NODE=8 vlmtune train llava_llama3_8b_instruct_clip_vit_large_p14_336_multi_image_lora_e1_gpu8_finetune --deepspeed deepspeed_zero2
_base_ = ['./llava_llama3_8b_instruct_clip_vit_large_p14_336_e1_gpu8_pretrain.py']
quantization = None
llm_lora = dict(r=128, lora_alpha=256, lora_dropout=0.05, bias='none')
visual_encoder_lora = dict(r=64, lora_alpha=16, lora_dropout=0.05, bias='none')
use_gradient_checkpointing = True
pretrained_pth = './work_dirs/llava_llama3_8b_instruct_clip_vit_large_p14_336_e1_gpu8_pretrain/iter_2181.pth'
data_root = './data/llava_data/'
data_path = data_root + 'M4-Instruct/m4_instruct_annotations.json'
image_folder = data_root + 'M4-Instruct/images'
max_length = 8192  # up to ~12 images of 576 tokens with their text
pad_image_to_square = True
group_by_length = True
batch_size = 2
accumulative_counts = 8
lr = 2e-4
