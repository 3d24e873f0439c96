"""`vlmtune convert pth_to_hf` in each layout, each checked by the tool that reads it.

- xtuner: the folders are what XTuner's chat opens (peft adapters, `AutoModel(trust_remote_code=True)`
  projector with XTuner's config keys), and `vlmtune chat` on them answers as the checkpoint's own model.
- huggingface: plain transformers (`LlavaForConditionalGeneration` + `AutoProcessor` + its chat template)
  generates the same greedy tokens as `vlmtune chat` on the xtuner folder, for Llama, for Qwen2 with a
  frozen CLIP, and for QLoRA (merged into the full-precision LLM), on a non-square photo. The model gets chat's pixel tensor: training's default
  `image_preprocess='fast'` resizes in torch, the saved processor with PIL (1-2 levels apart); the processor
  itself is checked to give exactly the pixels of `image_preprocess='hf'`, pad to square included.
- official: an independent reading of haotian-liu/LLaVA's layout (LLM weights, `model.mm_projector.*`,
  `mm_vision_tower` + stored tower, `mm_vision_select_layer`) gives the checkpoint model's logits.
"""
from __future__ import annotations

import json

import pytest
import torch
from convert_helpers import (IMAGE, LOGIT_ATOL, chat_generator, chat_tokens, error_line, hf_greedy, one_turn_ids,
                             prompt_logits)
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor, AutoTokenizer, CLIPImageProcessor

from vlmtune.cli import main as cli_main
from vlmtune.data.image import ImagePreprocessor, load_image


def truth_generator(truth, variant, xtuner_folder):
    """A Generator over the checkpoint's own LlavaModel (tokenizer/template/preprocessing as chat's)."""
    model, cfg = truth(variant)
    llm = xtuner_folder if (xtuner_folder / "config.json").is_file() else cfg.model.llm_name_or_path  # a full LLM at the root
    reference = chat_generator(str(llm), "--llava", str(xtuner_folder))
    reference.model = model
    return reference


# ---- xtuner layout --------------------------------------------------------------------------------------


def test_xtuner_layout_is_what_xtuner_reads(converted, tiny):
    from peft import PeftConfig

    folder = converted("lora", "xtuner")
    assert sorted(p.name for p in folder.iterdir()) == ["llm_adapter", "projector", "visual_encoder_adapter", "vlmtune_config.py"]
    assert PeftConfig.from_pretrained(folder / "llm_adapter").base_model_name_or_path == str(tiny.llm)
    config = json.loads((folder / "projector" / "config.json").read_text())
    assert {k: config[k] for k in ("model_type", "visual_hidden_size", "llm_hidden_size", "depth", "hidden_act", "bias")} == \
        {"model_type": "projector", "visual_hidden_size": 32, "llm_hidden_size": 64, "depth": 2, "hidden_act": "gelu", "bias": True}
    projector = AutoModel.from_pretrained(folder / "projector", trust_remote_code=True, dtype=torch.float32)
    assert type(projector).__name__ == "ProjectorModel"
    ours = chat_generator(str(tiny.llm), "--llava", str(folder)).model.projector
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(projector(x), ours(x), rtol=0, atol=0)


def test_chat_on_xtuner_folder_is_the_checkpoint_model(converted, truth, tiny):
    folder = converted("lora", "xtuner")
    chat = chat_generator(str(tiny.llm), "--llava", str(folder))
    reference = truth_generator(truth, "lora", folder)
    diff = (prompt_logits(chat) - prompt_logits(reference)).abs().max().item()
    print(f"\nmax |logits chat(xtuner folder) - checkpoint model| = {diff:.2e}")
    assert diff < LOGIT_ATOL
    assert chat_tokens(chat) == chat_tokens(reference)


