"""LoRA through peft, on the LLM (causal LM) or on the CLIP encoder."""
from __future__ import annotations

from peft import LoraConfig, get_peft_model

from vlmtune.errors import UserError

LORA_DEFAULTS = dict(r=64, lora_alpha=16, lora_dropout=0.05, bias="none", target_modules="all-linear")


def lora_config(kwargs: dict, task_type: str | None) -> LoraConfig:
    """LoraConfig from the config's plain dict; like XTuner, every linear layer but the LM head by default."""
    merged = {**LORA_DEFAULTS, **kwargs}
    try:
        return LoraConfig(task_type=task_type, **merged)
    except TypeError as e:
        raise UserError(f"bad LoRA setting in the config: {e}") from None


def add_lora(model, kwargs: dict, task_type: str | None):
    """Wrap `model` with a fresh LoRA adapter; only the adapter weights train afterwards."""
    return get_peft_model(model, lora_config(kwargs, task_type))
