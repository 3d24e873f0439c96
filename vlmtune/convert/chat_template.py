"""Our prompt templates as Jinja chat templates, for the `--save-format huggingface` processor.

The Jinja renders a conversation exactly as data/tokenize.py lays it out in training (BOS before turn 1 and
after each EOS, system text on turn 1, instruction around the user text, answer + suffix, EOS unless the
suffix is the EOS, separator), so `processor.apply_chat_template(messages, add_generation_prompt=True)`
gives plain transformers the prefix the model was trained on. A user message may be a string (with
`<image>` where the image goes) or a list of {"type": "image"} / {"type": "text", "text": ...} items; an
image item renders as `<image>\\n` (LLaVA's placement; `<image>` alone for `plain`). The rendered text
already contains BOS: tokenize it with `add_special_tokens=False` (apply_chat_template(tokenize=True) does).
"""
from __future__ import annotations

import json
import string

from vlmtune.constants import DEFAULT_IMAGE_TOKEN
from vlmtune.data.templates import Template


def _literal(text: str) -> str:
    """`text` as a Jinja expression that prints it unchanged."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def _format_to_jinja(pattern: str, fields: dict[str, str]) -> str:
    """A str.format pattern (e.g. 'USER: {input} ASSISTANT:') as Jinja, each {field} printing `fields[field]`."""
    out = []
    for literal, field, _, _ in string.Formatter().parse(pattern):
        out.append(_literal(literal))
        if field is not None:
            out.append("{{ " + fields[field] + " }}")
    return "".join(out)


def jinja_chat_template(template: Template) -> str:
    """The Jinja chat template that renders `template` as training does (see module docstring)."""
    # `plain` (LLaVA pretraining) drops the user's text and keeps only their images.
    user_keeps_text = "true" if template.keep_instruction_text else "false"
    image = _literal(f"{DEFAULT_IMAGE_TOKEN}\n" if template.keep_instruction_text else DEFAULT_IMAGE_TOKEN)
    n_images = "content.count('" + DEFAULT_IMAGE_TOKEN + "')"
    eos = "" if template.suffix_as_eos else "{{ eos_token }}"
    parts = [
        "{%- macro render(content, keep_text) -%}",
        "{%- if content is string -%}",
        "{%- if keep_text -%}{{ content }}{%- else -%}{{ '" + DEFAULT_IMAGE_TOKEN + "' * " + n_images + " }}{%- endif -%}",
        "{%- else -%}{%- for item in content -%}",
        "{%- if item['type'] == 'image' -%}" + image,
        "{%- elif item['type'] == 'text' and keep_text -%}{{ item['text'] }}{%- endif -%}",
        "{%- endfor -%}{%- endif -%}",
        "{%- endmacro -%}",
        "{%- set ns = namespace(round=0, system='', bos=true) -%}",
        "{%- for message in messages if message['role'] == 'system' -%}",
        "{%- set ns.system = render(message['content'], true) -%}{%- endfor -%}",
        "{%- for message in messages -%}",
        "{%- if message['role'] == 'user' -%}",
        "{%- set ns.round = ns.round + 1 -%}",
        "{%- if ns.bos and bos_token -%}{{ bos_token }}{%- endif -%}",
        "{%- if ns.round == 1 and ns.system -%}" + _format_to_jinja(template.system, {"system": "ns.system"}) + "{%- endif -%}",
        _format_to_jinja(template.instruction, {"input": "render(message['content'], " + user_keeps_text + ")", "round": "ns.round"}),
        "{%- elif message['role'] == 'assistant' -%}",
        "{{ render(message['content'], true) }}" + _literal(template.suffix) + eos + _literal(template.sep),
        "{%- set ns.bos = " + ("false" if template.suffix_as_eos else "true") + " -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
    return "".join(parts)
