"""The one reader (data/reader.py): how files are cut and framed into records, the errors it names, and that
`data check` and the table build, which both read through it, see the same records, indices and lines and
drop the same bad ones (on the bad corpus, as .json and .jsonl, and on the broken files)."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from bad_corpus import MAX_LENGTH, build_broken_files, build_corpus, corpus_as_jsonl

from vlmtune.config import DataConfig
from vlmtune.data import check, reader
from vlmtune.data.dataset import build_table
from vlmtune.data.reader import (
    JSONSyntaxError,
    parse_chunk,
    read_chunk,
    read_records,
    record_chunks,
)
from vlmtune.data.templates import get_template
from vlmtune.data.workers import map_chunks
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



# ---- cutting files into chunks


TRICKY = [
    {"id": "q", "conversations": [{"from": "human", "value": 'say "hi", [ok]? {x}'}, {"from": "gpt", "value": "\\"}]},
    {"id": "bs", "image": "a\\b.jpg", "conversations": [{"from": "human", "value": '<image>\\\\"],{"'}, {"from": "gpt", "value": "\\\\\\"}]},
    {"id": "uni", "conversations": [{"from": "human", "value": "ünï ✓ 🚀 ,]"}, {"from": "gpt", "value": "\u2028"}]},
    [1, [2, {"a": "]"}]], 42, None, "a string, with a comma",
    {"nested": {"deep": [[[]]], "s": "}}}]]],,,"}, "n": -1.5e3},
]


@pytest.mark.parametrize("chunk_bytes", [1, 40, 333, 1 << 20])
@pytest.mark.parametrize("scan_bytes", [7, 64, 1 << 20])
@pytest.mark.parametrize("layout", ["compact", "indent", "bom"])
def test_chunks_hold_exactly_the_records(tmp_path, monkeypatch, chunk_bytes, scan_bytes, layout):
    monkeypatch.setattr(reader, "SCAN_BYTES", scan_bytes)
    records = TRICKY * 3
    text = json.dumps(records, indent=2 if layout == "indent" else None, ensure_ascii=layout == "compact")
    path = tmp_path / "d.json"
    path.write_bytes((b"\xef\xbb\xbf" if layout == "bom" else b"") + b" \n" + text.encode() + b"\n ")
    chunks = list(record_chunks(path, chunk_bytes))
    assert [r for c in chunks for r in parse_chunk(path, c)] == records == list(read_records(path))
    assert [c.first for c in chunks] == np.cumsum([0] + [c.count for c in chunks])[:-1].tolist()
    if chunk_bytes == 1:
        assert len(chunks) == len(records)


def test_jsonl_chunks_skip_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in TRICKY[:4]).replace("\n", "\n\n  \n", 1) + "\n")
    chunks = list(record_chunks(path, 10))
    assert [r for c in chunks for r in parse_chunk(path, c)] == TRICKY[:4]
    assert [(c.first, c.count) for c in chunks] == [(0, 1), (1, 1), (2, 1), (3, 1)]



def framed(path, chunk_bytes: int) -> list[tuple[int, int, str]]:
    """(index, line, text) of every record, read chunk by chunk."""
    return [(r.index, r.line, r.text) for c in record_chunks(path, chunk_bytes) for r in read_chunk(path, c)[0]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_records_are_the_same_at_any_chunk_size_and_sit_at_their_line(corpus, fmt):
    path = corpus.data_json if fmt == "json" else corpus_as_jsonl(corpus)
    records = framed(path, 1 << 20)
    assert [i for i, _, _ in records] == list(range(len(corpus.cases) + (fmt == "jsonl")))
    assert framed(path, 1) == framed(path, check.CHUNK_BYTES) == framed(path, 3000) == records
    lines = path.read_text(encoding="utf-8").split("\n")
    for _, line, text in records:
        assert "\n".join(lines[line - 1:]).lstrip(" [").startswith(text), (line, text[:40])
    if fmt == "jsonl":  # the blank line counts, the line end is not part of the text
        assert records[5][1] == 7 and not any(t.endswith("\r") for _, _, t in records)


def test_an_error_on_a_chunks_first_line_counts_the_columns_before_the_chunk(tmp_path):
    """Compact JSON is one line: the column of an error in a later chunk counts every character before it."""
    path = tmp_path / "one-line.json"
    good = json.dumps([{"id": "é✓", "n": i} for i in range(40)], ensure_ascii=False)
    path.write_text(good[:-1] + ', {"id": 1,,}]', encoding="utf-8")
    with pytest.raises(JSONSyntaxError) as whole:
        list(read_records(path))
    column = len(good[:-1] + ', {"id": 1,')
    assert (whole.value.line, whole.value.column) == (1, column + 1)
    chunks = list(record_chunks(path, 50))
    assert len(chunks) > 10
    delivered = []
    for chunk in chunks:
        records, error = read_chunk(path, chunk)
        delivered += records
        if error:
            assert str(error) == str(whole.value)
            break
    assert [r.value["n"] for r in delivered] == list(range(40))


def _values(_, records):
    return [(r.index, r.line, r.value) for r in records]


@pytest.mark.parametrize("workers", [1, 2])
def test_map_chunks_delivers_in_order_then_raises_the_error(tmp_path, workers):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"n": i} for i in range(100)], indent=1)[:-2] + "\n x]")
    got = []
    with pytest.raises(JSONSyntaxError) as error:
        for _, values in map_chunks(path, record_chunks(path, 200), _values, None, workers):
            got += values
    assert [v for _, _, v in got] == [{"n": i} for i in range(100)] and [i for i, _, _ in got] == list(range(100))
    assert [line for _, line, _ in got] == list(range(2, 302, 3))
    assert error.value.detail == "line 302 column 2: Expecting ',' delimiter or ']' after a record"
    assert str(pickle.loads(pickle.dumps(error.value))) == str(error.value)


# ---- data check and the table build agree

IMAGE_KINDS = {"image_missing", "image_empty", "image_undecodable", "image_too_large", "image_path_escapes"}


def check_and_build(tmp_path, path, image_folder, tokenizer, lazy: bool, monkeypatch):
    """(data check's report, the table build's (table, DataReport) or its exception): check in 2 workers over
    ~2 KB chunks, the build over ~5 KB chunks, so they cut the file differently."""
    monkeypatch.setattr(check, "CHUNK_BYTES", 2000)
    monkeypatch.setattr(reader, "CHUNK_BYTES", 5000)
    settings = check.Settings(str(path), str(image_folder), tokenizer=tokenizer, template=get_template("internlm2_chat"),
                              max_length=MAX_LENGTH, image_length=576)
    report = check.run_check(settings, workers=2)
    cfg = DataConfig(data_path=str(path), image_folder=str(image_folder), prompt_template="internlm2_chat",
                     max_length=MAX_LENGTH, lazy_tokenize=lazy)
    try:
        return report, build_table(cfg, tokenizer, 576, tmp_path / "cache")
    except JSONSyntaxError as e:
        return report, e


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_check_and_the_table_build_see_the_same_records_and_drop_the_same(corpus, tiny_tokenizer, tmp_path, monkeypatch,
                                                                          fmt, lazy):
    path = corpus.data_json if fmt == "json" else corpus_as_jsonl(corpus)
    checked, (table, built) = check_and_build(tmp_path, path, corpus.image_folder, tiny_tokenizer, lazy, monkeypatch)
    not_built = IMAGE_KINDS | ({"no_trainable_tokens"} if lazy else set())  # found when a sample is loaded
    blocking = {k: v for k, v in checked["blocking"].items() if k not in not_built}
    assert checked["records"] == built.total == len(corpus.cases) + (fmt == "jsonl") and checked["complete"]
    assert built.dropped == {k: v["count"] for k, v in blocking.items()}
    want = {c.blocking for c in corpus.cases if c.blocking} - not_built | ({"json_syntax"} if fmt == "jsonl" else set())
    assert set(built.dropped) == want and len(want) >= 13
    for kind, entry in blocking.items():  # every drop: same index, same line, same detail (check also gives
        assert entry["count"] <= check.MAX_EXAMPLES  # the full length of a record with nothing to train on)
        detail = kind != "no_trainable_tokens"
        assert [(e["index"], e["line"], detail and e["detail"]) for e in entry["examples"]] == \
               [(e["index"], e["line"], detail and e["detail"]) for e in built.examples[kind]], kind
    dropped = {i for entry in blocking.values() for i in entry["indices"]}
    kept = [str(c.record["id"]) for i, c in enumerate(corpus.cases) if i not in dropped]
    assert table["id"] == kept and built.kept == len(kept)


def test_a_broken_json_list_stops_the_check_where_the_table_build_raises(tiny_tokenizer, tmp_path, monkeypatch):
    (path, line, column), _ = build_broken_files(tmp_path).values()
    for lazy in (False, True):
        checked, error = check_and_build(tmp_path, path, tmp_path, tiny_tokenizer, lazy, monkeypatch)
        assert isinstance(error, JSONSyntaxError) and (error.line, error.column) == (line, column)
        assert not checked["complete"] and checked["records"] == 2
        assert checked["blocking"]["json_syntax"]["examples"] == [
            {"index": 2, "line": line, "id": None, "path": None, "detail": error.detail}]


def test_a_broken_jsonl_line_is_the_same_dropped_record_to_both(tiny_tokenizer, tmp_path, monkeypatch):
    _, (path, bad_line, n_good) = build_broken_files(tmp_path).values()
    checked, (table, built) = check_and_build(tmp_path, path, tmp_path, tiny_tokenizer, False, monkeypatch)
    assert checked["complete"] and (checked["good"], built.kept, table["id"]) == (n_good, n_good, ["l0", "l1", "l3"])
    (example,) = checked["blocking"]["json_syntax"]["examples"]
    assert built.examples["json_syntax"] == [{"index": bad_line - 1, "line": bad_line, "id": None, "detail": example["detail"]}]
    assert (example["index"], example["line"]) == (bad_line - 1, bad_line)
