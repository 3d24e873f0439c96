"""Model assembly from a ModelConfig: load the parts, freeze, quantize, attach LoRA.

The one place that decides which parameters train: `build_model` returns a LlavaModel whose
`requires_grad` flags are final (projector always; LLM/CLIP fully, through LoRA, or not at all).
"""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, CLIPImageProcessor, CLIPVisionModel

from vlmtune.config import ModelConfig
from vlmtune.errors import UserError
from vlmtune.model.llava import LlavaModel
from vlmtune.model.peft import add_lora
from vlmtune.model.projector import Projector
from vlmtune.paths import require_model_folder

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


def load_image_processor(path: str) -> CLIPImageProcessor:
    """The CLIP encoder's image processor (saved beside the encoder, as on the hub)."""
    return from_pretrained(CLIPImageProcessor, path)


def load_llm(cfg: ModelConfig, dtype: torch.dtype, device_map=None):
    """AutoModelForCausalLM, 4/8-bit through bitsandbytes when `quantization` is set."""
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization is not None:
        if cfg.quantization not in ("4bit", "8bit"):
            raise UserError(f"quantization {cfg.quantization!r} must be '4bit', '8bit' or None")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=cfg.quantization == "4bit",
            load_in_8bit=cfg.quantization == "8bit",
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_threshold=6.0,
        )
        kwargs["device_map"] = device_map or ({"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu")
    return load_pretrained_model(AutoModelForCausalLM, cfg.llm_name_or_path, **kwargs)


def load_vision_encoder(path: str, dtype, **kwargs) -> CLIPVisionModel:
    """The CLIP vision tower of a vision-only or a whole CLIP checkpoint (its text tower is not used)."""
    return load_pretrained_model(CLIPVisionModel, path, VISION_UNUSED_PREFIXES, dtype=dtype, **kwargs)


def build_model(cfg: ModelConfig, for_training: bool = True, quantize: bool = True) -> LlavaModel:
    """LlavaModel with final trainable flags. `quantize=False` loads the LLM in full precision
    (conversion and merging need real weights, not 4-bit ones)."""
    dtype = resolve_dtype(cfg.torch_dtype)
    llm_cfg = cfg if quantize else _without_quantization(cfg)
    llm = load_llm(llm_cfg, dtype)
    visual_encoder = load_vision_encoder(cfg.visual_encoder_name_or_path, dtype)
    projector = Projector(
        visual_encoder.config.hidden_size, llm.config.get_text_config().hidden_size, depth=cfg.projector_depth
    ).to(dtype)
    llm.requires_grad_(not cfg.freeze_llm and cfg.llm_lora is None)
    visual_encoder.requires_grad_(not cfg.freeze_visual_encoder and cfg.visual_encoder_lora is None)
    if for_training and llm_cfg.quantization is not None:
        from peft import prepare_model_for_kbit_training

        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=cfg.use_gradient_checkpointing)
    if cfg.llm_lora is not None:
        llm = add_lora(llm, cfg.llm_lora, task_type="CAUSAL_LM")
    if cfg.visual_encoder_lora is not None:
        visual_encoder = add_lora(visual_encoder, cfg.visual_encoder_lora, task_type=None)
    if for_training and cfg.use_gradient_checkpointing:
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return LlavaModel(llm, visual_encoder, projector, cfg.visual_select_layer, transformers_llm=not cfg.trust_remote_code)


def _without_quantization(cfg: ModelConfig) -> ModelConfig:
    """A copy of `cfg` that loads the LLM in full precision."""
    import dataclasses

    return dataclasses.replace(cfg, quantization=None)


# Weights a vision checkpoint may hold that the vision tower does not use: the text tower, projections and
# logit scale of a full CLIP/SigLIP checkpoint (openai/clip-vit-large-patch14-336 is a whole CLIPModel).
VISION_UNUSED_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")


def from_pretrained(cls, path: str, **kwargs):
    """`cls.from_pretrained` (a tokenizer, processor or config) with a one-line error for a missing folder or
    hub id."""
    require_model_folder(path, f"cannot load {cls.__name__} from")
    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as e:  # ImportError: a missing optional kernel (flash-attn)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {cls.__name__} from {path!r}: {first}") from None


def load_pretrained_model(cls, path: str, unused_prefixes: tuple[str, ...] = (), **kwargs):
    """A model by `cls.from_pretrained`, with every weight of the model found in the folder and every weight
    of the folder used (but for `unused_prefixes`). transformers only warns about either and initialises the
    missing weights at random, which silently gives a different model."""
    model, info = from_pretrained(cls, path, output_loading_info=True, **kwargs)
    check_loading_info(info, f"{path} ({type(model).__name__})", unused_prefixes)
    return model


def check_loading_info(info: dict, source: str, unused_prefixes: tuple[str, ...] = ()) -> None:
    """A user error naming the first missing / unexpected / wrongly shaped weights of a `from_pretrained`."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not k.startswith(unused_prefixes))
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())
    if missing or unexpected or mismatched:
        parts = [f"{len(v)} {name} (first: {', '.join(v[:3])})"
                 for name, v in (("missing", missing), ("unexpected", unexpected), ("with other shapes", mismatched)) if v]
        raise UserError(f"{source}: weights do not match the model: {'; '.join(parts)}; the folder holds an incomplete "
                        "or different model: re-download or re-convert it")
