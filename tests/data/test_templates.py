"""Prompt templates against XTuner's table (xtuner/utils/templates.py) and LLaVA's `plain`, written out here.

The reference strings below are typed from XTuner's PROMPT_TEMPLATE (SYSTEM / INSTRUCTION / SUFFIX /
SUFFIX_AS_EOS / SEP / STOP_WORDS; a missing key there means '' / False / []). `plain` is not in XTuner: it is
LLaVA's `conv_llava_plain` (pretraining: image, caption, "\\n"; no system, no roles).
"""
from __future__ import annotations

import pytest

from vlmtune.data.templates import TEMPLATES, get_template
from vlmtune.errors import UserError

XTUNER = {
    "internlm2_chat": dict(
        system="<|im_start|>system\n{system}<|im_end|>\n",
        instruction="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        suffix="<|im_end|>", suffix_as_eos=True, sep="\n", stop_words=("<|im_end|>",),
    ),
    "vicuna": dict(
        system="A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. {system}\n ",
        instruction="USER: {input} ASSISTANT:",
        suffix="", suffix_as_eos=False, sep="\n", stop_words=(),
    ),
    "llama3_chat": dict(
        system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        instruction="<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        suffix="<|eot_id|>", suffix_as_eos=True, sep="", stop_words=("<|eot_id|>",),
    ),
    "qwen_chat": dict(
        system="<|im_start|>system\n{system}<|im_end|>\n",
        instruction="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        suffix="<|im_end|>", suffix_as_eos=True, sep="\n", stop_words=("<|im_end|>", "<|endoftext|>"),
    ),
    "phi3_chat": dict(
        system="<|system|>\n{system}<|end|>\n",
        instruction="<|user|>\n{input}<|end|>\n<|assistant|>\n",
        suffix="<|end|>", suffix_as_eos=True, sep="\n", stop_words=("<|end|>",),
    ),
    "plain": dict(system="", instruction="{input}", suffix="\n", suffix_as_eos=True, sep="", stop_words=("\n",)),
}


def test_the_template_set_is_exactly_the_documented_one():
    assert set(TEMPLATES) == set(XTUNER)


@pytest.mark.parametrize("name", sorted(XTUNER))
def test_template_fields_match_xtuner(name):
    template = get_template(name)
    for field, expected in XTUNER[name].items():
        assert getattr(template, field) == expected, f"{name}.{field}"


def test_internlm2_turns_render_system_only_in_turn_one():
    t = get_template("internlm2_chat")
    assert t.render_input("Hi?", 1, system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert t.render_input("More?", 2, system="Be brief.") == "<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n"
    assert t.render_input("Hi?", 1) == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert t.render_output("Yes.") == "Yes.<|im_end|>"


def test_vicuna_renders_llava_v1_strings():
    t = get_template("vicuna")
    assert t.render_input("<image>\nWhat is it?", 1, system="Be brief.") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. Be brief.\n USER: <image>\nWhat is it? ASSISTANT:"
    )
    assert t.render_output("A cat.") == "A cat."  # vicuna ends a turn with EOS, added by tokenize


def test_plain_keeps_only_the_images_of_the_human_turn():
    t = get_template("plain")
    assert t.render_input("<image>\nDescribe the photo briefly.", 1) == "<image>"
    assert t.render_input("<image>\n<image>\nCompare.", 1) == "<image><image>"
    assert t.render_input("No image here.", 2) == ""
    assert t.render_input("<image>\nDescribe.", 1, system="Be brief.") == "<image>"  # LLaVA plain has no system
    assert t.render_output("A cat on a mat.") == "A cat on a mat.\n"


def test_unknown_template_is_a_user_error_listing_the_names():
    with pytest.raises(UserError) as e:
        get_template("vicuna_v1")
    assert "'vicuna_v1'" in str(e.value)
    for name in XTUNER:
        assert name in str(e.value)
