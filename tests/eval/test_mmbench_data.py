"""Loading MMBench TSVs (image references, legacy files, bad input) and building the MCQ prompt."""
from __future__ import annotations

import base64
import struct
import zlib

import numpy as np
import pytest
from mmbench_tsv import STRIDE, base_questions, rotations, write_tsv

from vlmtune.errors import UserError
from vlmtune.eval.mmbench_data import MAX_IMAGE_MB, decode_image, load_mmbench
from vlmtune.eval.prompt import build_prompt


def test_vlmevalkit_image_references_resolve_to_the_main_rows_image(dev_tsv):
    data = load_mmbench(dev_tsv)
    by_index = {q.index: q for q in data.questions}
    assert len(data.questions) == 12 and data.has_answers and data.name == "MMBench_DEV_EN"
    copy, main = by_index[2 * STRIDE + 1], by_index[1]
    assert copy.image == main.image and len(copy.image) > 64
    pixels = np.asarray(decode_image(copy))
    assert decode_image(copy).mode == "RGB" and pixels.shape == (40, 48, 3)
    assert np.array_equal(pixels, np.asarray(decode_image(main)))
    assert not np.array_equal(pixels, np.asarray(decode_image(by_index[0])))  # a different question's image


def test_legacy_file_with_repeated_images(tmp_path, images):
    rows = [r for q in base_questions(images) for r in rotations(q, 2, image_refs=False)]
    data = load_mmbench(write_tsv(tmp_path / "legacy.tsv", rows))
    by_index = {q.index: q for q in data.questions}
    assert by_index[STRIDE + 2].image == by_index[2].image == images[2]


def test_rotated_copies_keep_answer_with_its_option(dev_tsv):
    by_index = {q.index: q for q in load_mmbench(dev_tsv).questions}
    for k in range(4):
        q = by_index[k * STRIDE]
        assert q.options[q.answer] == "cat" and q.is_main == (k == 0)
    assert by_index[3 * STRIDE].options == {"A": "fish", "B": "cat", "C": "dog", "D": "bird"}


def test_fields_two_option_rows_and_l2_fallback(tmp_path, images):
    q = dict(index=7, question="Is it day?", A="yes", B="no", answer="B", category="scenery_building",
             image=images[3])
    data = load_mmbench(write_tsv(tmp_path / "CCBench.tsv", [q],
                                  columns=["index", "question", "A", "B", "C", "D", "answer", "category", "image"]))
    (only,) = data.questions
    assert only.options == {"A": "yes", "B": "no"} and only.hint is None and only.split is None
    assert only.l2_category == only.category == "scenery_building"  # CCBench has no l2-category
    assert "image" not in data.table.columns and list(data.table["index"]) == [7]


def test_test_split_has_no_answers(tmp_path, images):
    rows = [dict(r, answer=None) for r in base_questions(images)]
    data = load_mmbench(write_tsv(tmp_path / "MMBench_TEST_EN.tsv", rows))
    assert not data.has_answers and {q.answer for q in data.questions} == {None}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda rows: [dict(r, image="5") if r["index"] == 1 else r for r in rows],
         "row 2 (index 1): image refers to index 5, which has no image"),
        (lambda rows: [dict(r, image="1") if r["index"] == 2 else dict(r, image="0") if r["index"] == 1 else r
                       for r in rows], "row 3 (index 2): image refers to index 1, which has no image"),
        (lambda rows: [dict(r, image="not-an-image") if r["index"] == 2 else r for r in rows],
         "row 3 (index 2): image cell 'not-an-image' is neither base64 nor the index"),
        (lambda rows: [dict(r, image=None) if r["index"] == 0 else r for r in rows], "row 1 (index 0): empty image"),
        (lambda rows: [dict(r, index=0) if r["index"] == 2 else r for r in rows], "row 3: index 0 repeats row 1"),
        (lambda rows: [dict(r, index="q2") if r["index"] == 2 else r for r in rows], "row 3: index 'q2' is not"),
        (lambda rows: [dict(r, answer=None) if r["index"] == 1 else r for r in rows], "row 2: empty answer"),
        (lambda rows: [dict(r, B=None, C=None, D=None) if r["index"] == 1 else r for r in rows],
         "row 2 (index 1): needs at least two options, found 1"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, images, edit, message):
    path = write_tsv(tmp_path / "bad.tsv", edit(base_questions(images)))
    with pytest.raises(UserError) as err:
        load_mmbench(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_column_and_missing_file(tmp_path, images):
    path = write_tsv(tmp_path / "nocat.tsv", base_questions(images), columns=["index", "question", "A", "B", "image"])
    with pytest.raises(UserError, match=r"nocat.tsv: missing column\(s\) category"):
        load_mmbench(path)
    with pytest.raises(UserError, match="not found"):
        load_mmbench(tmp_path / "absent.tsv")


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no real pixel data): PIL's bomb check fires on open."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "image, message",
    [
        (base64.b64encode(b"this is plain text, not a jpeg at all" * 3).decode(), "not a decodable base64 image"),
        ("@" * 80, "not a decodable base64 image"),
        (base64.b64encode(_png_header(30000, 30000)).decode(), "decompression bomb"),
    ],
)
def test_undecodable_images_name_the_row_when_the_file_is_loaded(tmp_path, images, image, message):
    """Every image's header is read by load_mmbench: a corrupt one stops the run before the model loads."""
    rows = [dict(r, image=image) if r["index"] == 1 else r for r in base_questions(images)]
    with pytest.raises(UserError, match=rf"img.tsv: row 2 \(index 1\): .*{message}"):
        load_mmbench(write_tsv(tmp_path / "img.tsv", rows))


