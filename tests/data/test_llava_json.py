"""LLaVA record normalisation (XTuner's llava_map_fn rules, plus named errors)."""
from __future__ import annotations

import pytest

from vlmtune.data.llava_json import RecordError, normalize_record


def msgs(*pairs):
    return [{"from": role, "value": value} for role, value in pairs]


# ---- normalising one record


def test_image_goes_to_the_front_of_its_human_turn():
    raw = {"id": "x", "image": "a/b.jpg", "conversations": msgs(("human", "What is this?\n<image>"), ("gpt", "A cat."))}
    sample = normalize_record(raw, 7)
    assert (sample.id, sample.images, sample.turns) == ("x", ["a/b.jpg"], [("<image>\nWhat is this?", "A cat.")])


def test_image_token_alone_is_stripped_like_xtuner():
    raw = {"image": "a.jpg", "conversations": msgs(("human", "  <image>\n "), ("gpt", "A cat."))}
    assert normalize_record(raw, 3).turns == [("<image>", "A cat.")]
    assert normalize_record(raw, 3).id == "3"  # no id: the record index


def test_multi_turn_text_only_with_user_assistant_roles_and_system():
    raw = {"conversations": msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye"), ("assistant", "Bye"))}
    sample = normalize_record(raw, 0)
    assert (sample.system, sample.images, sample.turns) == ("Be brief.", [], [("Hi", "Hello"), ("Bye", "Bye")])


def test_leading_assistant_messages_and_a_trailing_question_are_dropped():
    raw = {"conversations": msgs(("gpt", "hello"), ("gpt", "again"), ("human", "Q"), ("gpt", "A"), ("human", "unanswered"))}
    assert normalize_record(raw, 0).turns == [("Q", "A")]


def llava_preprocess_multimodal(value: str) -> str:
    """haotian-liu/LLaVA llava/train/train.py `preprocess_multimodal` on one message (XTuner's `llava_map_fn`
    does the same three lines): every tag removed, one `<image>\\n` in front."""
    if "<image>" in value:
        value = value.replace("<image>", "").strip()
        value = "<image>" + "\n" + value
        value = value.strip()
    return value


@pytest.mark.parametrize("value", ["<image><image>", "<image> What? <image>", "Compare <image> and\n<image>\n  ",
                                   "<image>\n<image>\n<image>\nthree"])
def test_repeated_tags_for_one_image_collapse_as_llava_and_xtuner_do(value):
    for image in ("a.jpg", ["a.jpg"]):
        raw = {"image": image, "conversations": msgs(("human", "hi"), ("gpt", "A"), ("human", value), ("gpt", "B"))}
        sample = normalize_record(raw, 0)
        assert sample.turns == [("hi", "A"), (llava_preprocess_multimodal(value), "B")]
        assert [kind for kind, _ in sample.notes] == ["image_tokens_collapsed"] and "turn 2" in sample.notes[0][1]


def test_one_tag_per_image_is_not_a_collapse():
    raw = {"image": "a.jpg", "conversations": msgs(("human", "x <image>"), ("gpt", "A"))}
    assert normalize_record(raw, 0).notes == []


def test_image_list_with_matching_tokens_in_two_turns():
    raw = {"image": ["a.jpg", "b.jpg"], "conversations": msgs(("human", "<image> one"), ("gpt", "A"), ("human", "two <image>"), ("gpt", "B"))}
    sample = normalize_record(raw, 0)
    assert sample.images == ["a.jpg", "b.jpg"]
    assert sample.turns == [("<image>\none", "A"), ("<image>\ntwo", "B")]


BAD = {
    "not_an_object": ["just a string"],
    "missing_conversations": [{"image": None}, {"conversations": []}, {"conversations": "hi"}],
    "bad_image_field": [
        {"image": "", "conversations": msgs(("human", "<image>"), ("gpt", "a"))},
        {"image": [], "conversations": msgs(("human", "<image>"), ("gpt", "a"))},
        {"image": ["a.jpg", 3], "conversations": msgs(("human", "<image><image>"), ("gpt", "a"))},
    ],
    "image_token_missing": [
        {"image": "a.jpg", "conversations": msgs(("human", "describe"), ("gpt", "a"))},
        {"image": "a.jpg", "conversations": msgs(("human", "hi"), ("gpt", "a"), ("human", "<image>\nand this?"))},
    ],
    "image_token_without_image": [{"conversations": msgs(("human", "<image>\ndescribe"), ("gpt", "a"))}],
    "too_many_image_tokens": [
        {"image": "a.jpg", "conversations": msgs(("human", "<image>"), ("gpt", "a"), ("human", "<image>"), ("gpt", "b"))},
        {"image": ["a.jpg", "b.jpg"], "conversations": msgs(("human", "<image><image><image>"), ("gpt", "a"))},
    ],
    "too_few_image_tokens": [{"image": ["a.jpg", "b.jpg"], "conversations": msgs(("human", "<image>"), ("gpt", "a"))}],
    "bad_message": [{"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}, {"conversations": ["hi"]}],
    "non_string_value": [{"conversations": msgs(("human", ["q"]), ("gpt", "a"))}],
    "invalid_unicode": [  # lone surrogates: json.loads("\"\\ud800\"") gives one; no tokenizer or Arrow takes it
        {"conversations": msgs(("human", "q \ud800"), ("gpt", "a"))},
        {"conversations": msgs(("human", "q"), ("gpt", "\udfff"))},
        {"id": "x\ud83d", "conversations": msgs(("human", "q"), ("gpt", "a"))},
        {"image": "a\udc80.jpg", "conversations": msgs(("human", "<image>"), ("gpt", "a"))},
    ],
    "roles_out_of_order": [
        {"conversations": msgs(("human", "q"), ("gpt", "a"), ("gpt", "b"))},
        {"conversations": msgs(("human", "q1"), ("human", "q2"), ("gpt", "a"))},
    ],
    "unknown_role": [{"conversations": msgs(("human", "q"), ("bot", "a"))}, {"conversations": msgs(("human", "q"), ("system", "late"))}],
    "no_assistant_turn": [{"conversations": msgs(("human", "q"))}, {"conversations": msgs(("gpt", "orphan"))}],
}


@pytest.mark.parametrize("kind,raw", [(k, r) for k, rs in BAD.items() for r in rs])
def test_bad_records_raise_their_kind(kind, raw):
    with pytest.raises(RecordError) as e:
        normalize_record(raw, 0)
    assert e.value.kind == kind
    assert str(e.value).startswith(f"{kind}: ")


def test_image_marker_in_an_answer_is_rejected():
    raw = {"image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat <image>"}]}
    with pytest.raises(RecordError) as info:
        normalize_record(raw, 0)
    assert info.value.kind == "image_token_in_answer"
