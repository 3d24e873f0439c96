"""LoRA through peft, on the LLM (causal LM) or on the vision encoder: attach, save, load.

Adapters are read and written here, not by peft's `PeftModel.from_pretrained` / `save_pretrained`: peft
only warns about adapter weights it cannot place (a CLIP adapter saved by transformers 4.x, whose keys have a
`vision_model.` level, loads into transformers 5 as an untouched random adapter). Here every adapter weight
of the file must land on an adapter weight of the model and every adapter weight of the model must come from
the file; `key_rules` (keymaps.CLIP_VISION_ADAPTER) write the names XTuner and transformers 4.x read and
accept either naming back.
"""
from __future__ import annotations

import json
from pathlib import Path

from peft import LoraConfig, PeftConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from vlmtune.errors import UserError
from vlmtune.weights import read_weights_file, rename, rename_either

LORA_DEFAULTS = dict(r=64, lora_alpha=16, lora_dropout=0.05, bias="none", target_modules="all-linear")
ADAPTER_CONFIG = "adapter_config.json"


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


def save_adapter(peft_model, folder: Path, key_rules=()) -> None:
    """adapter_config.json + adapter_model.safetensors, keys renamed by `key_rules` (ours -> theirs)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    peft_model.peft_config["default"].save_pretrained(str(folder))
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    save_file(rename(state, key_rules) if key_rules else state, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})


def load_adapter(model, folder: str | Path, key_rules=(), is_trainable: bool = False):
    """`model` wrapped with the adapter in `folder` (a peft folder: adapter_config.json + adapter_model.*);
    a user error naming the first keys when the file's adapter weights and the model's do not match."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise UserError(f"{folder}: not a peft adapter folder (no {ADAPTER_CONFIG})")
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"{folder / ADAPTER_CONFIG}: not a LoRA config peft can read ({str(e).splitlines()[0][:200]})") from None
    config.inference_mode = not is_trainable
    try:
        peft_model = get_peft_model(model, config)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{folder}: the adapter's target modules are not in {type(model).__name__} "
                        f"({str(e).splitlines()[0][:200]}); is it the adapter of another model?") from None
    state = read_weights_file(folder, ("adapter_model",))
    state = rename_either(state, key_rules) if key_rules else state
    expected = get_peft_model_state_dict(peft_model).keys()
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise UserError(f"{folder}: adapter weights do not fit {type(model).__name__}: {len(missing)} missing "
                        f"(first: {', '.join(missing[:2]) or '-'}), {len(unexpected)} unexpected (first: "
                        f"{', '.join(unexpected[:2]) or '-'}); is it the adapter of another model?")
    try:
        result = set_peft_model_state_dict(peft_model, state)
    except RuntimeError as e:  # a size mismatch: another rank or base model
        raise UserError(f"{folder}: adapter weights have other shapes than {type(model).__name__}'s "
                        f"({str(e).strip().splitlines()[-1][:200]}); is it the adapter of another model?") from None
    if result.unexpected_keys:
        raise UserError(f"{folder}: adapter weights peft could not place: {', '.join(result.unexpected_keys[:3])}")
    if not is_trainable:
        peft_model.eval().requires_grad_(False)
    return peft_model
