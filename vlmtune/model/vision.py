"""The vision encoder: every fact about it has its owner here.

An encoder family is one `Encoder` entry in ENCODERS, found by the transformers config's `model_type`:
which transformers classes load it and its image processor, whether its sequence starts with a CLS token
(LLaVA's 'default' feature selection drops it, 'full' keeps every token: transformers' names, the config key
`vision_feature_select_strategy`), the weights of a whole checkpoint the tower does not use (a CLIP
checkpoint's text tower, SigLIP's pooling head), the modules that never reach LLaVA's features (frozen, not
LoRA targets) and arguments that leave them out of the model (SigLIP's head is not even built). Its key names
in transformers 4.x files (the `vision_model.` level, keymaps.py) are shared by the CLIP and SigLIP towers.
Everything else asks this module: tokens per image (`image_tokens`), the features LLaVA takes
(`select_features`), LoRA target names (`lora_targets`), loading (`load_vision_encoder`,
`load_image_processor`, `vision_config`). Adding an encoder family is one entry here (+ its tiny model in
vlmtune/tiny.py and its tests).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlmtune.errors import UserError
from vlmtune.model.pretrained import from_pretrained, load_pretrained_model


@dataclass(frozen=True)
class Encoder:
    """What differs between vision encoder families."""

    model_type: str  # the vision tower's config.model_type
    model_class: str  # transformers class of the tower
    processor_class: str  # transformers class of its image processor
    cls_token: bool  # hidden states start with a CLS token ([N, 1 + P, D])
    unused_prefixes: tuple[str, ...] = ()  # weights of a whole (two-tower) checkpoint the tower does not use
    unused_modules: tuple[str, ...] = ()  # the tower's modules LLaVA's features never go through: frozen
    load_kwargs: tuple[tuple[str, object], ...] = ()  # config overrides when loading (leave unused parts out)
    llava_official: bool = False  # haotian-liu/LLaVA (LLaVA-1.5) builds this tower from `mm_vision_tower`


STRATEGIES = ("default", "full")  # transformers' vision_feature_select_strategy: drop the CLS token, or keep all

ENCODERS = {
    "clip_vision_model": Encoder(
        "clip_vision_model", "CLIPVisionModel", "CLIPImageProcessor", cls_token=True, llava_official=True,
        unused_prefixes=("text_model.", "text_projection.", "visual_projection.", "logit_scale"),
        unused_modules=("post_layernorm",),  # features come from a hidden state, before it
    ),
    "siglip_vision_model": Encoder(  # SigLIP / SigLIP2 FixRes, e.g. so400m-patch14-384: 27 x 27 = 729 tokens
        "siglip_vision_model", "SiglipVisionModel", "SiglipImageProcessor", cls_token=False,
        unused_prefixes=("text_model.", "logit_scale", "logit_bias", "head."),
        unused_modules=("post_layernorm",),
        load_kwargs=(("vision_use_head", False),),  # the pooling head: not built, trained, gathered or exported
    ),
}


def encoder_spec(config) -> Encoder:
    """The entry of a vision tower's config (a whole CLIPConfig counts as its vision part)."""
    model_type = getattr(config, "vision_config", config).model_type
    if model_type not in ENCODERS:
        raise UserError(f"vision encoder type {model_type!r} is not supported (known: {', '.join(ENCODERS)})")
    return ENCODERS[model_type]


def vision_config(path: str):
    """The vision tower's config of a checkpoint (a whole two-tower config gives its vision part); no weights."""
    from transformers import AutoConfig

    config = from_pretrained(AutoConfig, path)
    return getattr(config, "vision_config", config)


def load_vision_encoder(path: str, dtype, **kwargs) -> nn.Module:
    """The vision tower of a vision-only or a whole checkpoint, every tower weight found (the other tower's
    weights are the only ones left unused)."""
    import transformers

    spec = encoder_spec(vision_config(path))
    cls = getattr(transformers, spec.model_class)
    return load_pretrained_model(cls, path, spec.unused_prefixes, dtype=dtype, **dict(spec.load_kwargs), **kwargs)


def freeze_unused(model: nn.Module) -> None:
    """Parameters of modules LLaVA's features never go through get no gradient: they do not train."""
    skip = encoder_spec(model.config).unused_modules
    for name, param in model.named_parameters():
        if name.startswith(skip):
            param.requires_grad_(False)


def feature_strategy(config, requested: str | None) -> str:
    """The vision_feature_select_strategy: `requested`, or by default 'default' (CLS dropped) for an encoder with
    a CLS token and 'full' for one without (SigLIP); 'default' on an encoder without CLS would drop a patch."""
    spec = encoder_spec(config)
    strategy = requested or ("default" if spec.cls_token else "full")
    if strategy not in STRATEGIES:
        raise UserError(f"vision_feature_select_strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if strategy == "default" and not spec.cls_token:
        raise UserError(f"vision_feature_select_strategy 'default' drops the CLS token, and {spec.model_class} has "
                        "none (it would drop an image patch): use 'full'")
    return strategy


def load_image_processor(path: str):
    """The encoder's image processor (saved beside the encoder, as on the hub)."""
    import transformers

    return from_pretrained(getattr(transformers, encoder_spec(vision_config(path)).processor_class), path)


def image_tokens(config, strategy: str | None = None) -> int:
    """Feature rows one image becomes: the encoder's patches (576 for CLIP-L/336, 729 for SigLIP so400m/384),
    plus its CLS token when the strategy keeps it ('full' on CLIP)."""
    patches = (config.image_size // config.patch_size) ** 2
    return patches + int(encoder_spec(config).cls_token and feature_strategy(config, strategy) == "full")


def select_features(hidden_states: tuple[torch.Tensor, ...], layer: int, config, strategy: str | None = None) -> torch.Tensor:
    """LLaVA's image features: hidden state `layer` [N, (1 +) P, D], the CLS token dropped ('default') -> [N, P, D]."""
    features = hidden_states[layer]
    return features[:, 1:] if feature_strategy(config, strategy) == "default" else features


def lora_targets(model: nn.Module) -> list[str]:
    """Names of the tower's linear layers that feed LLaVA's features (peft `target_modules`)."""
    skip = encoder_spec(model.config).unused_modules
    return sorted(name for name, module in model.named_modules()
                  if isinstance(module, nn.Linear) and not name.startswith(skip))
