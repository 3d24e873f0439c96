"""`vlmtune convert merge BASE ADAPTER SAVE_DIR [--is-clip]`: a peft LoRA adapter merged into its base model.

    base (AutoModelForCausalLM, or CLIPVisionModel with --is-clip), loaded fresh in its stored dtype
        -> PeftModel.from_pretrained(adapter) -> merge_and_unload -> save + tokenizer (or image processor)
The base is always loaded fresh and unquantized: merging into a 4-bit model that already ran a forward pass
on CPU gives wrong weights (bitsandbytes repacks them), and a merged model is meant to be full precision.
"""
from __future__ import annotations

from pathlib import Path

import torch

from vlmtune.errors import UserError


def main(args) -> int:
    """CLI entry."""
    merged, processor = merge_adapter(args.model_name_or_path, args.adapter_name_or_path, args.is_clip,
                                      args.device, args.trust_remote_code)
    save_dir = Path(args.save_dir)
    merged.save_pretrained(save_dir, max_shard_size=args.max_shard_size)
    processor.save_pretrained(save_dir)
    print(f"merged {args.adapter_name_or_path} into {args.model_name_or_path}: {save_dir}")
    return 0


def merge_adapter(base: str, adapter: str, is_clip: bool, device: str = "cpu", trust_remote_code: bool = False):
    """(merged model, its tokenizer or image processor)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

    from vlmtune.model.build import _from_pretrained, load_image_processor

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: not a peft adapter folder (no adapter_config.json)")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no GPU is visible")
    device_map = {"": "cuda"} if device == "cuda" else device
    if is_clip:
        model = _from_pretrained(CLIPVisionModel, base, dtype="auto", device_map=device_map)
        processor = load_image_processor(base)
    else:
        model = _from_pretrained(AutoModelForCausalLM, base, dtype="auto", device_map=device_map,
                                 trust_remote_code=trust_remote_code)
        processor = _from_pretrained(AutoTokenizer, base, trust_remote_code=trust_remote_code)
    try:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as e:
        kind = "CLIP vision encoder" if is_clip else "LLM (pass --is-clip for a CLIP adapter)"
        raise UserError(f"{adapter} does not fit the {kind} {base}: {str(e).splitlines()[0][:200]}") from None
    return model.merge_and_unload(), processor
