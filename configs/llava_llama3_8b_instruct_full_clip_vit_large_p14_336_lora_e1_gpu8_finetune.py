# LLaVA-Llama-3-8B-Instruct, stage 2 (finetune): the full LLM trains (bf16), LoRA on CLIP, projector trained,
# on llava_v1_5_mix665k. Global batch 128 (8 GPUs x 4 x accumulation 4) at lr 2e-5, as LLaVA-1.5's full finetune.
# Needs ZeRO-2 with enough GPU memory (80 GB cards) or deepspeed_zero3 / _offload on smaller ones.
#   NPROC_PER_NODE=8 vlmtune train llava_llama3_8b_instruct_full_clip_vit_large_p14_336_lora_e1_gpu8_finetune --deepspeed deepspeed_zero2
# Model
llm_name_or_path = 'meta-llama/Meta-Llama-3-8B-Instruct'
visual_encoder_name_or_path = 'openai/clip-vit-large-patch14-336'
freeze_llm = False
freeze_visual_encoder = True
visual_encoder_lora = dict(r=64, lora_alpha=16, lora_dropout=0.05, bias='none')
visual_select_layer = -2
use_gradient_checkpointing = True
pretrained_pth = './work_dirs/llava_llama3_8b_instruct_clip_vit_large_p14_336_e1_gpu8_pretrain/iter_2181.pth'

# Data
data_root = './data/llava_data/'
data_path = data_root + 'LLaVA-Instruct-150K/llava_v1_5_mix665k.json'
image_folder = data_root + 'llava_images'
prompt_template = 'llama3_chat'
max_length = 2048  # includes the 576 image tokens
pad_image_to_square = True
group_by_length = True

# Scheduler & optimizer
batch_size = 4  # per device
accumulative_counts = 4
dataloader_num_workers = 4
max_epochs = 1
lr = 2e-5
betas = (0.9, 0.999)
weight_decay = 0.0
max_norm = 1.0
warmup_ratio = 0.03

# Save, log, evaluate
save_steps = 500
save_total_limit = 2
logging_interval = 10
evaluation_freq = 500
evaluation_images = [data_root + 'llava_images/coco/train2017/000000033471.jpg']
evaluation_inputs = ['请描述一下这张照片', 'Please describe this picture']
