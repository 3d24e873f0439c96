"""What crosses between vlmtune and XTuner 0.2 (transformers 4.x), in both directions, with nothing dropped.

XTuner's files are built here the way XTuner writes them, from its documented layout (XTuner v0.2.0,
read at the source; transformers 4.x's CLIPVisionModel has a `vision_model.` level that 5.x dropped):
- iter_N.pth (mmengine Runner): {"meta": {"cfg": XTuner's Python config, ...}, "state_dict": LLaVAModel's
  filtered state dict (LoRA keys keep the adapter name: `lora_A.default.weight`; CLIP under
  `visual_encoder.base_model.model.vision_model.`), "message_hub": mmengine's real MessageHub state
  (HistoryBuffer objects, numpy arrays and scalars), "optimizer", "param_schedulers"}, saved with mmengine's own
  `save_checkpoint`;
- iter_N.pth/ under DeepSpeed: a folder (the tag itself) with mp_rank_00_model_states.pt = {"module",
  "param_shapes", DeepSpeed's bookkeeping, and mmengine's client state at the top level};
- the converted folder: llm_adapter/ and visual_encoder_adapter/ (peft files, `.default` stripped, CLIP keys
  with `vision_model.`), projector/ (config.json with auto_map + the two model files + pytorch_model.bin),
  xtuner_config.py, all `.bin` (XTuner's default without --safe-serialization).
Every one of them is loaded into vlmtune and must give the logits of the vlmtune-native path exactly (fp32).
The other way, the folders vlmtune writes must carry exactly the key names XTuner's chat reads.
"""
from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from convert_helpers import chat_generator, error_line, prompt_logits
from safetensors.torch import load_file

from vlmtune.cli import main as cli
from vlmtune.errors import UserError
from vlmtune.weights import load_into_model, load_trained_weights

CLIP_LAYERS, LLM_LAYERS = 2, 2  # the tiny models'
CLIP_LINEARS = ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]
LLM_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]


def xtuner_name(ours: str) -> str:
    """XTuner's LLaVAModel.state_dict() name of a vlmtune LlavaModel parameter (transformers 4.x CLIP)."""
    for mine, theirs in (("visual_encoder.base_model.model.", "visual_encoder.base_model.model.vision_model."),
                         ("visual_encoder.", "visual_encoder.vision_model.")):
        if ours.startswith(mine):
            return theirs + ours[len(mine):]
    return ours


def message_hub_state() -> dict:
    """mmengine's real MessageHub state, as its Runner checkpoints it."""
    from mmengine.logging import MessageHub

    hub = MessageHub.get_instance("xtuner_interop_test")
    for step in range(3):
        hub.update_scalar("train/loss", 2.0 - step * 0.1)
        hub.update_scalar("train/lr", 2e-4)
    hub.update_info("eta", np.float64(12.5))
    hub.update_info("iter", 3)
    hub.update_info("keep_ckpt_ids", [3])
    return hub.state_dict()


def xtuner_meta(marker: Path) -> dict:
    """XTuner's meta: its config as Python text. Executing it writes `marker`; vlmtune must not."""
    cfg = f"import os\n_ = open({str(marker)!r}, 'w')\nmodel = dict(type='xtuner.model.LLaVAModel')\n"
    return {"epoch": 0, "iter": 3, "cfg": cfg, "seed": 1, "experiment_name": "x", "time": "0", "mmengine_version": "0.10.7"}


@pytest.fixture(scope="module")
def native(checkpoint):
    """(vlmtune's iter_1.pth of the LoRA variant, its trained state by LlavaModel names)."""
    path = checkpoint("lora")
    return path, load_trained_weights(path)[0]


def write_xtuner_pth(path: Path, state: dict, marker: Path) -> Path:
    from mmengine.runner.checkpoint import save_checkpoint

    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                 "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.999), "params": [0]}]}
    save_checkpoint({"meta": xtuner_meta(marker), "state_dict": OrderedDict((xtuner_name(k), v) for k, v in state.items()),
                     "message_hub": message_hub_state(), "optimizer": optimizer,
                     "param_schedulers": [{"start_factor": 1e-5, "by_epoch": False, "_last_value": [2e-4]}]}, str(path))
    return path


