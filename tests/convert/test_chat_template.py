"""The huggingface layout's Jinja chat template renders every shipped template exactly as training tokenizes.

Reference: `tokenize_conversation` (the one masking/layout rule), with IMAGE_TOKEN_INDEX written as the id of
`<image>`. Checked for the tiny byte-level BPE (chat tokens are special) and a real 32k SentencePiece Llama
tokenizer (chat tokens are ordinary text there, and each separately encoded piece gets a leading "▁": the
template then needs chunk_prefix " ", which `choose_chunk_prefix` finds), with and without a system text,
1 and 2 turns, image items and string content.
"""
from __future__ import annotations

import copy

import pytest

from vlmtune.constants import IMAGE_TOKEN_INDEX
from vlmtune.convert.chat_template import choose_chunk_prefix, jinja_chat_template
from vlmtune.data.templates import TEMPLATES
from vlmtune.data.tokenize import tokenize_conversation

CONVERSATIONS = {
    "one turn, image item": ([("<image>\nWhat is it?", None)],
                             [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]),
    "two turns, string content": ([("<image>\nWhat is it?", "A cat."), ("And its colour?", None)],
                                  [{"role": "user", "content": "<image>\nWhat is it?"},
                                   {"role": "assistant", "content": "A cat."},
                                   {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]}]),
}


@pytest.mark.parametrize("system", ["", "Answer briefly."])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("which, chunk_prefix", [("tiny_tokenizer", ""), ("real_tokenizer", " ")])
def test_jinja_equals_training_tokenization(which, chunk_prefix, template, conversation, system, request):
    tokenizer = copy.deepcopy(request.getfixturevalue(which))  # the session fixtures stay unmodified
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens(["<image>"], special_tokens=True)  # what convert does for such a tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    turns, messages = CONVERSATIONS[conversation]
    if system:
        messages = [{"role": "system", "content": system}, *messages]
    want = tokenize_conversation(turns, tokenizer, TEMPLATES[template], 1 << 30, 1, system).input_ids
    want = [image_id if i == IMAGE_TOKEN_INDEX else i for i in want]
    assert choose_chunk_prefix(TEMPLATES[template], tokenizer) == chunk_prefix
    text = tokenizer.apply_chat_template(messages, chat_template=jinja_chat_template(TEMPLATES[template], chunk_prefix),
                                         tokenize=False, add_generation_prompt=True)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == want, text
