"""transformers' LlavaForConditionalGeneration layout (LlavaNextForConditionalGeneration for an AnyRes model):
written by `save` (`--save-format huggingface`), read back by `load` (a folder given to chat / mmbench as the
model).

LoRA is merged into full-precision weights; every weight is renamed by keymaps.HUGGINGFACE_LLAVA (an unmatched
weight is an error, never dropped) and saved with the LLM's tokenizer as a LlavaProcessor:
the tokenizer with `<image>`, a LlavaImageProcessor whose `do_pad` is the training's pad_image_to_square (the
same pixels as our expand2square), `patch_size` and `num_additional_image_tokens=1` so one `<image>` expands to
P tokens, and a chat template that renders our prompt template. Single-token stop words become extra EOS ids.
An AnyRes model is saved as LlavaNext: its grid pinpoints in the config, `image_newline` as a weight, a
LlavaNextProcessor whose LlavaNextImageProcessor tiles as training did (data/image.py's `anyres_processor`).
Reading it back splits the weights into LLM / encoder / projector (/ newline) by the same key map, every
tensor of the folder placed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from vlmtune.config import Config
from vlmtune.constants import DEFAULT_IMAGE_TOKEN
from vlmtune.convert import keymaps
from vlmtune.convert.chat_template import choose_chunk_prefix, jinja_chat_template
from vlmtune.convert.parts import merged_parts, prefixed, tokenizer_with_image_token
from vlmtune.data.image import anyres_processor, processor_settings
from vlmtune.data.templates import get_template
from vlmtune.errors import UserError
from vlmtune.model.build import assemble, load_tokenizer
from vlmtune.model.llava import LlavaModel
from vlmtune.model.pretrained import load_pretrained_model
from vlmtune.model.projector import Projector
from vlmtune.model.vision import encoder_spec, load_image_processor
from vlmtune.weights import rename

# model_type -> (transformers model class, on-disk key map, in-memory key map)
KINDS = {
    "llava": ("LlavaForConditionalGeneration", keymaps.HUGGINGFACE_LLAVA, keymaps.HUGGINGFACE_LLAVA_MODULES),
    "llava_next": ("LlavaNextForConditionalGeneration", keymaps.HUGGINGFACE_LLAVA_NEXT,
                   keymaps.HUGGINGFACE_LLAVA_NEXT_MODULES),
}


def save(model: LlavaModel, cfg: Config, save_dir: Path, max_shard_size: str) -> None:
    """A folder that `Llava(Next)ForConditionalGeneration.from_pretrained` + `AutoProcessor` load and run."""
    from huggingface_hub import save_torch_state_dict
    from transformers import LlavaConfig, LlavaNextConfig

    if not model.projector.fits_transformers_llava:
        raise UserError(f"--save-format huggingface needs projector_depth=2 (transformers' Llava has two linear "
                        f"layers), this model has {model.projector.depth}; use --save-format xtuner")
    select_layer, projector = model.visual_select_layer, prefixed(model.projector, "projector.")
    anyres, strategy, image_length = model.anyres, model.feature_strategy, model.image_length
    if anyres is not None:
        projector["image_newline"] = model.image_newline.detach()
    llm, clip = merged_parts(model)
    tokenizer = tokenizer_with_image_token(cfg, llm)
    state = {**prefixed(llm, "llm."), **prefixed(clip, "visual_encoder."), **projector}
    if llm.config.tie_word_embeddings:
        state.pop("llm.lm_head.weight", None)  # transformers ties it to embed_tokens again on load
    vision = clip.config
    common = dict(
        text_config=llm.config, vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN),
        vision_feature_layer=select_layer, vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu", multimodal_projector_bias="projector.model.0.bias" in projector,
        tie_word_embeddings=llm.config.tie_word_embeddings,
    )
    if anyres is None:
        config = LlavaConfig(**common, image_seq_length=image_length)
    else:
        config = LlavaNextConfig(**common, image_grid_pinpoints=[list(p) for p in anyres.pinpoints])
    kind, disk_keys, _ = KINDS[config.model_type]
    config.architectures = [kind]
    config.dtype = llm.dtype
    _check_fits(config, state)
    on_disk = {k: v.contiguous() for k, v in rename(state, disk_keys).items()}
    save_torch_state_dict(on_disk, str(save_dir), max_shard_size=max_shard_size)
    config.save_pretrained(save_dir)
    _generation_config(llm, tokenizer, cfg).save_pretrained(save_dir)
    _processor(cfg, tokenizer, vision, strategy, anyres).save_pretrained(save_dir)


def _check_fits(config, state: dict[str, torch.Tensor]) -> None:
    """Every weight of transformers' Llava(Next) (built on the meta device: no memory) is in `state`, and no more."""
    import transformers

    kind, _, memory_keys = KINDS[config.model_type]
    with torch.device("meta"):
        expected = {k: v.shape for k, v in getattr(transformers, kind)(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    ours = {k: v.shape for k, v in rename(state, memory_keys).items()}
    if ours != expected:
        missing, extra = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
        shapes = sorted(k for k in set(ours) & set(expected) if ours[k] != expected[k])
        raise UserError(f"transformers' {kind} does not take this model's weights as they are (missing {missing[:3]}, "
                        f"unexpected {extra[:3]}, shape mismatch {shapes[:3]}); use --save-format xtuner")


def _generation_config(llm, tokenizer, cfg: Config):
    """The LLM's generation config with the template's single-token stop words as extra EOS ids."""
    gen = llm.generation_config
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for word in get_template(cfg.data.prompt_template).stop_words:
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) == 1 and ids[0] not in eos:
            eos.append(ids[0])
    gen.eos_token_id = eos if len(eos) > 1 else (eos[0] if eos else None)
    gen.pad_token_id = tokenizer.pad_token_id
    return gen


def _processor(cfg: Config, tokenizer, vision, strategy: str, anyres):
    """Llava(Next)Processor: tokenizer, image processor (pad-to-square aware; AnyRes: tiling as in training),
    our template as chat template; one `<image>` expands to the encoder's tokens (patches + its CLS token, minus
    the CLS that 'default' drops), or LlavaNext's count for the image's size."""
    from transformers import LlavaImageProcessorPil, LlavaNextProcessor, LlavaProcessor

    template = get_template(cfg.data.prompt_template)
    chunk_prefix = choose_chunk_prefix(template, tokenizer)
    if chunk_prefix is None:
        print(f"warning: with this tokenizer, tokenizing the chat template's text does not give the ids of "
              f"training ({template.name}); transformers' answers may differ from `vlmtune chat`'s", file=sys.stderr)

    source = load_image_processor(cfg.model.visual_encoder_name_or_path)
    common = dict(tokenizer=tokenizer, patch_size=vision.patch_size, vision_feature_select_strategy=strategy,
                  num_additional_image_tokens=int(encoder_spec(vision).cls_token),
                  chat_template=jinja_chat_template(template, chunk_prefix or ""))
    if anyres is not None:
        return LlavaNextProcessor(image_processor=anyres_processor(source, anyres.pinpoints), **common)
    image_processor = LlavaImageProcessorPil(**processor_settings(source), do_pad=cfg.data.pad_image_to_square)
    return LlavaProcessor(image_processor=image_processor, **common)


def is_layout(folder: Path) -> bool:
    """A transformers Llava or LlavaNext folder (config.json with model_type llava / llava_next and a text_config)."""
    config = folder / "config.json"
    if not config.is_file():
        return False
    values = json.loads(config.read_text(encoding="utf-8"))
    return values.get("model_type") in KINDS and "text_config" in values


def load(args, folder: Path, dtype: torch.dtype):
    """(LlavaModel, tokenizer, image processor, pad_to_square) from a transformers Llava / LlavaNext folder."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM

    if args.bits is not None or args.adapter or args.llava or args.visual_encoder:
        raise UserError(f"{folder} is a complete huggingface-layout model: --bits, --adapter, --llava and "
                        "--visual-encoder do not apply to it")
    kind, _, memory_keys = KINDS[AutoConfig.from_pretrained(str(folder)).model_type]
    hf = load_pretrained_model(getattr(transformers, kind), str(folder), dtype=dtype)  # every tensor in the folder
    config = hf.config
    if not isinstance(config.vision_feature_layer, int):
        raise UserError(f"{folder}: only one vision_feature_layer is supported, not {config.vision_feature_layer}")
    ours = rename(hf.state_dict(), memory_keys, reverse=True)
    del hf
    with init_empty_weights():  # parameters on meta, real buffers (rotary tables): assigned from `ours` below
        llm = AutoModelForCausalLM.from_config(config.text_config, dtype=dtype)
        clip = getattr(transformers, encoder_spec(config.vision_config).model_class)(config.vision_config)
    _assign(llm, ours, "llm.")
    _assign(clip, ours, "visual_encoder.")
    if config.text_config.tie_word_embeddings:
        llm.tie_weights()
    linear_1 = ours["projector.model.0.weight"]
    projector = Projector(linear_1.shape[1], linear_1.shape[0], depth=2, bias="projector.model.0.bias" in ours)
    projector.load_state_dict({k.removeprefix("projector."): v for k, v in ours.items() if k.startswith("projector.")}) # strict
    image_processor = AutoImageProcessor.from_pretrained(str(folder))
    pinpoints = getattr(config, "image_grid_pinpoints", None)  # LlavaNext: AnyRes
    pad = bool(image_processor.do_pad) and not pinpoints  # LlavaNext's do_pad batches tiles: not square padding
    image_processor.do_pad = False  # ImagePreprocessor pads (mmbench may switch padding off)
    model = assemble(llm, clip, projector, _select_layer_hf(args, config), dtype,
                     feature_strategy=config.vision_feature_select_strategy, image_grid_pinpoints=pinpoints)
    if pinpoints:
        with torch.no_grad():
            model.image_newline.copy_(ours["image_newline"])
    return model, load_tokenizer(str(folder)), image_processor, pad


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str) -> None:
    """Load the `prefix` part of `state` into `module` by assignment (no copy); every weight must be there."""
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = module.load_state_dict(part, strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight" or not module.config.tie_word_embeddings]
    if missing or unexpected:
        raise UserError(f"weights do not fit {type(module).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _select_layer_hf(args, config) -> int:
    if args.visual_select_layer is not None and args.visual_select_layer != config.vision_feature_layer:
        raise UserError(f"--visual-select-layer {args.visual_select_layer}: this model was built with "
                        f"vision_feature_layer {config.vision_feature_layer}")
    return config.vision_feature_layer
