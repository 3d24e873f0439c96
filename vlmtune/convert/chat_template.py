"""Our prompt templates as Jinja chat templates, for the `--save-format huggingface` processor.

The Jinja renders a conversation exactly as data/tokenize.py lays it out in training (BOS before turn 1 and
after each EOS, system text on turn 1, instruction around the user text, answer + suffix, EOS unless the
suffix is the EOS, separator), so `processor.apply_chat_template(messages, add_generation_prompt=True)`
gives plain transformers the prefix the model was trained on. A user message may be a string (with
`<image>` where the image goes) or a list of {"type": "image"} / {"type": "text", "text": ...} items; an
image item renders as `<image>\\n` (LLaVA's placement; `<image>` alone for `plain`). The rendered text
already contains BOS: tokenize it with `add_special_tokens=False` (apply_chat_template(tokenize=True) does).

Training encodes a conversation piece by piece (each turn's prompt cut at every `<image>`, each answer, each
separator), while transformers tokenizes the rendered text in one go. For byte-level BPE tokenizers the two
agree; a SentencePiece tokenizer gives each separately encoded piece a leading "▁", which whole-text
tokenization only reproduces when the text carries a space there. `choose_chunk_prefix` finds out which
holds for a tokenizer, and `jinja_chat_template(template, chunk_prefix)` writes it in.
"""
from __future__ import annotations

import json
import string

from vlmtune.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from vlmtune.data.templates import Template
from vlmtune.data.tokenize import tokenize_conversation

# A conversation that touches every piece the template renders: system text, an image, two turns.
_PROBE_TURNS = [(f"{DEFAULT_IMAGE_TOKEN}\nWhat is it?", "A cat."), ("And its colour?", None)]
_PROBE_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "And its colour?"},
]


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


def jinja_chat_template(template: Template, chunk_prefix: str = "") -> str:
    """The Jinja chat template that renders `template` as training does (see module docstring).

    `chunk_prefix` is written before every piece of text that training tokenizes on its own (the prompt of a
    turn cut at each `<image>`, the answer + suffix, the separator): " " for a SentencePiece tokenizer that
    gives each separately encoded piece a leading "▁", so that tokenizing the whole rendered text reproduces
    training's ids (see `choose_chunk_prefix`).
    """
    # `plain` (LLaVA pretraining) drops the user's text and keeps only their images.
    user_keeps_text = "true" if template.keep_instruction_text else "false"
    image = _literal(f"{DEFAULT_IMAGE_TOKEN}\n" if template.keep_instruction_text else DEFAULT_IMAGE_TOKEN)
    n_images = "content.count('" + DEFAULT_IMAGE_TOKEN + "')"
    eos = "" if template.suffix_as_eos else "{{ eos_token }}"
    prefix = _literal(chunk_prefix)
    parts = [
        # pieces(text): `text` as training encodes it, chunk by chunk between images, each non-empty chunk prefixed
        "{%- macro pieces(text) -%}{%- for chunk in text.split('" + DEFAULT_IMAGE_TOKEN + "') -%}",
        "{%- if not loop.first -%}" + _literal(DEFAULT_IMAGE_TOKEN) + "{%- endif -%}",
        "{%- if chunk -%}" + prefix + "{{ chunk }}{%- endif -%}{%- endfor -%}{%- endmacro -%}",
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
        "{%- set prompt -%}",
        "{%- if ns.round == 1 and ns.system -%}" + _format_to_jinja(template.system, {"system": "ns.system"}) + "{%- endif -%}",
        _format_to_jinja(template.instruction, {"input": "render(message['content'], " + user_keeps_text + ")", "round": "ns.round"}),
        "{%- endset -%}{{ pieces(prompt) }}",
        "{%- elif message['role'] == 'assistant' -%}",
        "{%- set answer -%}{{ render(message['content'], true) }}" + _literal(template.suffix) + "{%- endset -%}",
        "{{ pieces(answer) }}" + eos + ("{{ pieces(" + json.dumps(template.sep) + ") }}" if template.sep else ""),
        "{%- set ns.bos = " + ("false" if template.suffix_as_eos else "true") + " -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
    return "".join(parts)


def choose_chunk_prefix(template: Template, tokenizer) -> str | None:
    """The `chunk_prefix` ("" or " ") with which tokenizing the rendered text gives training's ids, for this
    tokenizer (which must know `<image>`); None when neither does (the caller warns)."""
    image_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    want = tokenize_conversation(_PROBE_TURNS, tokenizer, template, 1 << 30, 1, "Be brief.").input_ids
    want = [image_id if i == IMAGE_TOKEN_INDEX else i for i in want]
    for prefix in ("", " "):
        text = tokenizer.apply_chat_template(_PROBE_MESSAGES, chat_template=jinja_chat_template(template, prefix),
                                             tokenize=False, add_generation_prompt=True)
        if tokenizer(text, add_special_tokens=False)["input_ids"] == want:
            return prefix
    return None
