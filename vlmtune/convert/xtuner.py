"""XTuner's layout, written by `save` (`convert pth_to_hf`, the default) and read back by `load` (chat, mmbench):

    SAVE_DIR/llm_adapter/            peft LoRA of the LLM                       | LLM trained with (Q)LoRA
    SAVE_DIR/config.json, model*     the whole LLM + its tokenizer at the root  | LLM trained fully
    SAVE_DIR/visual_encoder_adapter/ peft LoRA of the vision encoder            | encoder trained with LoRA
    SAVE_DIR/visual_encoder/         the whole encoder + its image processor    | encoder trained fully
    SAVE_DIR/projector/              XTuner's ProjectorModel (config + weights + its model code)
    SAVE_DIR/projector/image_newline.safetensors   AnyRes' row separator           | image_grid_pinpoints set
The encoder's weights and adapter carry transformers 4.x's names (XTuner reads them); `load` takes either
naming, never imports projector/'s model code, and places every weight or names the first that does not fit.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmtune.config import Config, ModelConfig
from vlmtune.convert import keymaps
from vlmtune.convert.parts import prefixed, trained_parts
from vlmtune.errors import UserError
from vlmtune.model.build import assemble, load_llm, load_tokenizer
from vlmtune.model.llava import LlavaModel
from vlmtune.model.peft import save_adapter
from vlmtune.model.projector import Projector
from vlmtune.model.vision import load_image_processor, load_vision_encoder
from vlmtune.weights import read_weights_file, rename, save_llm, save_model_renamed

NEWLINE_FILE = "image_newline.safetensors"  # in projector/, for an AnyRes model


def save(model: LlavaModel, cfg: Config, save_dir: Path, max_shard_size: str) -> None:
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

    config = ProjectorConfig(**model.projector.config())
    config.dtype = model.projector.dtype
    hf = ProjectorModel(config).to(model.projector.dtype)
    hf.load_state_dict(rename(prefixed(model.projector, "projector."), keymaps.XTUNER_PROJECTOR), strict=True)
    hf.save_pretrained(folder)  # _auto_class: the two model files are copied in, with an auto_map
    if model.anyres is not None:  # a file of its own: the ProjectorModel XTuner loads from the folder is unchanged
        from safetensors.torch import save_file

        save_file({"image_newline": model.image_newline.detach().contiguous()}, str(folder / NEWLINE_FILE))


def load(args, llava: Path, cfg: Config | None, dtype: torch.dtype, device: torch.device):
    """(LlavaModel, tokenizer, image processor) from the LLM, adapters, CLIP and projector folders."""
    check_llm_at_root(args.model_name_or_path, llava)
    llm_adapter = llava / keymaps.LLM_ADAPTER_DIR
    if args.adapter and llm_adapter.is_dir():
        raise UserError(f"--adapter and {llm_adapter} both give an LLM adapter; pass one")
    quantization = {None: None, 4: "4bit", 8: "8bit"}[args.bits]
    llm_cfg = ModelConfig(args.model_name_or_path, "", quantization=quantization, trust_remote_code=args.trust_remote_code)
    llm = load_llm(llm_cfg, dtype, device_map={"": str(device)} if quantization else None)
    adapter = args.adapter or (str(llm_adapter) if llm_adapter.is_dir() else None)
    clip_path = _visual_encoder_path(args, llava, cfg)
    clip = load_vision_encoder(clip_path, dtype)
    vision_adapter = llava / keymaps.VISUAL_ENCODER_ADAPTER_DIR
    projector = load_projector(llava / keymaps.PROJECTOR_DIR)
    pinpoints = cfg.model.image_grid_pinpoints if cfg else None
    model = assemble(llm, clip, projector, select_layer(args, cfg), dtype, adapter,
                     vision_adapter if vision_adapter.is_dir() else None,
                     cfg.model.vision_feature_select_strategy if cfg else None, pinpoints)
    if pinpoints:
        load_newline(model, llava / keymaps.PROJECTOR_DIR)
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    return model, tokenizer, load_image_processor(clip_path)


def select_layer(args, cfg: Config | None) -> int:
    if args.visual_select_layer is not None:
        return args.visual_select_layer
    return cfg.model.visual_select_layer if cfg else -2


def check_llm_at_root(llm: str, llava: Path) -> None:
    """A --llava folder with a fully trained LLM at its root (convert's xtuner layout of a full finetune) must
    be the LLM too: another LLM argument would run that untrained model with the trained projector."""
    root = llava / "config.json"
    if not root.is_file() or not any(llava.glob("*.safetensors")) and not any(llava.glob("pytorch_model*.bin")):
        return
    if Path(llm).is_dir() and Path(llm).resolve() == llava.resolve():
        return
    raise UserError(f"--llava {llava} holds the trained LLM at its root, but the LLM argument is {llm}; pass the folder "
                    f"as the LLM too: `vlmtune chat {llava} --llava {llava} ...`")


def llava_folder(path: str | None) -> Path:
    """The --llava folder, checked to be one `convert pth_to_hf` wrote."""
    if path is None:
        raise UserError("no projector: pass --llava (a folder from `vlmtune convert pth_to_hf`) or give a "
                        "`--save-format huggingface` folder as the model")
    folder = Path(path)
    if not (folder / keymaps.PROJECTOR_DIR / "config.json").is_file():
        raise UserError(f"--llava {path}: not a converted model (no {keymaps.PROJECTOR_DIR}/config.json); "
                        "make one with `vlmtune convert pth_to_hf CONFIG PTH SAVE_DIR`")
    return folder


def _visual_encoder_path(args, llava: Path, cfg: Config | None) -> str:
    """CLIP trained fully -> llava/visual_encoder/; else --visual-encoder, else the training config's."""
    full = llava / keymaps.VISUAL_ENCODER_DIR
    if full.is_dir():
        if args.visual_encoder:
            raise UserError(f"--visual-encoder is not used: {full} holds the trained encoder; drop the flag")
        return str(full)
    if args.visual_encoder:
        return args.visual_encoder
    if cfg is not None:
        return cfg.model.visual_encoder_name_or_path
    raise UserError("pass --visual-encoder (the CLIP the model was trained with)")


def load_newline(model: LlavaModel, folder: Path) -> None:
    """An AnyRes model's `image_newline` from projector/image_newline.safetensors (save_projector)."""
    path = folder / NEWLINE_FILE
    if not path.is_file():
        raise UserError(f"{folder}: no {NEWLINE_FILE}, which an AnyRes model (image_grid_pinpoints in its "
                        f"vlmtune_config.py) needs; re-convert the checkpoint")
    state = read_weights_file(folder, stems=("image_newline",))
    if set(state) != {"image_newline"} or state["image_newline"].shape != model.image_newline.shape:
        raise UserError(f"{path}: expected one tensor 'image_newline' of shape {list(model.image_newline.shape)}, "
                        f"found {sorted(state)[:3]}; re-convert the checkpoint")
    with torch.no_grad():
        model.image_newline.copy_(state["image_newline"])


def load_projector(folder: Path) -> Projector:
    """A projector/ folder (ours or XTuner's: same config keys and weight names) as our Projector; its
    model code (XTuner's configuration_/modeling_projector.py) is never imported."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    projector = Projector.from_config(config, str(folder))
    state = read_weights_file(folder)  # keymaps.XTUNER_PROJECTOR: the folder's names are the module's own
    missing, unexpected = projector.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{folder}: weights do not fit its config.json (missing {sorted(missing)[:3]}, unexpected "
                        f"{sorted(unexpected)[:3]}); re-convert the checkpoint")
    return projector
