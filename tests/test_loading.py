"""`vlmtune.loading.load_generator`: every way the CLI names a model gives the same model, and wrong
combinations of flags are one-line user errors.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from convert.convert_helpers import LOGIT_ATOL, checkpoint, chat_generator, converted, prompt_logits  # noqa: F401

from vlmtune.errors import UserError


@pytest.fixture(scope="module")
def xtuner_generator(converted, tiny):
    return chat_generator(str(tiny.llm), "--llava", str(converted("lora", "xtuner")))


def test_huggingface_folder_loads_as_the_same_model(xtuner_generator, converted):
    hf = chat_generator(str(converted("lora", "huggingface")))
    assert hf.template == xtuner_generator.template and hf.image_length == xtuner_generator.image_length == 576
    assert hf.preprocess.pad_to_square and xtuner_generator.preprocess.pad_to_square  # from the training config
    assert not hf.preprocess.image_processor.do_pad  # padding happens once, in ImagePreprocessor
    diff = (prompt_logits(hf) - prompt_logits(xtuner_generator)).abs().max().item()
    print(f"\nmax |logits huggingface folder - xtuner folder| = {diff:.2e}")
    assert diff < LOGIT_ATOL


def test_settings_come_from_the_saved_config_and_flags_override(xtuner_generator, converted, tiny):
    folder = converted("lora", "xtuner")
    assert xtuner_generator.model.visual_select_layer == -2 and xtuner_generator.template.name == "internlm2_chat"
    other = chat_generator(str(tiny.llm), "--llava", str(folder), "--visual-select-layer", "-1", "--prompt-template", "vicuna",
                           "--system", "Be brief.")
    assert other.model.visual_select_layer == -1 and other.template.name == "vicuna" and other.system == "Be brief."
    # the wrong CLIP layer is far outside the tolerance the equivalence tests use
    wrong_layer = chat_generator(str(tiny.llm), "--llava", str(folder), "--visual-select-layer", "-1")
    assert (prompt_logits(wrong_layer) - prompt_logits(xtuner_generator)).abs().max().item() > 20 * LOGIT_ATOL


def test_projector_only_folder_needs_a_template(converted, tiny, tmp_path):
    shutil.copytree(converted("lora", "xtuner") / "projector", tmp_path / "projector")
    with pytest.raises(UserError, match="no --prompt-template given"):
        chat_generator(str(tiny.llm), "--llava", str(tmp_path), "--visual-encoder", str(tiny.clip))
    generator = chat_generator(str(tiny.llm), "--llava", str(tmp_path), "--visual-encoder", str(tiny.clip),
                               "--prompt-template", "vicuna")
    assert generator.template.name == "vicuna" and not hasattr(generator.model.llm, "peft_config")


@pytest.mark.parametrize("argv, message", [
    (["--adapter", "{llava}/llm_adapter"], "both give an LLM adapter"),
    (["--bits", "4"], None),  # allowed with --llava: the LLM loads quantized
])
def test_flag_combinations_with_llava(argv, message, converted, tiny):
    folder = converted("lora", "xtuner")
    args = [a.format(llava=folder) for a in argv]
    if message:
        with pytest.raises(UserError, match=message):
            chat_generator(str(tiny.llm), "--llava", str(folder), *args)
        return
    generator = chat_generator(str(tiny.llm), "--llava", str(folder), *args)
    quantized = [m for m in generator.model.llm.modules() if type(m).__name__ == "Linear4bit"]
    assert quantized and torch.isfinite(prompt_logits(generator)).all()


def test_trained_visual_encoder_folder_excludes_the_flag(converted, tiny):
    folder = converted("full", "xtuner")
    with pytest.raises(UserError, match="--visual-encoder is not used"):
        chat_generator(str(folder), "--llava", str(folder), "--visual-encoder", str(tiny.clip))


def test_huggingface_folder_refuses_part_flags(converted, tiny):
    with pytest.raises(UserError, match="complete huggingface-layout model"):
        chat_generator(str(converted("lora", "huggingface")), "--visual-encoder", str(tiny.clip))


def test_no_projector_anywhere(tiny):
    with pytest.raises(UserError, match="no projector: pass --llava"):
        chat_generator(str(tiny.llm), "--prompt-template", "vicuna")
