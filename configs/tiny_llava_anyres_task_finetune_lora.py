# Tiny CPU version of the AnyRes recipe on the synthetic task's anyres.json: the same colour questions on images
# of six aspect ratios, each tiled into its best grid (1x2, 2x1, 1x3, 3x1 or 2x2 tiles of 336 px plus the
# overview), so the images of one batch take different numbers of tokens (known from their headers at the build).
_base_ = ['./tiny_llava_task_finetune_lora.py']
data_path = '{{$VLMTUNE_TINY_DIR:./work_dirs/tiny}}/task/anyres.json'
image_aspect_ratio = 'anyres'
image_grid_pinpoints = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
max_length = 3072  # an image takes at most 2928 positions (the 2x2 grid), plus the prompt
