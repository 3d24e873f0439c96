# Tiny CPU pretrain on the synthetic task (`vlmtune make-tiny` writes it): the projector learns to caption
# drawn shapes ("A red circle on a grey background."), LLM and CLIP frozen.
_base_ = ['./tiny_llava_pretrain.py']
data_path = '{{$VLMTUNE_TINY_DIR:./work_dirs/tiny}}/task/pretrain.json'
image_folder = '{{$VLMTUNE_TINY_DIR:./work_dirs/tiny}}/task'
batch_size = 4  # per process: 2 processes (the quickstart) make a global batch of 8
max_epochs = 1
lr = 2e-3
warmup_ratio = 0.05
save_steps = 1000
logging_interval = 8
evaluation_images = ['{{$VLMTUNE_TINY_DIR:./work_dirs/tiny}}/task/images/heldout_0000.png']
evaluation_inputs = ['Describe the picture.']
evaluation_freq = 1000
