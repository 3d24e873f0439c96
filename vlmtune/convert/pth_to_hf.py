"""`vlmtune convert pth_to_hf`: a training checkpoint -> folders other tools load.

    checkpoint (iter_N.pth or iter_N.ds/, vlmtune's or XTuner's) + config -> build_model(quantize=False)
        -> load the trained weights -> one layout's `save`:
        xtuner (convert/xtuner.py), huggingface (convert/huggingface.py), official (convert/official.py)
Every layout also gets `vlmtune_config.py` (convert/parts.py), so `vlmtune chat` needs no more flags than the
folder. The model is rebuilt in full precision even for QLoRA: adapters trained on 4-bit weights are applied
to (and merged into) the real weights, as XTuner does.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from vlmtune.config import Config, load_config
from vlmtune.convert import huggingface, official, xtuner
from vlmtune.convert.parts import write_config
from vlmtune.errors import UserError
from vlmtune.model.build import build_model, resolve_dtype
from vlmtune.model.llava import LlavaModel
from vlmtune.weights import load_into_model, load_trained_weights

LAYOUTS = {"xtuner": xtuner.save, "huggingface": huggingface.save, "official": official.save}


def main(args) -> int:
    """CLI entry: load, convert, save in `--save-format`."""
    state_dict, saved_cfg = load_trained_weights(args.pth)
    cfg = load_config(args.config) if args.config else saved_cfg
    if cfg is None:
        raise UserError(f"{args.pth} carries no config; pass the training config: "
                        "vlmtune convert pth_to_hf CONFIG PTH SAVE_DIR")
    if args.trust_remote_code:
        cfg.model.trust_remote_code = True
    dtype = torch.float32 if args.fp32 else resolve_dtype(cfg.model.torch_dtype)
    model = load_trained_model(cfg, state_dict, str(args.pth), dtype)
    save_dir = Path(args.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    LAYOUTS[args.save_format](model, cfg, save_dir, args.max_shard_size)
    write_config(cfg, save_dir)
    print(f"saved {args.save_format} layout to {save_dir}")
    return 0


def load_trained_model(cfg: Config, state_dict: dict, source: str, dtype: torch.dtype) -> LlavaModel:
    """The config's model in full precision (`dtype`) with the checkpoint's trained weights loaded."""
    model_cfg = dataclasses.replace(cfg.model, torch_dtype=str(dtype).removeprefix("torch."))
    model = build_model(model_cfg, for_training=False, quantize=False)
    uncovered = load_into_model(model, state_dict, source)
    if uncovered:
        raise UserError(f"{source}: {len(uncovered)} trainable weights of this config are not in the checkpoint "
                        f"(first: {uncovered[0]!r}); is the config the one it was trained with?")
    return model.eval()
