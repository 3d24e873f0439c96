"""The two merged layouts of `convert pth_to_hf`: transformers' Llava and haotian-liu/LLaVA's.

Both merge LoRA into full-precision weights, rename every weight by a key map of keymaps.py (an unmatched
weight is an error, never dropped) and save with the LLM's tokenizer.

huggingface: LlavaForConditionalGeneration (text model = any causal LM transformers' Llava accepts; the whole
  CLIP is stored, also when it was frozen) + LlavaProcessor: the tokenizer with `<image>`, a
  LlavaImageProcessor whose `do_pad` is the training's pad_image_to_square (the same pixels as our
  expand2square), `patch_size` and `num_additional_image_tokens=1` so one `<image>` expands to P tokens, and
  a chat template that renders our prompt template. Single-token stop words become extra EOS ids.
official: the LLM's weights with `model.mm_projector.*` (and the vision tower when it trained), config keys
  mm_projector_type, mm_vision_tower, mm_vision_select_layer, ... as LLaVA-1.5 releases; Llama or Mistral.
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
from vlmtune.convert.pth_to_hf import _prefixed, merged_parts, tokenizer_with_image_token, trained_parts
from vlmtune.data.templates import get_template
from vlmtune.errors import UserError
from vlmtune.model.build import load_image_processor
from vlmtune.model.llava import LlavaModel, image_tokens
from vlmtune.weights import copy_tokenizer_files, rename

# CLIPImageProcessor settings carried over to the LlavaImageProcessor of the huggingface layout.
IMAGE_PROCESSOR_KEYS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
                        "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def save_llava_hf(model: LlavaModel, cfg: Config, save_dir: Path, max_shard_size: str) -> None:
    """A folder that `LlavaForConditionalGeneration.from_pretrained` + `AutoProcessor` load and run."""
    from huggingface_hub import save_torch_state_dict
    from transformers import LlavaConfig

    if model.projector.depth != 2:
        raise UserError(f"--save-format huggingface needs projector_depth=2 (transformers' Llava has two linear "
                        f"layers), this model has {model.projector.depth}; use --save-format xtuner")
    select_layer, projector = model.visual_select_layer, _prefixed(model.projector, "projector.")
    llm, clip = merged_parts(model)
    tokenizer = tokenizer_with_image_token(cfg, llm)
    state = {**_prefixed(llm, "llm."), **_prefixed(clip, "visual_encoder."), **projector}
    if llm.config.tie_word_embeddings:
        state.pop("llm.lm_head.weight", None)  # transformers ties it to embed_tokens again on load
    vision = clip.config
    config = LlavaConfig(
        text_config=llm.config, vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN),
        image_seq_length=image_tokens(vision),
        vision_feature_layer=select_layer, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", multimodal_projector_bias="projector.model.0.bias" in projector,
        tie_word_embeddings=llm.config.tie_word_embeddings,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = llm.dtype
    _check_fits(config, state)
    on_disk = {k: v.contiguous() for k, v in rename(state, keymaps.HUGGINGFACE_LLAVA).items()}
    save_torch_state_dict(on_disk, str(save_dir), max_shard_size=max_shard_size)
    config.save_pretrained(save_dir)
    _generation_config(llm, tokenizer, cfg).save_pretrained(save_dir)
    _processor(cfg, tokenizer, vision.patch_size).save_pretrained(save_dir)


def _check_fits(config, state: dict[str, torch.Tensor]) -> None:
    """Every weight of transformers' Llava (built on the meta device: no memory) is in `state`, and no more."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        expected = {k: v.shape for k, v in LlavaForConditionalGeneration(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    ours = {k: v.shape for k, v in rename(state, keymaps.HUGGINGFACE_LLAVA_MODULES).items()}
    if ours != expected:
        missing, extra = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
        shapes = sorted(k for k in set(ours) & set(expected) if ours[k] != expected[k])
        raise UserError(f"transformers' Llava does not take this model's weights as they are (missing {missing[:3]}, "
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


def _processor(cfg: Config, tokenizer, patch_size: int):
    """LlavaProcessor: tokenizer, pad-to-square-aware image processor, our template as chat template."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    template = get_template(cfg.data.prompt_template)
    chunk_prefix = choose_chunk_prefix(template, tokenizer)
    if chunk_prefix is None:
        print(f"warning: with this tokenizer, tokenizing the chat template's text does not give the ids of "
              f"training ({template.name}); transformers' answers may differ from `vlmtune chat`'s", file=sys.stderr)

    clip_processor = load_image_processor(cfg.model.visual_encoder_name_or_path).to_dict()
    image_processor = LlavaImageProcessorPil(
        **{k: clip_processor[k] for k in IMAGE_PROCESSOR_KEYS if k in clip_processor},
        do_pad=cfg.data.pad_image_to_square,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=jinja_chat_template(template, chunk_prefix or ""),
    )


def save_llava_official(model: LlavaModel, cfg: Config, save_dir: Path, max_shard_size: str) -> None:
    """haotian-liu/LLaVA's checkpoint: LLM + mm_projector (+ vision tower when it trained) in one folder."""
    from huggingface_hub import save_torch_state_dict

    llm_type = model.llm.config.model_type
    if llm_type not in keymaps.OFFICIAL_ARCHITECTURES:
        raise UserError(f"--save-format official supports {', '.join(keymaps.OFFICIAL_ARCHITECTURES)} LLMs "
                        f"(haotian-liu/LLaVA's classes), not {llm_type!r}; use --save-format huggingface or xtuner")
    clip_trained = trained_parts(cfg)["visual_encoder"] is not None
    depth, select_layer = model.projector.depth, model.visual_select_layer
    state = _prefixed(model.projector, "projector.")
    llm, clip = merged_parts(model)
    state.update(_prefixed(llm, "llm."))
    if clip_trained:
        state.update(_prefixed(clip, "visual_encoder."))
    if llm.config.tie_word_embeddings:
        state.pop("llm.lm_head.weight", None)  # shared with embed_tokens; LLaVA ties it again on load
    state = {k: v.contiguous() for k, v in rename(state, keymaps.OFFICIAL_LLAVA).items()}
    save_torch_state_dict(state, str(save_dir), max_shard_size=max_shard_size)
    config = _official_config(llm, clip, cfg, depth, select_layer, clip_trained)
    (save_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    copy_tokenizer_files(cfg.model.llm_name_or_path, save_dir)  # LLaVA runs on transformers 4.x: the original files
    load_image_processor(cfg.model.visual_encoder_name_or_path).save_pretrained(save_dir)


def _official_config(llm, clip, cfg: Config, depth: int, select_layer: int, clip_trained: bool) -> dict:
    """The LLM's config plus LLaVA-1.5's mm_* keys (what llava/model/llava_arch.py reads)."""
    architecture, model_type = keymaps.OFFICIAL_ARCHITECTURES[llm.config.model_type]
    values = llm.config.to_dict()
    rope = values.get("rope_parameters") or {}
    tower = cfg.model.visual_encoder_name_or_path
    values.update(
        architectures=[architecture],
        model_type=model_type,
        torch_dtype=str(llm.dtype).removeprefix("torch."),  # the key transformers 4 (LLaVA's) reads
        image_aspect_ratio="pad" if cfg.data.pad_image_to_square else "square",
        mm_hidden_size=clip.config.hidden_size,
        mm_projector_type="linear" if depth == 1 else f"mlp{depth}x_gelu",
        mm_use_im_patch_token=False,
        mm_use_im_start_end=False,
        mm_vision_select_feature="patch",
        mm_vision_select_layer=select_layer,
        mm_vision_tower=str(Path(tower).resolve()) if Path(tower).exists() else tower,
        mm_patch_merge_type="flat",
        unfreeze_mm_vision_tower=clip_trained,
        tokenizer_model_max_length=cfg.data.max_length,
        tokenizer_padding_side="right",
        use_mm_proj=True,
        use_cache=True,
    )
    if "rope_theta" in rope:
        values["rope_theta"] = rope["rope_theta"]  # transformers 4 reads it at the top level
    return values
