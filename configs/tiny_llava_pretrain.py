# Tiny CPU pretrain: projector only, LLM and CLIP frozen, over the bundled example photos.
# Models come from `vlmtune make-tiny` (default ./work_dirs/tiny, or $VLMTUNE_TINY_DIR).
llm_name_or_path = '{{$VLMTUNE_TINY_DIR:./work_dirs/tiny}}/llm'
visual_encoder_name_or_path = '{{$VLMTUNE_TINY_DIR:./work_dirs/tiny}}/clip'
data_path = '{{$VLMTUNE_TINY_DIR:./work_dirs/tiny}}/data/pretrain.json'
image_folder = '{{$VLMTUNE_TINY_DIR:./work_dirs/tiny}}/data'
prompt_template = 'internlm2_chat'
max_length = 1024

freeze_llm = True
freeze_visual_encoder = True
torch_dtype = 'float32'
use_gradient_checkpointing = False

batch_size = 2
accumulative_counts = 1
dataloader_num_workers = 0
max_epochs = 8
lr = 1e-3
betas = (0.9, 0.999)
weight_decay = 0.0
max_norm = 1.0
warmup_ratio = 0.03
save_steps = 10
save_total_limit = 2
logging_interval = 2
seed = 42

evaluation_freq = 20
evaluation_images = ['{{$VLMTUNE_TINY_DIR:./work_dirs/tiny}}/data/images/chelsea.jpg']
evaluation_inputs = ['Describe the image.']
evaluation_max_new_tokens = 8
