"""Assemble a trained model for inference from the CLI's model flags (chat, mmbench).

Two sources, as XTuner's chat takes them, plus transformers' layout:
    LLM (folder or hub id) [+ --adapter] + --llava DIR (written by `convert pth_to_hf`, xtuner layout:
        llm_adapter/, visual_encoder_adapter/ or visual_encoder/, projector/) + --visual-encoder
    a `convert pth_to_hf --save-format huggingface` folder, given as the LLM: weights split back into
        LLM / CLIP / projector by the keymaps, so both run through the same Generator
Settings not given as flags (template, system, select layer, image padding) come from the
`vlmtune_config.py` that convert writes beside the weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmtune.config import Config, ModelConfig, config_from_text
from vlmtune.convert import keymaps
from vlmtune.convert.pth_to_hf import CONFIG_FILE
from vlmtune.data.image import ImagePreprocessor
from vlmtune.data.templates import get_template
from vlmtune.errors import UserError
from vlmtune.inference import Generator
from vlmtune.model.build import (load_image_processor, load_llm, load_pretrained_model, load_tokenizer, load_vision_encoder,
                                 resolve_dtype)
from vlmtune.model.llava import LlavaModel
from vlmtune.model.peft import load_adapter
from vlmtune.model.projector import Projector
from vlmtune.weights import read_weights_file, rename


def load_generator(args) -> Generator:
    """A Generator for the model flags of `vlmtune chat` / `vlmtune mmbench` (see cli._add_model_args)."""
    folder = Path(args.model_name_or_path)
    hf_layout = _is_hf_llava(folder)
    llava = None if hf_layout else _llava_folder(args.llava)
    cfg = saved_config(folder if hf_layout else llava)
    name = args.prompt_template or (cfg.data.prompt_template if cfg else None)
    if name is None:
        raise UserError(f"no --prompt-template given and no {CONFIG_FILE} beside the model to take it from")
    template = get_template(name)
    dtype, device = resolve_dtype(args.torch_dtype), resolve_device(args.device)
    if hf_layout:
        model, tokenizer, image_processor, pad = _load_hf_llava(args, folder, dtype)
    else:
        model, tokenizer, image_processor = _load_parts(args, llava, cfg, dtype, device)
        pad = cfg.data.pad_image_to_square if cfg else True  # LLaVA-1.5 / XTuner chat pad to square
    if args.bits is None:
        model.to(device)
    else:  # the quantized LLM was loaded onto `device` by bitsandbytes; it cannot be moved
        model.visual_encoder.to(device)
        model.projector.to(device)
    system = args.system or (cfg.data.system if cfg else "")
    method = cfg.data.image_preprocess if cfg else "hf"  # as trained; a model from elsewhere gets its processor's own
    preprocess = ImagePreprocessor(image_processor, pad_to_square=pad, method=method)
    return Generator(model.eval(), tokenizer, template, preprocess, model.image_length, system)


def resolve_device(name: str) -> torch.device:
    """`auto` = the current GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def saved_config(folder: Path | None) -> Config | None:
    """The training config convert saved in `folder` (None when there is none)."""
    if folder is None or not (folder / CONFIG_FILE).is_file():
        return None
    return config_from_text((folder / CONFIG_FILE).read_text(encoding="utf-8"), str(folder / CONFIG_FILE))


def _select_layer(args, cfg: Config | None) -> int:
    if args.visual_select_layer is not None:
        return args.visual_select_layer
    return cfg.model.visual_select_layer if cfg else -2


# ---- LLM + --llava parts (xtuner layout) -------------------------------------------------------------


def _load_parts(args, llava: Path, cfg: Config | None, dtype: torch.dtype, device: torch.device):
    """(LlavaModel, tokenizer, image processor) from the LLM, adapters, CLIP and projector folders."""
    _check_llm_at_root(args.model_name_or_path, llava)
    llm_adapter = llava / keymaps.LLM_ADAPTER_DIR
    if args.adapter and llm_adapter.is_dir():
        raise UserError(f"--adapter and {llm_adapter} both give an LLM adapter; pass one")
    quantization = {None: None, 4: "4bit", 8: "8bit"}[args.bits]
    llm_cfg = ModelConfig(args.model_name_or_path, "", quantization=quantization, trust_remote_code=args.trust_remote_code)
    llm = load_llm(llm_cfg, dtype, device_map={"": str(device)} if quantization else None)
    adapter = args.adapter or (str(llm_adapter) if llm_adapter.is_dir() else None)
    if adapter:
        llm = load_adapter(llm, adapter)
    clip_path = _visual_encoder_path(args, llava, cfg)
    clip = load_vision_encoder(clip_path, dtype)
    if (llava / keymaps.VISUAL_ENCODER_ADAPTER_DIR).is_dir():
        clip = load_adapter(clip, llava / keymaps.VISUAL_ENCODER_ADAPTER_DIR, keymaps.CLIP_VISION_ADAPTER)
    projector = load_projector(llava / keymaps.PROJECTOR_DIR, dtype)
    model = LlavaModel(llm, clip, projector, _select_layer(args, cfg), transformers_llm=not args.trust_remote_code)
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    return model, tokenizer, load_image_processor(clip_path)


