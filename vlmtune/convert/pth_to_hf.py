"""`vlmtune convert pth_to_hf`: a training checkpoint -> folders other tools load.

    checkpoint (iter_N.pth or iter_N.ds/) + config -> build_model(quantize=False) -> load the trained weights
        -> xtuner:      llm_adapter/ | full LLM at the root, visual_encoder_adapter/ | visual_encoder/, projector/
        -> huggingface: LoRA merged, one transformers LlavaForConditionalGeneration folder + LlavaProcessor
        -> official:    LoRA merged, one haotian-liu/LLaVA LlavaLlamaForCausalLM folder
Every format also gets `vlmtune_config.py` (the resolved training config), so `vlmtune chat` needs no more
flags than the folder. The model is rebuilt in full precision even for QLoRA: adapters trained on 4-bit
weights are applied to (and merged into) the real weights, as XTuner does.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from vlmtune.config import Config, load_config
from vlmtune.convert import keymaps
from vlmtune.errors import UserError
from vlmtune.model.build import build_model, load_image_processor, load_tokenizer, resolve_dtype
from vlmtune.model.llava import LlavaModel
from vlmtune.model.peft import save_adapter
from vlmtune.weights import load_into_model, load_trained_weights, rename, save_llm, save_model_renamed

CONFIG_FILE = "vlmtune_config.py"


def main(args) -> int:
    """CLI entry: load, convert, save in `--save-format`."""
    state_dict, saved_cfg = load_trained_weights(args.pth)
    cfg = load_config(args.config) if args.config else saved_cfg
    if cfg is None:
        raise UserError(f"{args.pth} carries no config; pass the training config: "
                        "vlmtune convert pth_to_hf CONFIG PTH SAVE_DIR")
    if args.trust_remote_code:
        cfg.model.trust_remote_code = True
    dtype = torch.float32 if args.fp32 else resolve_dtype(cfg.model.torch_dtype)
    model = load_trained_model(cfg, state_dict, str(args.pth), dtype)
    save_dir = Path(args.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    from vlmtune.convert.hf_llava import save_llava_hf, save_llava_official

    save = {"xtuner": save_xtuner, "huggingface": save_llava_hf, "official": save_llava_official}[args.save_format]
    save(model, cfg, save_dir, args.max_shard_size)
    write_config(cfg, save_dir)
    print(f"saved {args.save_format} layout to {save_dir}")
    return 0


def load_trained_model(cfg: Config, state_dict: dict, source: str, dtype: torch.dtype) -> LlavaModel:
    """The config's model in full precision (`dtype`) with the checkpoint's trained weights loaded."""
    model_cfg = dataclasses.replace(cfg.model, torch_dtype=str(dtype).removeprefix("torch."))
    model = build_model(model_cfg, for_training=False, quantize=False)
    uncovered = load_into_model(model, state_dict, source)
    if uncovered:
        raise UserError(f"{source}: {len(uncovered)} trainable weights of this config are not in the checkpoint "
                        f"(first: {uncovered[0]!r}); is the config the one it was trained with?")
    return model.eval()


def write_config(cfg: Config, save_dir: Path) -> None:
    """The resolved training config (template, image padding, paths) beside the converted weights."""
    (save_dir / CONFIG_FILE).write_text(cfg.text + f"config_name = {cfg.name!r}\n", encoding="utf-8")


def trained_parts(cfg: Config) -> dict[str, str | None]:
    """How each part trained: 'lora', 'full' or None (frozen); the projector always trains."""
    m = cfg.model
    return {
        "llm": "lora" if m.llm_lora is not None else (None if m.freeze_llm else "full"),
        "visual_encoder": "lora" if m.visual_encoder_lora is not None else (None if m.freeze_visual_encoder else "full"),
    }


# ---- xtuner layout ---------------------------------------------------------------------------------------


def save_xtuner(model: LlavaModel, cfg: Config, save_dir: Path, max_shard_size: str) -> None:
    """XTuner's released layout: adapters or full parts as their own folders, projector/ with its model code."""
    parts = trained_parts(cfg)
    if parts["llm"] == "lora":
        save_adapter(model.llm, save_dir / keymaps.LLM_ADAPTER_DIR)
    elif parts["llm"] == "full":
        save_llm(model.llm, cfg.model.llm_name_or_path, save_dir, max_shard_size)
    # CLIP's weights and adapter with transformers 4.x's `vision_model.` level: XTuner's chat reads them
    if parts["visual_encoder"] == "lora":
        save_adapter(model.visual_encoder, save_dir / keymaps.VISUAL_ENCODER_ADAPTER_DIR, keymaps.CLIP_VISION_ADAPTER)
    elif parts["visual_encoder"] == "full":
        folder = save_dir / keymaps.VISUAL_ENCODER_DIR
        save_model_renamed(model.visual_encoder, folder, keymaps.CLIP_VISION_MODEL, max_shard_size)
        load_image_processor(cfg.model.visual_encoder_name_or_path).save_pretrained(folder)
    save_projector(model, save_dir / keymaps.PROJECTOR_DIR)


def save_projector(model: LlavaModel, folder: Path) -> None:
    """projector/ loadable with AutoModel.from_pretrained(folder, trust_remote_code=True), as XTuner's."""
    from vlmtune.convert.projector_hf.configuration_projector import ProjectorConfig
    from vlmtune.convert.projector_hf.modeling_projector import ProjectorModel

    first = model.projector.model[0]
    config = ProjectorConfig(
        visual_hidden_size=first.in_features, llm_hidden_size=first.out_features,
        depth=model.projector.depth, hidden_act="gelu", bias=first.bias is not None,
    )
    config.dtype = first.weight.dtype
    hf = ProjectorModel(config).to(first.weight.dtype)
    hf.load_state_dict(rename(_prefixed(model.projector, "projector."), keymaps.XTUNER_PROJECTOR), strict=True)
    hf.save_pretrained(folder)  # _auto_class: the two model files are copied in, with an auto_map


# ---- shared by the merged layouts ---------------------------------------------------------------------------


def _prefixed(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in module.state_dict().items()}


def merged_parts(model: LlavaModel):
    """(LLM, CLIP) with LoRA merged in: plain transformers models (the LlavaModel is consumed)."""
    llm, clip = model.llm, model.visual_encoder
    if hasattr(llm, "merge_and_unload"):
        llm = llm.merge_and_unload()
    if hasattr(clip, "merge_and_unload"):
        clip = clip.merge_and_unload()
    return llm, clip


def tokenizer_with_image_token(cfg: Config, llm):
    """The LLM's tokenizer with `<image>` as a special token; the LLM's embeddings grow if it was added."""
    from transformers import AddedToken

    from vlmtune.constants import DEFAULT_IMAGE_TOKEN

    tokenizer = load_tokenizer(cfg.model.llm_name_or_path, cfg.model.trust_remote_code)
    if DEFAULT_IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(DEFAULT_IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)  # new rows = mean of the old ones
    return tokenizer
