# LLaVA-v1.5-7B (Vicuna), stage 1 (pretrain): train the projector on LLaVA-Pretrain 558K.
# Mirrors XTuner's config of the same name (8 GPUs x batch 32, lr 1e-3, LLM frozen in 4-bit, CLIP frozen).
#   NPROC_PER_NODE=8 vlmtune train llava_vicuna_7b_v15_clip_vit_large_p14_336_e1_gpu8_pretrain --deepspeed deepspeed_zero2
# Model
llm_name_or_path = 'lmsys/vicuna-7b-v1.5'
visual_encoder_name_or_path = 'openai/clip-vit-large-patch14-336'
trust_remote_code = False
quantization = '4bit'  # the frozen LLM only runs forward: 4-bit saves memory, as in XTuner
freeze_llm = True
freeze_visual_encoder = True
visual_select_layer = -2
projector_depth = 2

# Data (layout: docs/en/data.md)
data_root = './data/llava_data/'
data_path = data_root + 'LLaVA-Pretrain/blip_laion_cc_sbu_558k.json'
image_folder = data_root + 'LLaVA-Pretrain/images'
prompt_template = 'vicuna'
# vlmtune counts the 576 image tokens inside max_length: this equals XTuner's int(2048 - (336 / 14)**2) text budget
max_length = 2048
pad_image_to_square = False
group_by_length = False  # XTuner's pretrain uses a plain shuffled sampler

# Scheduler & optimizer
batch_size = 32  # per device
accumulative_counts = 1
dataloader_num_workers = 4
max_epochs = 1
lr = 1e-3
betas = (0.9, 0.999)
weight_decay = 0.0
max_norm = 1.0
warmup_ratio = 0.03

# Save, log, evaluate
save_steps = 500
save_total_limit = 2
logging_interval = 10
evaluation_freq = 500
evaluation_images = [data_root + 'LLaVA-Pretrain/images/00453/004539375.jpg']
evaluation_inputs = ['请描述一下这张照片', 'Please describe this picture']
