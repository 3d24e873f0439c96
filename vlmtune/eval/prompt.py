"""The MMBench multiple-choice prompt for LLaVA-style models.

Matches XTuner (xtuner/tools/mmbench.py, main(): hint + '\\n' + question + '\\n' + 'A. ...\\n' per option, then
the answer instruction, behind DEFAULT_IMAGE_TOKEN + '\\n'; is_cn_string from xtuner/tools/utils.py) and
VLMEvalKit's LLaVA (vlmeval/vlm/llava/llava.py, build_prompt), which give the same text. The chat template is
applied by the caller, with no system message (XTuner's mmbench.py sets none).
"""
from __future__ import annotations

import re

from vlmtune.constants import DEFAULT_IMAGE_TOKEN
from vlmtune.eval.mmbench_data import Question

_CJK = re.compile("[\u4e00-\u9fff]")  # XTuner is_cn_string / VLMEvalKit cn_string
ANSWER_LETTER_EN = "Answer with the option's letter from the given choices directly."
ANSWER_LETTER_CN = "请直接回答选项字母。"
ANSWER_FREE_EN = "Answer the question directly."  # VLMEvalKit's LLaVA prompt when a row has no options
ANSWER_FREE_CN = "请直接回答问题。"


def is_cn_string(text: str) -> bool:
    """True when the text holds a CJK unified ideograph: the prompt then asks for the letter in Chinese."""
    return _CJK.search(text) is not None


def build_prompt(question: Question) -> str:
    """'<image>\\n' + [hint '\\n'] + question + '\\nA. ..' per option + '\\n' + the answer instruction."""
    return mcq_prompt(question.question, question.options, question.hint)


def mcq_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    """`build_prompt` of a question given by its parts (the synthetic task's training data uses it too)."""
    text = question if hint is None else hint + "\n" + question
    for letter, option in options.items():
        text += f"\n{letter}. {option}"
    cn = is_cn_string(text)  # over hint, question and options, as both references check
    if options:
        text += "\n" + (ANSWER_LETTER_CN if cn else ANSWER_LETTER_EN)
    else:
        text += "\n" + (ANSWER_FREE_CN if cn else ANSWER_FREE_EN)
    return DEFAULT_IMAGE_TOKEN + "\n" + text
