"""What every layout of `convert pth_to_hf` writes from a trained LlavaModel, and the config saved beside it.

`vlmtune_config.py` (CONFIG_FILE) holds the resolved training config; `vlmtune chat` reads it back, as data
(`config.config_from_text`), never executed. The layouts themselves: convert/xtuner.py, convert/huggingface.py,
convert/official.py; their key names: convert/keymaps.py.
"""
from __future__ import annotations

from pathlib import Path

import torch

from vlmtune.config import Config, config_from_text
from vlmtune.constants import DEFAULT_IMAGE_TOKEN
from vlmtune.model.build import load_tokenizer
from vlmtune.model.llava import LlavaModel

CONFIG_FILE = "vlmtune_config.py"


def write_config(cfg: Config, save_dir: Path) -> None:
    """The resolved training config (template, image padding, paths) beside the converted weights."""
    (save_dir / CONFIG_FILE).write_text(cfg.text + f"config_name = {cfg.name!r}\n", encoding="utf-8")


def saved_config(folder: Path | None) -> Config | None:
    """The training config convert saved in `folder` (None when there is none)."""
    if folder is None or not (folder / CONFIG_FILE).is_file():
        return None
    return config_from_text((folder / CONFIG_FILE).read_text(encoding="utf-8"), str(folder / CONFIG_FILE))


def trained_parts(cfg: Config) -> dict[str, str | None]:
    """How each part trained: 'lora', 'full' or None (frozen); the projector always trains."""
    m = cfg.model
    return {
        "llm": "lora" if m.llm_lora is not None else (None if m.freeze_llm else "full"),
        "visual_encoder": "lora" if m.visual_encoder_lora is not None else (None if m.freeze_visual_encoder else "full"),
    }


def prefixed(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """`module`'s state dict with `prefix` in front of every key (a LlavaModel part under its LlavaModel name)."""
    return {prefix + k: v for k, v in module.state_dict().items()}


def merged_parts(model: LlavaModel):
    """(LLM, CLIP) with LoRA merged in: plain transformers models (the LlavaModel is consumed)."""
    llm, clip = model.llm, model.visual_encoder
    if hasattr(llm, "merge_and_unload"):
        llm = llm.merge_and_unload()
    if hasattr(clip, "merge_and_unload"):
        clip = clip.merge_and_unload()
    return llm, clip


def tokenizer_with_image_token(cfg: Config, llm):
    """The LLM's tokenizer with `<image>` as a special token; the LLM's embeddings grow if it was added."""
    from transformers import AddedToken

    tokenizer = load_tokenizer(cfg.model.llm_name_or_path, cfg.model.trust_remote_code)
    if DEFAULT_IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(DEFAULT_IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)  # new rows = mean of the old ones
    return tokenizer
