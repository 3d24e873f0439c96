"""Prompt templates: the exact strings each chat model was trained with.

The strings are XTuner's (xtuner/utils/templates.py), so data tokenized here matches what XTuner users
trained and evaluated with. A turn is laid out as

    [system.format(system=...)]  instruction.format(input=..., round=n)  output + suffix  [EOS]  sep

where EOS is added (with loss) only when the suffix is not itself the end-of-turn token
(`suffix_as_eos=False`, e.g. vicuna), and `sep` (no loss) follows every assistant turn.
`plain` is LLaVA's pretraining format: the image then the caption then a newline, no chat wrapper, and the
human text and any system text dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vlmtune.constants import DEFAULT_IMAGE_TOKEN
from vlmtune.errors import UserError


@dataclass(frozen=True)
class Template:
    """One chat format. Fields mirror XTuner's SYSTEM / INSTRUCTION / SUFFIX / SUFFIX_AS_EOS / SEP / STOP_WORDS."""

    name: str
    system: str = "{system}"
    instruction: str = "{input}"
    suffix: str = ""
    suffix_as_eos: bool = False
    sep: str = ""
    stop_words: tuple[str, ...] = field(default_factory=tuple)
    keep_instruction_text: bool = True  # False for `plain`: the user's text is dropped, only images remain

    def render_input(self, user: str, round_idx: int, system: str = "") -> str:
        """Text of the (unsupervised) prompt part of turn `round_idx` (1-based); system text only on turn 1."""
        if not self.keep_instruction_text:
            user = DEFAULT_IMAGE_TOKEN * user.count(DEFAULT_IMAGE_TOKEN)
        text = self.instruction.format(input=user, round=round_idx)
        if system and round_idx == 1:
            text = self.system.format(system=system) + text
        return text

    def render_output(self, answer: str) -> str:
        """Text of the supervised part of a turn: the answer followed by the template's suffix."""
        return answer + self.suffix


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions. {system}\n "
)

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        Template(
            name="internlm2_chat",
            system="<|im_start|>system\n{system}<|im_end|>\n",
            instruction="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
            suffix="<|im_end|>",
            suffix_as_eos=True,
            sep="\n",
            stop_words=("<|im_end|>",),
        ),
        Template(
            name="vicuna",
            system=_VICUNA_SYSTEM,
            instruction="USER: {input} ASSISTANT:",
            sep="\n",
        ),
        Template(
            name="llama3_chat",
            system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
            instruction=(
                "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n"
            ),
            suffix="<|eot_id|>",
            suffix_as_eos=True,
            stop_words=("<|eot_id|>",),
        ),
        Template(
            name="qwen_chat",
            system="<|im_start|>system\n{system}<|im_end|>\n",
            instruction="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
            suffix="<|im_end|>",
            suffix_as_eos=True,
            sep="\n",
            stop_words=("<|im_end|>", "<|endoftext|>"),
        ),
        Template(
            name="phi3_chat",
            system="<|system|>\n{system}<|end|>\n",
            instruction="<|user|>\n{input}<|end|>\n<|assistant|>\n",
            suffix="<|end|>",
            suffix_as_eos=True,
            sep="\n",
            stop_words=("<|end|>",),
        ),
        Template(
            name="plain",
            system="",  # LLaVA's conv_llava_plain has no system text; a configured one is dropped
            instruction="{input}",
            suffix="\n",
            suffix_as_eos=True,
            stop_words=("\n",),
            keep_instruction_text=False,
        ),
    ]
}


def get_template(name: str) -> Template:
    """The template called `name`; a user error listing the known names otherwise."""
    if name not in TEMPLATES:
        raise UserError(f"unknown prompt template {name!r}; choose one of: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]