def _check_llm_at_root(llm: str, llava: Path) -> None:
    """A --llava folder with a fully trained LLM at its root (convert's xtuner layout of a full finetune) must
    be the LLM too: another LLM argument would run that untrained model with the trained projector."""
    root = llava / "config.json"
    if not root.is_file() or not any(llava.glob("*.safetensors")) and not any(llava.glob("pytorch_model*.bin")):
        return
    if Path(llm).is_dir() and Path(llm).resolve() == llava.resolve():
        return
    raise UserError(f"--llava {llava} holds the trained LLM at its root, but the LLM argument is {llm}; pass the folder "
                    f"as the LLM too: `vlmtune chat {llava} --llava {llava} ...`")


def _llava_folder(path: str | None) -> Path:
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


def load_projector(folder: Path, dtype: torch.dtype) -> Projector:
    """A projector/ folder (ours or XTuner's: same config keys and weight names) as our Projector; its
    model code (XTuner's configuration_/modeling_projector.py) is never imported."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != keymaps.PROJECTOR_MODEL_TYPE or config.get("hidden_act", "gelu") != "gelu":
        raise UserError(f"{folder}: not a LLaVA gelu projector (model_type {config.get('model_type')!r})")
    projector = Projector(config["visual_hidden_size"], config["llm_hidden_size"], config["depth"], config.get("bias", True))
    state = read_weights_file(folder)  # keymaps.XTUNER_PROJECTOR: the folder's names are the module's own
    missing, unexpected = projector.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{folder}: weights do not fit its config.json (missing {sorted(missing)[:3]}, unexpected "
                        f"{sorted(unexpected)[:3]}); re-convert the checkpoint")
    return projector.to(dtype)


# ---- a huggingface-layout folder --------------------------------------------------------------------


def _is_hf_llava(folder: Path) -> bool:
    """A transformers Llava folder (config.json with model_type llava and a text_config)."""
    config = folder / "config.json"
    if not config.is_file():
        return False
    values = json.loads(config.read_text(encoding="utf-8"))
    return values.get("model_type") == "llava" and "text_config" in values


def _load_hf_llava(args, folder: Path, dtype: torch.dtype):
    """(LlavaModel, tokenizer, image processor, pad_to_square) from a transformers Llava folder."""
    from accelerate import init_empty_weights
    from transformers import AutoImageProcessor, AutoModelForCausalLM, CLIPVisionModel, LlavaForConditionalGeneration

    if args.bits is not None or args.adapter or args.llava or args.visual_encoder:
        raise UserError(f"{folder} is a complete huggingface-layout model: --bits, --adapter, --llava and "
                        "--visual-encoder do not apply to it")
    hf = load_pretrained_model(LlavaForConditionalGeneration, str(folder), dtype=dtype)  # every tensor in the folder
    config = hf.config
    if config.vision_feature_select_strategy != "default" or not isinstance(config.vision_feature_layer, int):
        raise UserError(f"{folder}: only vision_feature_select_strategy 'default' with one feature layer is supported")
    ours = rename(hf.state_dict(), keymaps.HUGGINGFACE_LLAVA_MODULES, reverse=True)
    del hf
    with init_empty_weights():  # parameters on meta, real buffers (rotary tables): assigned from `ours` below
        llm = AutoModelForCausalLM.from_config(config.text_config, dtype=dtype)
        clip = CLIPVisionModel(config.vision_config)
    _assign(llm, ours, "llm.")
    _assign(clip, ours, "visual_encoder.")
    if config.text_config.tie_word_embeddings:
        llm.tie_weights()
    linear_1 = ours["projector.model.0.weight"]
    projector = Projector(linear_1.shape[1], linear_1.shape[0], depth=2, bias="projector.model.0.bias" in ours)
    projector.load_state_dict({k.removeprefix("projector."): v for k, v in ours.items() if k.startswith("projector.")})
    image_processor = AutoImageProcessor.from_pretrained(str(folder))
    pad = bool(image_processor.do_pad)
    image_processor.do_pad = False  # ImagePreprocessor pads (mmbench may switch padding off)
    model = LlavaModel(llm, clip, projector.to(dtype), _select_layer_hf(args, config),
                       transformers_llm=not args.trust_remote_code)
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
