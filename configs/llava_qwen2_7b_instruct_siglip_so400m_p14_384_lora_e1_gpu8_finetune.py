# LLaVA with SigLIP so400m-patch14-384 and Qwen2-7B-Instruct, stage 2 (finetune) on llava_v1_5_mix665k: LoRA on
# the LLM (bf16, not 4-bit) and on SigLIP's own linear layers (its pooling head is not built), projector trained.
# SigLIP's activations overflow fp16: train in bf16 (torch_dtype 'auto' picks bf16 on GPUs that have it).
#   NPROC_PER_NODE=8 vlmtune train llava_qwen2_7b_instruct_siglip_so400m_p14_384_lora_e1_gpu8_finetune --deepspeed deepspeed_zero2
_base_ = ['./llava_qwen2_7b_instruct_siglip_so400m_p14_384_e1_gpu8_pretrain.py']
quantization = None
llm_lora = dict(r=128, lora_alpha=256, lora_dropout=0.05, bias='none')
visual_encoder_lora = dict(r=64, lora_alpha=16, lora_dropout=0.05, bias='none')
use_gradient_checkpointing = True
pretrained_pth = './work_dirs/llava_qwen2_7b_instruct_siglip_so400m_p14_384_e1_gpu8_pretrain/iter_2181.pth'
data_root = './data/llava_data/'
data_path = data_root + 'LLaVA-Instruct-150K/llava_v1_5_mix665k.json'
image_folder = data_root + 'llava_images'
pad_image_to_square = True
group_by_length = True
batch_size = 16
lr = 2e-4