def test_a_truncated_image_loads_and_fails_when_decoded(tmp_path, images):
    jpeg = base64.b64decode(images[1])
    cut = base64.b64encode(jpeg[: len(jpeg) * 3 // 4]).decode()  # the header survives, the pixels do not
    rows = [dict(r, image=cut) if r["index"] == 1 else r for r in base_questions(images)]
    data = load_mmbench(write_tsv(tmp_path / "img.tsv", rows))
    decode_image(data.questions[0])  # the good rows still decode
    with pytest.raises(UserError, match=r"img.tsv: row 2 \(index 1\): image is not a decodable base64 image"):
        decode_image(data.questions[1])


def test_option_texts_are_read_as_written(tmp_path, images):
    """"None", "NA", "null" are options (pandas' defaults would drop them: VLMEvalKit #1559) and number options
    stay as written (a column with an empty cell would make them floats: "1.0"); other columns keep pandas'
    defaults, so a hint written as "nan" is no hint, as in XTuner and VLMEvalKit."""
    common = dict(category="counting", image=images[0], hint="nan")
    rows = [dict(common, index=0, question="How many dogs?", A="None", B="NA", C="null", D="1", answer="A"),
            dict(common, index=1, question="How many cats?", A="1", B="2", C="3", D="10", answer="D"),
            dict(common, index=2, question="How many cups?", A="0", B="1", answer="B")]
    questions = load_mmbench(write_tsv(tmp_path / "count.tsv", rows)).questions
    assert [q.options for q in questions] == [{"A": "None", "B": "NA", "C": "null", "D": "1"},
                                              {"A": "1", "B": "2", "C": "3", "D": "10"}, {"A": "0", "B": "1"}]
    assert build_prompt(questions[1]) == ("<image>\nHow many cats?\nA. 1\nB. 2\nC. 3\nD. 10\n"
                                          "Answer with the option's letter from the given choices directly.")
    assert [q.hint for q in questions] == [None] * 3


@pytest.mark.parametrize("answer", ["a", "cat", "E"])
def test_an_answer_that_is_not_an_option_letter_names_the_row(tmp_path, images, answer):
    """Scored as is it would count every prediction of the row wrong without a word."""
    rows = [dict(r, answer=answer) if r["index"] == 2 else r for r in base_questions(images)]
    with pytest.raises(UserError, match=rf"bad.tsv: row 3 \(index 2\): answer '{answer}' is not one of the row's option "
                                        r"letters \(A, B, C, D\)"):
        load_mmbench(write_tsv(tmp_path / "bad.tsv", rows))


def test_oversized_base64_refused_before_decoding(tmp_path, images):
    huge = "A" * (MAX_IMAGE_MB * 2**20 * 4 // 3 + 4)
    rows = [dict(r, image=huge) if r["index"] == 2 else r for r in base_questions(images)]
    with pytest.raises(UserError, match=rf"row 3 \(index 2\): image is over {MAX_IMAGE_MB} MB"):
        load_mmbench(write_tsv(tmp_path / "huge.tsv", rows))


def test_prompt_english_with_hint_matches_xtuner_text(dev_tsv):
    by_index = {q.index: q for q in load_mmbench(dev_tsv).questions}
    assert build_prompt(by_index[1]) == (
        "<image>\nLook at the table.\nWhat colour is the cup?\nA. red\nB. blue\nC. green\nD. white\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert build_prompt(by_index[0]).startswith("<image>\nWhat animal is shown?\nA. cat\n")


def test_prompt_switches_to_chinese_on_any_cjk_text(tmp_path, images):
    common = dict(category="c", image=images[0], answer="A")
    rows = [
        dict(common, index=0, question="图中是什么动物？", A="猫", B="狗"),
        dict(common, index=1, question="What is it?", A="cat", B="dog", hint="提示"),
        dict(common, index=2, question="What is it?", A="猫", B="dog"),
        dict(common, index=3, question="Qu'est-ce que c'est ?", A="chat", B="chien"),
    ]
    questions = load_mmbench(write_tsv(tmp_path / "cn.tsv", rows)).questions
    prompts = [build_prompt(q) for q in questions]
    assert prompts[0] == "<image>\n图中是什么动物？\nA. 猫\nB. 狗\n请直接回答选项字母。"
    assert prompts[1] == "<image>\n提示\nWhat is it?\nA. cat\nB. dog\n请直接回答选项字母。"
    assert prompts[2].endswith("\nB. dog\n请直接回答选项字母。")
    assert prompts[3].endswith("\nB. chien\nAnswer with the option's letter from the given choices directly.")
