"""eval/bench_data.py: a benchmark TSV loaded as VLMEvalKit's ImageBaseDataset.__init__ builds its data
(vlmeval/dataset/image_base.py:146-183): rows without an image dropped (skip_noimg, 154-155), short image cells as
references to another row (162-170), list cells as several images (171-172, toliststr), int indices when all are."""
from __future__ import annotations

import pytest
from mmbench_tsv import write_tsv

from vlmtune.errors import UserError
from vlmtune.eval.bench_data import load_benchmark

COLUMNS = ["index", "question", "answer", "image"]


def load(tmp_path, rows, name="X"):
    return load_benchmark(write_tsv(tmp_path / f"{name}.tsv", rows, COLUMNS), name, ("question", "answer"))


def test_rows_without_image_are_skipped_and_counted(tmp_path, images):
    rows = [dict(index=0, question="a", answer="x", image=images[0]), dict(index=1, question="b", answer="y"),
            dict(index=2, question="c", answer="z", image="0")]
    bench = load(tmp_path, rows)
    assert [r.index for r in bench.rows] == [0, 2] and bench.skipped == 1
    assert bench.rows[1].images == (images[0],)  # '0' names row 0's image
    assert [r.row for r in bench.rows] == [1, 3]  # file rows, for messages
    assert list(bench.table.columns) == ["index", "question", "answer"]


def test_text_indices_and_image_lists(tmp_path, images):
    rows = [dict(index="a_1", question="q", answer="x", image=repr([images[0], images[1]])),
            dict(index="a_2", question="q", answer="x", image="a_1")]
    bench = load(tmp_path, rows)
    assert [r.index for r in bench.rows] == ["a_1", "a_2"]
    assert bench.rows[0].images == (images[0], images[1]) == bench.rows[1].images
    assert [im.size for im in bench.rows[0].decode_images()] == [(48, 40), (48, 40)]


@pytest.mark.parametrize(("rows", "message"), [
    ([dict(index=0, question="q", answer="x", image="7")], r"row 1 \(index 0\): image cell '7' is neither base64"),
    ([dict(index=0, question="q", answer="x", image="img"), dict(index=0, question="q", answer="x", image="img")],
     r"row 2: index 0 repeats row 1"),
    ([dict(index=0, question="q", answer="x", image="A" * 100)], r"row 1 \(index 0\): image is not a decodable"),
])
def test_bad_rows_are_one_line(tmp_path, rows, message):
    with pytest.raises(UserError, match=message):
        load(tmp_path, rows)


def test_missing_column_names_the_benchmark(tmp_path, images):
    path = write_tsv(tmp_path / "MME.tsv", [dict(index=0, question="q", image=images[0])], ["index", "question", "image"])
    with pytest.raises(UserError, match=r"MME.tsv: missing column\(s\) answer; expected VLMEvalKit's MME TSV"):
        load_benchmark(path, "MME", ("question", "answer"))
