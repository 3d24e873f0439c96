# Tiny CPU finetune: LoRA on the LLM and on CLIP, projector trained fully, from the tiny pretrain.
_base_ = ['./tiny_llava_pretrain.py']
data_path = '{{$VLMTUNE_TINY_DIR:./work_dirs/tiny}}/data/finetune.json'
pad_image_to_square = True
freeze_llm = True
freeze_visual_encoder = True
llm_lora = dict(r=8, lora_alpha=16, lora_dropout=0.05)
visual_encoder_lora = dict(r=4, lora_alpha=8, lora_dropout=0.05)
lr = 2e-4
max_epochs = 4
pretrained_pth = None  # set to the pretrain's iter_N.pth, e.g. with --cfg-options pretrained_pth=...