def write_xtuner_deepspeed_dir(folder: Path, state: dict, marker: Path) -> Path:
    """XTuner's iter_N.pth/ folder (DeepSpeed tag = the folder): model states with mmengine's client state."""
    folder.mkdir(parents=True)
    names = OrderedDict((xtuner_name(k), v) for k, v in state.items())
    torch.save({"module": names, "buffer_names": [], "optimizer": None,
                "param_shapes": [OrderedDict((k, v.shape) for k, v in names.items())], "frozen_param_shapes": None,
                "shared_params": {}, "lr_scheduler": None, "global_steps": 3, "dp_world_size": 2, "mp_world_size": 1,
                "ds_config": {"zero_optimization": {"stage": 2}}, "ds_version": "0.16.4",
                "meta": xtuner_meta(marker), "message_hub": message_hub_state(), "param_schedulers": [], "optim_wrapper": {}},
               folder / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {}}, folder / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return folder


def test_an_xtuner_checkpoint_is_refused_by_plain_weights_only_loading(tmp_path, native):
    """The message hub really holds what torch's weights-only unpickler refuses (so reading it is a real test)."""
    path = write_xtuner_pth(tmp_path / "iter_3.pth", native[1], tmp_path / "marker")
    with pytest.raises(Exception, match="HistoryBuffer|numpy"):
        torch.load(path, weights_only=True)


@pytest.mark.parametrize("layout", ["file", "deepspeed"])
def test_xtuner_checkpoints_read_as_the_same_trained_weights(tmp_path, native, layout):
    marker = tmp_path / "marker"
    path = (write_xtuner_pth(tmp_path / "iter_3.pth", native[1], marker) if layout == "file"
            else write_xtuner_deepspeed_dir(tmp_path / "iter_3.pth", native[1], marker))
    state, config = load_trained_weights(path)
    assert config is None and not marker.exists()  # XTuner's Python config is never run
    assert state.keys() == native[1].keys() and all(torch.equal(state[k], native[1][k]) for k in state)


@pytest.mark.parametrize("layout", ["file", "deepspeed"])
def test_pth_to_hf_of_an_xtuner_checkpoint_chats_like_the_native_path(tmp_path, native, converted, tiny, capsys, layout):
    marker = tmp_path / "marker"
    path = (write_xtuner_pth(tmp_path / "iter_3.pth", native[1], marker) if layout == "file"
            else write_xtuner_deepspeed_dir(tmp_path / "iter_3.pth", native[1], marker))
    assert cli(["convert", "pth_to_hf", str(path), str(tmp_path / "no_config")]) == 2  # its config is not read
    assert "pass the training config" in error_line(capsys)
    out = tmp_path / "out"
    assert cli(["convert", "pth_to_hf", "tiny_llava_finetune_lora", str(path), str(out)]) == 0
    ours = prompt_logits(chat_generator(str(tiny.llm), "--llava", str(out)))
    reference = prompt_logits(chat_generator(str(tiny.llm), "--llava", str(converted("lora", "xtuner"))))
    assert (ours - reference).abs().max().item() == 0.0 and not marker.exists()


def test_an_xtuner_pretrain_checkpoint_is_a_pretrained_pth(tmp_path, tiny_model_config, native):
    from vlmtune.model.build import build_model

    projector = {k: v for k, v in native[1].items() if k.startswith("projector.")}
    path = write_xtuner_pth(tmp_path / "iter_3.pth", projector, tmp_path / "marker")
    model = build_model(tiny_model_config(), for_training=False)
    state, _ = load_trained_weights(path)
    assert load_into_model(model, state, str(path)) == []  # the pretrain trains the projector only: all covered
    assert torch.equal(model.projector.model[0].weight, projector["projector.model.0.weight"])


# ---- XTuner's converted folder -> vlmtune chat --------------------------------------------------------------


