# LLaVA with SigLIP so400m-patch14-384 and Qwen2-7B-Instruct (LLaVA-OneVision-like), stage 1 (pretrain): train
# the projector on LLaVA-Pretrain 558K, LLM frozen in 4-bit, SigLIP frozen.
#   NPROC_PER_NODE=8 vlmtune train llava_qwen2_7b_instruct_siglip_so400m_p14_384_e1_gpu8_pretrain --deepspeed deepspeed_zero2
# SigLIP has no CLS token: every one of its 27 x 27 = 729 patches is a feature ('full', the default for it).
# Layer convention: vlmtune keeps all 27 layers and takes hidden state -2 (the output of layer 26); LLaVA-OneVision
# deletes the last layer and takes -1: the same features. The huggingface export keeps the 27 layers and
# vision_feature_layer -2, which transformers' Llava runs to the same outputs.
# Model
llm_name_or_path = 'Qwen/Qwen2-7B-Instruct'
visual_encoder_name_or_path = 'google/siglip-so400m-patch14-384'
quantization = '4bit'
freeze_llm = True
freeze_visual_encoder = True
visual_select_layer = -2
vision_feature_select_strategy = 'full'
projector_depth = 2

# Data (layout: docs/en/data.md)
data_root = './data/llava_data/'
data_path = data_root + 'LLaVA-Pretrain/blip_laion_cc_sbu_558k.json'
image_folder = data_root + 'LLaVA-Pretrain/images'
prompt_template = 'qwen_chat'
max_length = 2048  # includes the 729 image tokens
pad_image_to_square = False
group_by_length = False

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
