"""Assemble a trained model for inference from the CLI's model flags (chat, mmbench).

Two sources, as XTuner's chat takes them, plus transformers' layout:
    LLM (folder or hub id) [+ --adapter] + --llava DIR (XTuner's layout, convert/xtuner.py: llm_adapter/,
        visual_encoder_adapter/ or visual_encoder/, projector/) + --visual-encoder
    a `convert pth_to_hf --save-format huggingface` folder, given as the LLM (convert/huggingface.py)
Settings not given as flags (template, system, select layer, image padding) come from the
`vlmtune_config.py` that convert writes beside the weights (read as data).
"""
from __future__ import annotations

from pathlib import Path

import torch

from vlmtune.convert import huggingface, xtuner
from vlmtune.convert.parts import CONFIG_FILE, saved_config
from vlmtune.data.image import ImagePreprocessor
from vlmtune.data.templates import get_template
from vlmtune.errors import UserError
from vlmtune.inference import Generator
from vlmtune.model.build import resolve_dtype


def load_generator(args) -> Generator:
    """A Generator for the model flags of `vlmtune chat` / `vlmtune mmbench` (see cli._add_model_args)."""
    folder = Path(args.model_name_or_path)
    hf_layout = huggingface.is_layout(folder)
    llava = None if hf_layout else xtuner.llava_folder(args.llava)
    cfg = saved_config(folder if hf_layout else llava)
    name = args.prompt_template or (cfg.data.prompt_template if cfg else None)
    if name is None:
        raise UserError(f"no --prompt-template given and no {CONFIG_FILE} beside the model to take it from")
    template = get_template(name)
    dtype, device = resolve_dtype(args.torch_dtype), resolve_device(args.device)
    if hf_layout:
        model, tokenizer, image_processor, pad = huggingface.load(args, folder, dtype)
    else:
        model, tokenizer, image_processor = xtuner.load(args, llava, cfg, dtype, device)
        pad = cfg.data.pad_image_to_square if cfg else True  # LLaVA-1.5 / XTuner chat pad to square
    if args.bits is None:
        model.to(device)
    else:  # the quantized LLM was loaded onto `device` by bitsandbytes; it cannot be moved
        model.visual_encoder.to(device)
        model.projector.to(device)
    system = args.system or (cfg.data.system if cfg else "")
    method = cfg.data.image_preprocess if cfg else "hf"  # as trained; a model from elsewhere gets its processor's own
    pinpoints = model.anyres.pinpoints if model.anyres is not None else None  # AnyRes tiles as the model was trained
    preprocess = ImagePreprocessor(image_processor, pad_to_square=pad, method=method, pinpoints=pinpoints)
    return Generator(model.eval(), tokenizer, template, preprocess, model.image_length, system)


def resolve_device(name: str) -> torch.device:
    """`auto` = the current GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
