"""`vlmtune convert merge BASE ADAPTER SAVE_DIR [--is-clip]`: a peft LoRA adapter merged into its base model.

    base (AutoModelForCausalLM, or CLIPVisionModel with --is-clip), loaded fresh in its stored dtype
        -> model.peft.load_adapter (every adapter key placed; CLIP adapters in either transformers naming)
        -> merge_and_unload -> save (CLIP with transformers 4.x's `vision_model.` level) + tokenizer or processor
The base is always loaded fresh and unquantized: merging into a 4-bit model that already ran a forward pass
on CPU gives wrong weights (bitsandbytes repacks them), and a merged model is meant to be full precision.
"""
from __future__ import annotations

from pathlib import Path

import torch

from vlmtune.convert import keymaps
from vlmtune.errors import UserError
from vlmtune.weights import save_llm, save_model_renamed


def main(args) -> int:
    """CLI entry."""
    merged, processor = merge_adapter(args.model_name_or_path, args.adapter_name_or_path, args.is_clip,
                                      args.device, args.trust_remote_code)
    save_dir = Path(args.save_dir)
    if args.is_clip:  # with transformers 4.x's `vision_model.` level, which XTuner, LLaVA and transformers 5 read
        save_model_renamed(merged, save_dir, keymaps.CLIP_VISION_MODEL, args.max_shard_size)
        processor.save_pretrained(save_dir)
    else:  # the tokenizer's own files: XTuner and LLaVA (transformers 4.x) read them
        save_llm(merged, args.model_name_or_path, save_dir, args.max_shard_size)
    print(f"merged {args.adapter_name_or_path} into {args.model_name_or_path}: {save_dir}")
    return 0


def merge_adapter(base: str, adapter: str, is_clip: bool, device: str = "cpu", trust_remote_code: bool = False):
    """(merged model, its tokenizer or image processor)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlmtune.model.peft import load_adapter

    from vlmtune.model.pretrained import from_pretrained, load_pretrained_model
    from vlmtune.model.vision import load_image_processor, load_vision_encoder

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: not a peft adapter folder (no adapter_config.json)")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no GPU is visible")
    device_map = {"": "cuda"} if device == "cuda" else device
    if is_clip:
        model = load_vision_encoder(base, "auto", device_map=device_map)
        processor = load_image_processor(base)
    else:
        model = load_pretrained_model(AutoModelForCausalLM, base, dtype="auto", device_map=device_map,
                                 trust_remote_code=trust_remote_code)
        processor = from_pretrained(AutoTokenizer, base, trust_remote_code=trust_remote_code)
    try:
        model = load_adapter(model, adapter, keymaps.CLIP_VISION_ADAPTER if is_clip else ())
    except UserError as e:
        kind = "CLIP vision encoder" if is_clip else "LLM (pass --is-clip for a CLIP adapter)"
        raise UserError(f"{adapter} does not fit the {kind} {base}: {e}") from None
    return model.merge_and_unload(), processor
