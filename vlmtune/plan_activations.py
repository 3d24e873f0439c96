"""Activation memory of one micro-batch: what autograd keeps from the forward for the backward.

The formula (docs/training.md, "Memory plan") counts, in bytes, the tensors each op saves, with w the bytes of
the training precision, h/i/a/d_kv the LLM's hidden size, MLP size, attention heads and key/value width, and
flash or memory-efficient attention (no sequence x sequence matrix; a 4-byte log-sum-exp per head and token):

    LLM layer, per token, frozen weights       8h + w(2h + 2 d_kv + 3i) + 4a     (RMSNorm fp32 inputs, attention
                                                                                  q/k/v/out, SiLU and product inputs)
    ... whose linear weights train (full)      + w(3h + i)                       (the inputs of the linear layers)
    ... with LoRA                              + w(3h + i) when lora_dropout = 0, else (w + 1) x each adapted
                                                 layer's input (a dropout copy and its mask); + w r per adapter
    gradient checkpointing                     every layer keeps only its input (w h per token), and one layer's
                                                 activations are rebuilt at a time
    final norm and loss, per target row        (w + 8) V    (16-bit logits, their fp32 copy, log-softmax output)
    vision tower that trains (or has LoRA)     per layer and token w(9h_v + 3i_v) + 4a_v (+ LoRA dropout copies)
    projector                                  per image row w(h_v + 2h)

Tokens per sample: max_length (which counts the image); target rows per sample: max_length - image positions;
one image per sample, of the largest AnyRes grid when image_grid_pinpoints is set (LlavaModel.image_length).
"""
from __future__ import annotations

from torch import nn


def activation_bytes(model, cfg, micro_batch: int, w: int, checkpointing: bool) -> int:
    """Bytes autograd keeps for `micro_batch` samples of `cfg.data.max_length` positions, each with one image, of
    the (meta) LlavaModel `model` (the formula of the module docstring)."""
    text = model.llm.config.get_text_config()
    h, a, i, V = text.hidden_size, text.num_attention_heads, text.intermediate_size, text.vocab_size
    kv = text.num_key_value_heads * (text.to_dict().get("head_dim") or h // a)
    seq = cfg.data.max_length
    tokens = micro_batch * seq
    layer_llm = _layer(model.llm)
    llm_trains = _trains(layer_llm)
    per_token = 8 * h + w * (2 * h + 2 * kv + 3 * i) + 4 * a + (w * (3 * h + i) if llm_trains else _lora(layer_llm, w, w * (3 * h + i)))
    layers = text.num_hidden_layers
    llm = tokens * (layers * w * h + per_token) if checkpointing else tokens * layers * per_token
    head = tokens * (4 + w) * h + micro_batch * max(seq - model.image_length, 1) * (w + 8) * V
    return llm + head + micro_batch * _image_bytes(model, w, h)


def _image_bytes(model, w: int, h: int) -> int:
    """One image: its tiles through the vision tower (when anything in it trains) and the projector."""
    vision = model.visual_encoder.config
    tiles = max((model.anyres.tiles(tuple(p)) for p in model.anyres.pinpoints), default=1) if model.anyres else 1
    tile_tokens = (vision.image_size // vision.patch_size) ** 2 + 1  # + CLS or not: one row either way
    layer = _layer(model.visual_encoder)
    tower = 0
    if any(p.requires_grad for p in model.visual_encoder.parameters()):
        hv, iv, av = vision.hidden_size, vision.intermediate_size, vision.num_attention_heads
        tower = vision.num_hidden_layers * tile_tokens * (w * (9 * hv + 3 * iv) + 4 * av + _lora(layer, w))
    projector = tile_tokens * w * (vision.hidden_size + 2 * h)
    return tiles * (tower + projector)


def _layer(module: nn.Module) -> nn.Module:
    """The first transformer layer of an LLM or vision tower (transformers' `...layers.0`)."""
    return next(m for name, m in module.named_modules() if name.endswith("layers.0"))


def _trains(layer: nn.Module) -> bool:
    """Whether the layer's own (non-LoRA) linear weights train."""
    return any(p.requires_grad for name, p in layer.named_parameters() if ".lora_" not in name and p.dim() == 2)


def _lora(layer: nn.Module, w: int, shared_inputs: int = 0) -> int:
    """Bytes per token LoRA adds to a layer: each adapter's rank-r output, plus the dropout copy and mask of its
    input when lora_dropout > 0, or `shared_inputs` (the inputs it reads, which dropout 0 keeps) when it is 0."""
    extra, dropout = 0, False
    for module in layer.modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            extra += w * module.r["default"]
            if isinstance(module.lora_dropout["default"], nn.Dropout):
                dropout = True
                extra += (w + 1) * module.lora_A["default"].in_features
    return extra + (shared_inputs if extra and not dropout else 0)
