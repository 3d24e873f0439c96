"""LLaVA JSON reading and record normalisation (XTuner's llava_map_fn rules, plus named errors)."""
from __future__ import annotations

import json

import pytest

from vlmtune.data.llava_json import RecordError, normalize_record, read_records, record_chunks
from vlmtune.errors import UserError


def msgs(*pairs):
    return [{"from": role, "value": value} for role, value in pairs]


# ---- reading files


def test_json_list_and_jsonl_give_the_same_records(tmp_path):
    records = [{"id": i, "conversations": msgs(("human", f"q{i}"), ("gpt", f"a{i}"))} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(records), encoding="utf-8")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n" + json.dumps(records[2]) + "\n")
    assert list(read_records(tmp_path / "d.json")) == records
    assert list(read_records(tmp_path / "d.jsonl")) == records  # blank lines are skipped


def test_broken_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"id": 1},\n  {"id": 2,,}\n]')
    with pytest.raises(UserError, match=r"bad\.json: invalid JSON at line 3 column 12"):
        list(read_records(path))


def test_broken_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1}\n{"id": 2\n')
    with pytest.raises(UserError, match=r"bad\.jsonl: invalid JSON at line 2 "):
        list(read_records(path))


def test_missing_file_and_non_list_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        list(read_records(tmp_path / "nope.json"))
    (tmp_path / "obj.json").write_text('{"conversations": []}')
    with pytest.raises(UserError, match=r"found an object \(one record per line\? name the file \.jsonl\); expected a JSON list of records"):
        list(read_records(tmp_path / "obj.json"))


@pytest.mark.parametrize("ending", ["\r\n", "\r"])
def test_check_and_training_split_jsonl_lines_alike(tmp_path, ending):
    """CRLF lines are records to both readers; a bare "\r" (old Mac) is no line break to either, so data check
    and the table build report the same records."""
    from vlmtune.data.llava_json import JSONSyntaxError, parse_chunk

    record = '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}'
    path = tmp_path / "x.jsonl"
    path.write_bytes(ending.join([record] * 3).encode() + ending.encode())

    def kinds(records):
        return [type(r).__name__ for r in records]

    checked = []
    try:
        checked = list(read_records(path))
    except JSONSyntaxError as e:
        checked = [e]
    built = [r for chunk in record_chunks(path, 40) for r in parse_chunk(path, chunk)]
    assert kinds(checked) == kinds(built) == (["dict"] * 3 if ending == "\r\n" else ["JSONSyntaxError"])


@pytest.mark.parametrize("name", ["x.json", "x.jsonl"])
def test_gzip_and_latin1_files_are_one_line_errors_in_check_and_in_training(tmp_path, name):
    import gzip

    from vlmtune.data.table import Settings, write_table
    from vlmtune.data.templates import get_template

    record = '[{"conversations": [{"from": "human", "value": "caf\u00e9"}, {"from": "gpt", "value": "ok"}]}]'
    if name.endswith(".jsonl"):
        record = record[1:-1]
    cases = {"gz": (gzip.compress(record.encode()), "gzip-compressed: unpack it first"),
             "latin1": (record.encode("latin-1"), r"not UTF-8 text \(invalid continuation byte\): convert it to UTF-8")}
    for kind, (data, message) in cases.items():
        path = tmp_path / kind / name
        path.parent.mkdir()
        path.write_bytes(data)
        with pytest.raises(UserError, match=message):  # data check's reader
            list(read_records(path))
        with pytest.raises(UserError, match=message):  # the table build: chunks, then the located error
            write_table(Settings(str(path), get_template("vicuna"), 2048, 576, ""), None, tmp_path / kind / "t.arrow")


def test_a_json_list_named_jsonl_says_so_in_check_and_in_training(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('\n  [\n {"conversations": []},\n {"conversations": []}\n]\n')
    message = r"list\.jsonl: starts with `\[`, a JSON list, not one record per line; name the file \.json"
    with pytest.raises(UserError, match=message):  # data check's reader
        list(read_records(path))
    with pytest.raises(UserError, match=message):  # the table build's chunker
        list(record_chunks(path))


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
