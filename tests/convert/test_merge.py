"""`vlmtune convert merge`: LoRA merged into the LLM and into CLIP gives the model chat runs with the adapters.

The adapters come from a converted checkpoint (xtuner layout); the merged LLM and CLIP are then used as plain
models with only the projector from the converted folder. Greedy tokens of a two-turn chat must be equal and
the prompt logits close (merging changes only float rounding).
"""
from __future__ import annotations

import shutil

import pytest
import torch
from convert_helpers import IMAGE, LOGIT_ATOL, MAX_NEW, chat_generator, error_line, prompt_logits

from vlmtune.chat import Conversation
from vlmtune.cli import main as cli_main
from vlmtune.data.image import load_image


@pytest.fixture(scope="module")
def merged(converted, tiny, tmp_path_factory):
    """(adapter Generator, merged Generator) of the `lora` checkpoint."""
    folder, root = converted("lora", "xtuner"), tmp_path_factory.mktemp("merged")
    assert cli_main(["convert", "merge", str(tiny.llm), str(folder / "llm_adapter"), str(root / "llm")]) == 0
    assert cli_main(["convert", "merge", str(tiny.clip), str(folder / "visual_encoder_adapter"), str(root / "clip"), "--is-clip"]) == 0
    (root / "projector_only").mkdir()
    shutil.copytree(folder / "projector", root / "projector_only" / "projector")
    shutil.copy(folder / "vlmtune_config.py", root / "projector_only")
    adapter = chat_generator(str(tiny.llm), "--llava", str(folder))
    plain = chat_generator(str(root / "llm"), "--visual-encoder", str(root / "clip"), "--llava", str(root / "projector_only"))
    return adapter, plain, root


def test_merged_folders_are_plain_models(merged):
    _, plain, root = merged
    assert not hasattr(plain.model.llm, "peft_config") and not hasattr(plain.model.visual_encoder, "peft_config")
    assert (root / "llm" / "tokenizer.json").is_file() and (root / "clip" / "preprocessor_config.json").is_file()
    assert not list((root / "llm").glob("adapter_*"))


def test_merge_then_chat_equals_adapter_chat(merged):
    adapter, plain, _ = merged
    diff = (prompt_logits(adapter) - prompt_logits(plain)).abs().max().item()
    answers = []
    for generator in (adapter, plain):
        conversation = Conversation(generator, load_image(IMAGE))
        conversation.ask("Describe the image.", max_new_tokens=MAX_NEW, do_sample=False)
        conversation.ask("What colour is it?", max_new_tokens=MAX_NEW, do_sample=False)
        answers.append([turn[1] for turn in conversation.turns])
    print(f"\nmax |logits merged - adapters| = {diff:.2e}; answers {answers[0]}")
    assert diff < LOGIT_ATOL
    assert answers[0] == answers[1]


def test_clip_adapter_on_llm_is_a_user_error(converted, tiny, tmp_path, capsys):
    folder = converted("lora", "xtuner")
    code = cli_main(["convert", "merge", str(tiny.llm), str(folder / "visual_encoder_adapter"), str(tmp_path / "x")])
    assert code == 2 and "does not fit" in error_line(capsys)


def test_not_an_adapter_folder(tiny, tmp_path, capsys):
    code = cli_main(["convert", "merge", str(tiny.llm), str(tmp_path), str(tmp_path / "x")])
    assert code == 2 and "not a peft adapter folder" in error_line(capsys)


def test_merged_weights_equal_base_plus_scaled_lora(merged, converted, tiny):
    """W' = W + (alpha / r) * B @ A for one projection, from the files alone."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    folder = converted("lora", "xtuner")
    config = PeftConfig.from_pretrained(folder / "llm_adapter")
    lora = load_file(folder / "llm_adapter" / "adapter_model.safetensors")
    base = load_file(tiny.llm / "model.safetensors")
    out = load_file(merged[2] / "llm" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    a, b = lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"]
    want = base[f"{name}.weight"] + (config.lora_alpha / config.r) * b @ a
    torch.testing.assert_close(out[f"{name}.weight"], want)
    assert not torch.equal(out[f"{name}.weight"], base[f"{name}.weight"])
