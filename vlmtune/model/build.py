"""Model assembly: load the parts, freeze, quantize, attach LoRA, and `assemble` them into a LlavaModel.

`assemble` is the one place a LlavaModel is made, from training (`build_model`), chat and evaluation
(convert/xtuner.py and convert/huggingface.py read a converted folder back) and convert. `build_model` is the
one place that decides which parameters train: its LlavaModel's `requires_grad` flags are final (projector
always; LLM/CLIP fully, through LoRA, or not at all).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from vlmtune.config import ModelConfig
from vlmtune.convert import keymaps
from vlmtune.errors import UserError
from vlmtune.model.llava import LlavaModel
from vlmtune.model.peft import add_lora, load_adapter
from vlmtune.model.pretrained import from_pretrained, load_pretrained_model
from vlmtune.model.projector import Projector
from vlmtune.model.vision import freeze_unused, load_vision_encoder, lora_targets

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` = bf16 where the device supports it, fp16 on older GPUs, fp32 on CPU."""
    if name != "auto":
        if name not in DTYPES:
            raise UserError(f"torch_dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(path: str, trust_remote_code: bool = False, padding_side: str = "right"):
    """The LLM's tokenizer; a pad token is borrowed from EOS/UNK when the tokenizer has none."""
    tokenizer = from_pretrained(AutoTokenizer, path, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def quantization_config(quantization: str, dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's storage of the frozen LLM: nf4 with double quantization (4bit), or LLM.int8 (8bit)."""
    return BitsAndBytesConfig(load_in_4bit=quantization == "4bit", load_in_8bit=quantization == "8bit",
                              bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                              llm_int8_threshold=6.0)


def load_llm(cfg: ModelConfig, dtype: torch.dtype, device_map=None):
    """AutoModelForCausalLM, 4/8-bit through bitsandbytes when `quantization` is set."""
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization is not None:
        if cfg.quantization not in ("4bit", "8bit"):
            raise UserError(f"quantization {cfg.quantization!r} must be '4bit', '8bit' or None")
        kwargs["quantization_config"] = quantization_config(cfg.quantization, dtype)
        kwargs["device_map"] = device_map or ({"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu")
    return load_pretrained_model(AutoModelForCausalLM, cfg.llm_name_or_path, **kwargs)


def build_model(cfg: ModelConfig, for_training: bool = True, quantize: bool = True) -> LlavaModel:
    """LlavaModel with final trainable flags. `quantize=False` loads the LLM in full precision
    (conversion and merging need real weights, not 4-bit ones)."""
    dtype = resolve_dtype(cfg.torch_dtype)
    llm_cfg = cfg if quantize else _without_quantization(cfg)
    llm = load_llm(llm_cfg, dtype)
    visual_encoder = load_vision_encoder(cfg.visual_encoder_name_or_path, dtype)
    return finish_model(llm, visual_encoder, llm_cfg, dtype, for_training)


def build_meta_model(cfg: ModelConfig, llm_folder: str, vision_folder: str, dtype: torch.dtype) -> LlavaModel:
    """The LlavaModel `build_model` would train, on the meta device (shapes, dtypes and trainable flags, no
    memory), from the config.json files in `llm_folder` and `vision_folder`: what `vlmtune train --dry-run`
    counts. A 4/8-bit LLM gets transformers' own bitsandbytes layers (Params4bit / Int8Params, unquantized
    shapes on meta)."""
    import transformers
    from transformers import AutoConfig

    from vlmtune.model.vision import encoder_spec, vision_config

    llm_config = from_pretrained(AutoConfig, llm_folder, trust_remote_code=cfg.trust_remote_code)
    tower_config = vision_config(vision_folder)
    spec = encoder_spec(tower_config)
    for key, value in spec.load_kwargs:  # as load_vision_encoder passes them to from_pretrained
        setattr(tower_config, key, value)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(llm_config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        if cfg.quantization is not None:
            from transformers.integrations.bitsandbytes import replace_with_bnb_linear
            from transformers.quantizers.base import get_keys_to_not_convert

            llm = replace_with_bnb_linear(llm, get_keys_to_not_convert(llm), quantization_config(cfg.quantization, dtype))
        visual_encoder = getattr(transformers, spec.model_class)(tower_config).to(dtype)
        return finish_model(llm, visual_encoder, cfg, dtype)


def finish_model(llm: nn.Module, visual_encoder: nn.Module, cfg: ModelConfig, dtype: torch.dtype,
                 for_training: bool = True) -> LlavaModel:
    """Loaded (or, for `vlmtune train --dry-run`, meta-device) parts -> the LlavaModel training runs: projector,
    which parameters train, k-bit preparation, assembly with LoRA, gradient checkpointing. The one place these
    decisions are made, so the memory plan (vlmtune/plan.py) counts the model training builds."""
    projector = Projector(visual_encoder.config.hidden_size, llm.config.get_text_config().hidden_size, cfg.projector_depth)
    llm.requires_grad_(not cfg.freeze_llm and cfg.llm_lora is None)
    visual_encoder.requires_grad_(not cfg.freeze_visual_encoder and cfg.visual_encoder_lora is None)
    freeze_unused(visual_encoder)
    if for_training and cfg.quantization is not None:
        from peft import prepare_model_for_kbit_training

        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=cfg.use_gradient_checkpointing)
    model = assemble(llm, visual_encoder, projector, cfg.visual_select_layer, dtype, cfg.llm_lora, cfg.visual_encoder_lora,
                     cfg.vision_feature_select_strategy, cfg.image_grid_pinpoints)
    if for_training and cfg.use_gradient_checkpointing:
        model.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


Adapter = dict | str | Path | None  # a LoRA config (a fresh adapter to train) or an adapter folder to load


def assemble(llm: nn.Module, visual_encoder: nn.Module, projector: Projector, visual_select_layer: int,
             dtype: torch.dtype, llm_adapter: Adapter = None, vision_adapter: Adapter = None,
             feature_strategy: str | None = None, image_grid_pinpoints=None) -> LlavaModel:
    """The LlavaModel of these parts: each adapter attached (a dict: a fresh LoRA with those settings; a folder:
    a trained adapter, every key placed, the vision one in either transformers naming), the projector in `dtype`;
    AnyRes tiling (and its newline vector) with `image_grid_pinpoints`."""
    if isinstance(llm_adapter, dict):
        llm = add_lora(llm, llm_adapter, task_type="CAUSAL_LM")
    elif llm_adapter is not None:
        llm = load_adapter(llm, llm_adapter)
    if isinstance(vision_adapter, dict):  # the encoder's own linear layers that feed LLaVA's features, by default
        visual_encoder = add_lora(visual_encoder, {"target_modules": lora_targets(visual_encoder), **vision_adapter},
                                  task_type=None)
    elif vision_adapter is not None:
        visual_encoder = load_adapter(visual_encoder, vision_adapter, keymaps.CLIP_VISION_ADAPTER)
    return LlavaModel(llm, visual_encoder, projector.to(dtype), visual_select_layer, feature_strategy, image_grid_pinpoints)


def _without_quantization(cfg: ModelConfig) -> ModelConfig:
    """A copy of `cfg` that loads the LLM in full precision."""
    import dataclasses

    return dataclasses.replace(cfg, quantization=None)


