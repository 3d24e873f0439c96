"""haotian-liu/LLaVA's layout (`--save-format official`): one LlavaLlamaForCausalLM / LlavaMistralForCausalLM
checkpoint, LoRA merged: the LLM's weights with `model.mm_projector.*` (and the vision tower when it trained),
config keys mm_projector_type, mm_vision_tower, mm_vision_select_layer, ... as LLaVA-1.5 releases them.
LLaVA runs on transformers 4.x: the tokenizer's original files are copied, the tower keeps the 4.x names.
"""
from __future__ import annotations

import json
from pathlib import Path

from vlmtune.config import Config
from vlmtune.convert import keymaps
from vlmtune.convert.parts import merged_parts, prefixed, trained_parts
from vlmtune.errors import UserError
from vlmtune.model.llava import LlavaModel
from vlmtune.model.vision import encoder_spec, load_image_processor
from vlmtune.weights import copy_tokenizer_files, rename

def save(model: LlavaModel, cfg: Config, save_dir: Path, max_shard_size: str) -> None:
    """haotian-liu/LLaVA's checkpoint: LLM + mm_projector (+ vision tower when it trained) in one folder."""
    from huggingface_hub import save_torch_state_dict

    llm_type = model.llm.config.model_type
    if llm_type not in keymaps.OFFICIAL_ARCHITECTURES:
        raise UserError(f"--save-format official supports {', '.join(keymaps.OFFICIAL_ARCHITECTURES)} LLMs "
                        f"(haotian-liu/LLaVA's classes), not {llm_type!r}; use --save-format huggingface or xtuner")
    if not encoder_spec(model.visual_encoder.config).llava_official:
        raise UserError(f"--save-format official: haotian-liu/LLaVA builds a CLIP vision tower only, not "
                        f"{type(model.visual_encoder).__name__}; use --save-format huggingface or xtuner")
    if model.anyres is not None:
        raise UserError("--save-format official writes haotian-liu/LLaVA-1.5's layout, which has no AnyRes "
                        "(image_grid_pinpoints); use --save-format huggingface (LlavaNext) or xtuner")
    clip_trained = trained_parts(cfg)["visual_encoder"] is not None
    projector_type, select_layer = model.projector.official_type, model.visual_select_layer
    select_feature = {"default": "patch", "full": "cls_patch"}[model.feature_strategy]  # LLaVA's names
    state = prefixed(model.projector, "projector.")
    llm, clip = merged_parts(model)
    state.update(prefixed(llm, "llm."))
    if clip_trained:
        state.update(prefixed(clip, "visual_encoder."))
    if llm.config.tie_word_embeddings:
        state.pop("llm.lm_head.weight", None)  # shared with embed_tokens; LLaVA ties it again on load
    state = {k: v.contiguous() for k, v in rename(state, keymaps.OFFICIAL_LLAVA).items()}
    save_torch_state_dict(state, str(save_dir), max_shard_size=max_shard_size)
    config = _official_config(llm, clip, cfg, projector_type, select_layer, select_feature, clip_trained)
    (save_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    copy_tokenizer_files(cfg.model.llm_name_or_path, save_dir)  # LLaVA runs on transformers 4.x: the original files
    load_image_processor(cfg.model.visual_encoder_name_or_path).save_pretrained(save_dir)


def _official_config(llm, clip, cfg: Config, projector_type: str, select_layer: int, select_feature: str,
                     clip_trained: bool) -> dict:
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
        mm_projector_type=projector_type,
        mm_use_im_patch_token=False,
        mm_use_im_start_end=False,
        mm_vision_select_feature=select_feature,
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
