# Tiny CPU full finetune on the synthetic task: the whole LLM, CLIP and the projector train.
# Which colour is the shape? Only the image says; held-out accuracy shows the pipeline learns.
_base_ = ['./tiny_llava_task_pretrain.py']
data_path = '{{$VLMTUNE_TINY_DIR:./work_dirs/tiny}}/task/finetune.json'
prompt_template = 'internlm2_chat'
freeze_llm = False
freeze_visual_encoder = False
lr = 3e-3
max_epochs = 3
evaluation_inputs = ['What colour is the shape in the picture?']
pretrained_pth = None  # the task pretrain's iter_N.pth, e.g. with --cfg-options pretrained_pth=...
max_norm = 5.0
