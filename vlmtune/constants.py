"""Token-level constants shared with LLaVA and XTuner (their checkpoints and data rely on these values)."""

IGNORE_INDEX = -100  # label value the loss skips (torch CrossEntropyLoss default ignore_index)
IMAGE_TOKEN_INDEX = -200  # placeholder id in input_ids where an image's features are spliced in
DEFAULT_IMAGE_TOKEN = "<image>"  # the text marker for an image in LLaVA JSON conversations
