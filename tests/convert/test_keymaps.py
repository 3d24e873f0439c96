"""The key maps' rule: longest matching prefix, reversible, nothing dropped silently."""
from __future__ import annotations

import pytest
import torch

from vlmtune.convert import keymaps
from vlmtune.weights import rename
from vlmtune.errors import UserError

OURS = ["llm.model.layers.0.self_attn.q_proj.weight", "llm.lm_head.weight", "visual_encoder.embeddings.class_embedding",
        "projector.model.0.weight", "projector.model.2.bias"]


@pytest.mark.parametrize("rules, expected", [
    (keymaps.HUGGINGFACE_LLAVA, ["language_model.model.layers.0.self_attn.q_proj.weight", "language_model.lm_head.weight",
                                 "vision_tower.vision_model.embeddings.class_embedding",
                                 "multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.bias"]),
    (keymaps.OFFICIAL_LLAVA, ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight",
                              "model.vision_tower.vision_tower.vision_model.embeddings.class_embedding",
                              "model.mm_projector.0.weight", "model.mm_projector.2.bias"]),
])
def test_rename_and_back(rules, expected):
    state = {k: torch.tensor(float(i)) for i, k in enumerate(OURS)}
    theirs = rename(state, rules)
    assert list(theirs) == expected
    assert rename(theirs, rules, reverse=True) == state  # the longest prefix wins: model.mm_projector before model.


def test_unmatched_key_is_an_error():
    with pytest.raises(UserError, match="no key map rule for weight 'llm.transformer.h.0.attn.weight'"):
        rename({"llm.transformer.h.0.attn.weight": torch.zeros(1)}, keymaps.HUGGINGFACE_LLAVA)