def expected_xtuner_keys(part: str) -> set[str]:
    """Key names XTuner 0.2's pth_to_hf writes for each folder of the tiny LoRA model (its documented layout)."""
    if part == "llm_adapter":
        return {f"base_model.model.model.layers.{i}.{m}.lora_{ab}.weight" for i in range(LLM_LAYERS) for m in LLM_LINEARS for ab in "AB"}
    if part == "visual_encoder_adapter":
        return {f"base_model.model.vision_model.encoder.layers.{i}.{m}.lora_{ab}.weight"
                for i in range(CLIP_LAYERS) for m in CLIP_LINEARS for ab in "AB"}
    if part == "projector":
        return {f"model.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    if part == "visual_encoder":
        per_layer = [f"{m}.{w}" for m in (*CLIP_LINEARS, "layer_norm1", "layer_norm2") for w in ("weight", "bias")]
        return ({"vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
                 "vision_model.embeddings.position_embedding.weight"}
                | {f"vision_model.{n}.{w}" for n in ("pre_layrnorm", "post_layernorm") for w in ("weight", "bias")}
                | {f"vision_model.encoder.layers.{i}.{k}" for i in range(CLIP_LAYERS) for k in per_layer})
    raise KeyError(part)


def xtuner_converted_folder(tmp_path: Path, native_folder: Path, marker: Path) -> Path:
    """XTuner's pth_to_hf output for the same weights: .bin files with XTuner's names, its model code files
    (which would write `marker` if anything imported them) and xtuner_config.py (likewise if executed)."""
    folder = tmp_path / "iter_3_xtuner"
    for part in ("llm_adapter", "visual_encoder_adapter"):
        (folder / part).mkdir(parents=True)
        shutil.copy(native_folder / part / "adapter_config.json", folder / part)
        weights = load_file(str(native_folder / part / "adapter_model.safetensors"))
        renamed = {(k.replace("base_model.model.", "base_model.model.vision_model.", 1)
                    if part == "visual_encoder_adapter" and ".vision_model." not in k else k): v for k, v in weights.items()}
        assert set(renamed) == expected_xtuner_keys(part)
        torch.save(renamed, folder / part / "adapter_model.bin")
    (folder / "projector").mkdir()
    config = json.loads((native_folder / "projector" / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_projector.ProjectorConfig", "AutoModel": "modeling_projector.ProjectorModel"}
    (folder / "projector" / "config.json").write_text(json.dumps(config))
    torch.save(load_file(str(native_folder / "projector" / "model.safetensors")), folder / "projector" / "pytorch_model.bin")
    code = f"open({str(marker)!r}, 'w').write('model code ran')\n"
    for name in ("configuration_projector.py", "modeling_projector.py", "../xtuner_config.py"):
        (folder / "projector" / name).write_text(code)
    return folder


def test_chat_on_an_xtuner_converted_folder_is_the_native_model(tmp_path, converted, tiny):
    native_folder, marker = converted("lora", "xtuner"), tmp_path / "marker"
    folder = xtuner_converted_folder(tmp_path, native_folder, marker)
    theirs = chat_generator(str(tiny.llm), "--llava", str(folder), "--visual-encoder", str(tiny.clip),
                            "--prompt-template", "internlm2_chat")
    ours = chat_generator(str(tiny.llm), "--llava", str(native_folder))
    assert (prompt_logits(theirs) - prompt_logits(ours)).abs().max().item() == 0.0
    assert not marker.exists()


def test_peft_alone_would_drop_the_xtuner_clip_adapter(tmp_path, converted, tiny):
    """Why vlmtune maps the keys itself: plain peft on transformers 5 loads XTuner's CLIP adapter with only a
    warning and leaves the adapter at its initial values (B = 0), so the encoder's outputs change nothing."""
    from peft import PeftModel
    from transformers import CLIPVisionModel

    folder = xtuner_converted_folder(tmp_path, converted("lora", "xtuner"), tmp_path / "marker")
    plain = PeftModel.from_pretrained(CLIPVisionModel.from_pretrained(tiny.clip), folder / "visual_encoder_adapter")
    lora_b = [p for n, p in plain.named_parameters() if "lora_B" in n]
    assert lora_b and all(not p.any() for p in lora_b)  # nothing was loaded
    ours = chat_generator(str(tiny.llm), "--llava", str(folder), "--visual-encoder", str(tiny.clip),
                          "--prompt-template", "internlm2_chat").model.visual_encoder
    assert all(p.any() for n, p in ours.named_parameters() if "lora_B" in n)


# ---- vlmtune's folders carry XTuner's names ---------------------------------------------------------------


@pytest.mark.parametrize("variant, parts", [("lora", ["llm_adapter", "visual_encoder_adapter", "projector"]),
                                            ("full", ["visual_encoder", "projector"])])
def test_vlmtune_folders_carry_the_key_names_xtuner_reads(converted, variant, parts):
    folder = converted(variant, "xtuner")
    for part in parts:
        stem = "adapter_model" if part.endswith("adapter") else "model"
        assert set(load_file(str(folder / part / f"{stem}.safetensors"))) == expected_xtuner_keys(part), part
    if variant == "full":  # the LLM at the root: transformers' own names (the same in 4.x and 5)
        llm = set(load_file(str(folder / "model.safetensors")))
        assert "model.embed_tokens.weight" in llm and "lm_head.weight" in llm
    assert json.loads((folder / "projector" / "config.json").read_text())["auto_map"]["AutoModel"] == \
        "modeling_projector.ProjectorModel"


def test_vlmtune_checkpoints_carry_xtuner_state_dict_names(checkpoint, tmp_path, tiny):
    """The iter_N.pth the trainer writes names CLIP's LoRA as XTuner's pth_to_hf expects it."""
    from vlmtune.convert import keymaps
    from vlmtune.weights import rename

    payload = torch.load(checkpoint("lora"), weights_only=True)
    state = load_trained_weights(checkpoint("lora"))[0]
    on_disk = rename(state, keymaps.XTUNER_STATE_DICT)  # what engine.checkpoint.save_checkpoint writes
    assert set(on_disk) == {xtuner_name(k) for k in state}
    assert any(k.startswith("visual_encoder.base_model.model.vision_model.encoder.") for k in on_disk)
    torch.save(dict(payload, state_dict=on_disk), tmp_path / "iter_1.pth")
    again = load_trained_weights(tmp_path / "iter_1.pth")[0]
    assert again.keys() == state.keys()


# ---- a missing or unexpected key is an error in every loader ------------------------------------------------


def broken_copy(tmp_path: Path, folder: Path, part: str, stem: str, drop: bool) -> Path:
    out = tmp_path / folder.name
    shutil.copytree(folder, out)
    path = out / part / f"{stem}.safetensors" if part else out / f"{stem}.safetensors"
    weights = load_file(str(path))
    if drop:
        weights.pop(sorted(weights)[0])
    else:
        weights["base_model.model.extra.lora_A.weight" if "adapter" in stem else "extra.weight"] = torch.zeros(2)
    from safetensors.torch import save_file

    save_file(weights, str(path), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("part", ["llm_adapter", "visual_encoder_adapter", "projector"])
@pytest.mark.parametrize("drop", [True, False], ids=["missing", "unexpected"])
def test_xtuner_folder_key_mismatch_is_an_error(tmp_path, converted, tiny, part, drop):
    stem = "model" if part == "projector" else "adapter_model"
    folder = broken_copy(tmp_path, converted("lora", "xtuner"), part, stem, drop)
    with pytest.raises(UserError, match=f"{part}.*(missing|unexpected)"):
        chat_generator(str(tiny.llm), "--llava", str(folder))


@pytest.mark.parametrize("drop", [True, False], ids=["missing", "unexpected"])
def test_a_full_encoder_or_huggingface_folder_with_a_key_mismatch_is_an_error(tmp_path, converted, drop):
    folder = broken_copy(tmp_path, converted("full", "xtuner"), "visual_encoder", "model", drop)
    with pytest.raises(UserError, match="weights do not match the model: 1 (missing|unexpected)"):
        chat_generator(str(folder), "--llava", str(folder))
    hf = broken_copy(tmp_path / "hf", converted("lora", "huggingface"), "", "model", drop)
    with pytest.raises(UserError, match="weights do not match the model: 1 (missing|unexpected)"):
        chat_generator(str(hf))


def test_merge_refuses_an_adapter_with_a_missing_key(tmp_path, converted, tiny, capsys):
    folder = broken_copy(tmp_path, converted("lora", "xtuner"), "visual_encoder_adapter", "adapter_model", True)
    assert cli(["convert", "merge", str(tiny.clip), str(folder / "visual_encoder_adapter"), str(tmp_path / "m"),
                "--is-clip"]) == 2
    assert "adapter weights do not fit" in error_line(capsys) and not (tmp_path / "m").exists()


# ---- the wrong model, silently ------------------------------------------------------------------------------


def test_a_llava_folder_with_the_llm_at_its_root_must_be_the_llm(converted, tiny, capsys):
    folder = converted("full", "xtuner")
    assert cli(["chat", str(tiny.llm), "--llava", str(folder), "--prompt", "hi", "--device", "cpu"]) == 2
    line = error_line(capsys)
    assert "holds the trained LLM at its root" in line and f"vlmtune chat {folder} --llava {folder}" in line


# ---- LLM folders transformers 4.x reads -------------------------------------------------------------------


def test_full_llm_folders_keep_the_tokenizer_files_and_the_rope_base_for_transformers_4(converted, tiny, tmp_path):
    """transformers 5 re-saves a tokenizer under a class 4.x lacks and keeps `rope_theta` only under
    `rope_parameters` (4.x reads the top level and falls back to 10000): the LLM at the root of a full
    conversion and a merged LLM carry the source's tokenizer files unchanged and `rope_theta` at the top level."""
    adapter = converted("lora", "xtuner") / "llm_adapter"
    assert cli(["convert", "merge", str(tiny.llm), str(adapter), str(tmp_path / "merged")]) == 0
    for folder in (converted("full", "xtuner"), tmp_path / "merged"):
        config = json.loads((folder / "config.json").read_text())
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (folder / name).read_bytes() == (tiny.llm / name).read_bytes(), (folder, name)
        assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