def test_full_finetune_saves_llm_at_root_and_visual_encoder(converted, truth):
    folder = converted("full", "xtuner")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "projector", "visual_encoder"} <= names
    assert "llm_adapter" not in names and (folder / "visual_encoder" / "preprocessor_config.json").is_file()
    chat = chat_generator(str(folder), "--llava", str(folder))
    reference = truth_generator(truth, "full", folder)
    assert (prompt_logits(chat) - prompt_logits(reference)).abs().max().item() < LOGIT_ATOL


# ---- huggingface layout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["lora", "qwen2", "qlora", "siglip_lora"])
def test_huggingface_folder_generates_as_chat_on_xtuner_folder(variant, converted, tiny, truth):
    hf_folder, xtuner_folder = converted(variant, "huggingface"), converted(variant, "xtuner")
    model, cfg = truth(variant)
    chat = chat_generator(cfg.model.llm_name_or_path, "--llava", str(xtuner_folder))
    hf_tokens, hf_logits = hf_greedy(hf_folder, pixel_values=chat.pixel_values([load_image(IMAGE)]))
    ours = chat_tokens(chat)
    our_logits = prompt_logits(chat)[-1]
    diff = (our_logits - hf_logits).abs().max().item()
    print(f"\n{variant}: transformers {hf_tokens}\n{variant}: vlmtune chat {ours}  max |logit diff| {diff:.2e}")
    assert hf_tokens == ours
    assert diff < LOGIT_ATOL


