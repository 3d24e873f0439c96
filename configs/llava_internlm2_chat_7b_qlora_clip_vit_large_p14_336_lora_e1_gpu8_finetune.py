# LLaVA-InternLM2-7B, stage 2 (finetune): QLoRA on the LLM, LoRA on CLIP, projector trained fully, on
# llava_v1_5_mix665k. Mirrors XTuner's config of the same name (8 GPUs x batch 16, lr 2e-4, LLM LoRA r512/alpha256,
# CLIP LoRA r64/alpha16, pad-to-square, length-grouped sampler).
#   NPROC_PER_NODE=8 vlmtune train llava_internlm2_chat_7b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune --deepspeed deepspeed_zero2
# Model
llm_name_or_path = 'internlm/internlm2-chat-7b'
visual_encoder_name_or_path = 'openai/clip-vit-large-patch14-336'
trust_remote_code = True
quantization = '4bit'
freeze_llm = True
freeze_visual_encoder = True
llm_lora = dict(r=512, lora_alpha=256, lora_dropout=0.05, bias='none')
visual_encoder_lora = dict(r=64, lora_alpha=16, lora_dropout=0.05, bias='none')
visual_select_layer = -2
# the pretrain stage's last checkpoint (iter_2181.pth = 558K / 256 per step)
pretrained_pth = './work_dirs/llava_internlm2_chat_7b_clip_vit_large_p14_336_e1_gpu8_pretrain/iter_2181.pth'

# Data
data_root = './data/llava_data/'
data_path = data_root + 'LLaVA-Instruct-150K/llava_v1_5_mix665k.json'
image_folder = data_root + 'llava_images'
prompt_template = 'internlm2_chat'
max_length = 2048  # includes the 576 image tokens (XTuner: int(2048 - (336 / 14)**2) text tokens)
pad_image_to_square = True
group_by_length = True

# Scheduler & optimizer
batch_size = 16  # per device
accumulative_counts = 1
dataloader_num_workers = 4
max_epochs = 1
lr = 2e-4
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