def test_huggingface_folder_contents(converted, tiny):
    folder = converted("lora", "huggingface")
    config = json.loads((folder / "config.json").read_text())
    processor = json.loads((folder / "processor_config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert config["image_token_index"] == tokenizer.convert_tokens_to_ids("<image>")
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"], config["projector_hidden_act"]) == (-2, "default", "gelu")
    assert processor["image_processor"]["do_pad"] is True and processor["num_additional_image_tokens"] == 1
    assert generation["eos_token_id"] == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    # the saved processor pads to square as training did: the pixels of image_preprocess='hf'
    theirs = AutoProcessor.from_pretrained(folder).image_processor(images=load_image(IMAGE), return_tensors="pt")["pixel_values"][0]
    ours = ImagePreprocessor(CLIPImageProcessor.from_pretrained(tiny.clip), pad_to_square=True, method="hf")(load_image(IMAGE))
    assert torch.equal(theirs, ours)
    keys = load_file(folder / "model.safetensors").keys()
    assert "multi_modal_projector.linear_2.weight" in keys and "language_model.lm_head.weight" in keys
    assert any(k.startswith("vision_tower.vision_model.encoder.") for k in keys)  # the frozen-or-not CLIP is stored


# ---- official layout --------------------------------------------------------------------------------------


def official_logits(folder, pixels: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Logits of haotian-liu/LLaVA's model read from `folder` by hand (independent of vlmtune's loaders)."""
    from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    config = json.loads((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    assert config["architectures"] == ["LlavaLlamaForCausalLM"] and config["mm_projector_type"] == "mlp2x_gelu"
    text_keys = {k: v for k, v in config.items() if not k.startswith(("mm_", "architectures", "model_type"))}
    llm = LlamaForCausalLM(LlamaConfig(**{k: text_keys[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                         "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                                         "max_position_embeddings", "tie_word_embeddings")}))
    llm.load_state_dict({k: v for k, v in state.items() if not k.startswith(("model.mm_projector", "model.vision_tower"))})
    tower = CLIPVisionModel.from_pretrained(config["mm_vision_tower"])
    prefix = "model.vision_tower.vision_tower.vision_model."
    tower.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    projector = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    projector.load_state_dict({k.removeprefix("model.mm_projector."): v for k, v in state.items() if k.startswith("model.mm_projector.")})
    with torch.no_grad():
        features = projector(tower(pixels, output_hidden_states=True).hidden_states[config["mm_vision_select_layer"]][:, 1:])
        at = ids.index(-200)
        embeds = llm.get_input_embeddings()
        sequence = torch.cat([embeds(torch.tensor(ids[:at])), features[0], embeds(torch.tensor(ids[at + 1:]))])
        return llm(inputs_embeds=sequence[None]).logits[0]


def test_official_layout_read_by_hand_gives_the_checkpoint_logits(converted, truth):
    folder = converted("lora", "official")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llava" and config["image_aspect_ratio"] == "pad"
    assert config["unfreeze_mm_vision_tower"] is True and config["mm_vision_select_feature"] == "patch"
    assert config["mm_use_im_start_end"] is False and config["mm_hidden_size"] == 32
    reference = truth_generator(truth, "lora", converted("lora", "xtuner"))
    ids = one_turn_ids(reference)
    pixels = reference.pixel_values([load_image(IMAGE)])
    got = official_logits(folder, pixels, ids)
    diff = (got - prompt_logits(reference)).abs().max().item()
    print(f"\nmax |logits official layout (by hand) - checkpoint model| = {diff:.2e}")
    assert diff < LOGIT_ATOL


# ---- errors ----------------------------------------------------------------------------------------------


def test_checkpoint_of_another_config_is_refused(checkpoint, tmp_path, capsys):
    # the LoRA checkpoint converted with the full-finetune config: its LoRA weights fit nothing
    code = cli_main(["convert", "pth_to_hf", "tiny_llava_pretrain", str(checkpoint("lora")), str(tmp_path / "out")])
    err = error_line(capsys)
    assert code == 2 and "do not fit this model" in err


def test_checkpoint_missing_trained_weights_is_refused(checkpoint, tmp_path, capsys):
    payload = torch.load(checkpoint("lora"), weights_only=True)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if not k.startswith("projector.")}
    torch.save(payload, tmp_path / "partial.pth")
    code = cli_main(["convert", "pth_to_hf", str(tmp_path / "partial.pth"), str(tmp_path / "out")])
    err = error_line(capsys)
    assert code == 2 and "not in the checkpoint" in err and "projector.model.0" in err


def test_siglip_exports_as_transformers_llava_and_refuses_the_official_layout(converted, checkpoint, tmp_path, capsys):
    folder = converted("siglip_lora", "huggingface")
    config = json.loads((folder / "config.json").read_text())
    processor = json.loads((folder / "processor_config.json").read_text())
    assert (config["vision_config"]["model_type"], config["vision_feature_select_strategy"], config["image_seq_length"]) == \
        ("siglip_vision_model", "full", 729)
    assert config["vision_config"]["vision_use_head"] is False  # the pooling head is not exported
    assert not any(".head." in k for k in load_file(folder / "model.safetensors"))
    assert processor["num_additional_image_tokens"] == 0 and processor["image_processor"]["do_center_crop"] is False
    assert cli_main(["convert", "pth_to_hf", str(checkpoint("siglip_lora")), str(tmp_path / "o"), "--save-format", "official"]) == 2
    assert "builds a CLIP vision tower only" in error_line(capsys)


def test_siglip_adapter_merges_with_vision(converted, truth, tiny, tmp_path):
    """`convert merge --vision` (XTuner's --is-clip) merges a SigLIP adapter; chat with the merged encoder gives
    the checkpoint model's logits."""
    xtuner = converted("siglip_lora", "xtuner")
    assert cli_main(["convert", "merge", str(tiny.siglip), str(xtuner / "visual_encoder_adapter"), str(tmp_path / "m"),
                     "--vision"]) == 0
    assert cli_main(["convert", "merge", str(tiny.llm), str(xtuner / "llm_adapter"), str(tmp_path / "llm")]) == 0
    (tmp_path / "p").mkdir()
    for name in ("projector", "vlmtune_config.py"):
        (tmp_path / "p" / name).symlink_to(xtuner / name)
    merged = chat_generator(str(tmp_path / "llm"), "--visual-encoder", str(tmp_path / "m"), "--llava", str(tmp_path / "p"))
    reference = truth_generator(truth, "siglip_lora", xtuner)
    assert (prompt_logits(merged) - prompt_logits(reference)).abs().max().item() < LOGIT_ATOL
