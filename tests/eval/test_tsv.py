"""eval/tsv.py: VLMEvalKit's TSV reading (pandas defaults, image and option cells as text), literal cells, images.

VLMEvalKit reads every TSV with `pd.read_csv(f, sep='\\t')` (vlmeval/smp/file.py:274-275) and scores `str(cell)`.
"""
from __future__ import annotations

import math

import pytest
from mmbench_tsv import write_tsv

from vlmtune.errors import UserError
from vlmtune.eval import tsv


def test_pandas_missing_values_except_image_and_option_cells(tmp_path, images):
    """'None'/'NA' answers become NaN as in VLMEvalKit (scored as the text 'nan'); option cells stay their text
    (VLMEvalKit issue #1559) and an image reference keeps its exact digits."""
    rows = [dict(index=0, question="q", A="None", B="1", answer="NA", image=images[0]),
            dict(index=1, question="q", A="x", B="2", answer="B", image="0")]
    df = tsv.read_tsv(write_tsv(tmp_path / "x.tsv", rows, ["index", "question", "A", "B", "answer", "image"]))
    assert math.isnan(df.loc[0, "answer"]) and tsv.cell_text(df.loc[0, "answer"]) == "nan"
    assert df.loc[0, "A"] == "None" and df.loc[0, "B"] == "1" and df.loc[1, "image"] == "0"


@pytest.mark.parametrize(("prediction", "scored"), [("None", "nan"), ("", "nan"), ("NA", "nan"), ("null", "nan"),
                                                    ("none", "none"), (" NA", " NA"), ("Yes", "Yes")])
def test_predictions_scored_as_after_vlmevalkits_xlsx_round_trip(prediction, scored):
    """VLMEvalKit writes predictions to xlsx and reads them back with pd.read_excel (smp/file.py:268-269), whose
    default missing-value strings match exactly, case and spaces included."""
    assert tsv.as_scored(prediction) == scored


def test_literal_lists_only():
    assert tsv.literal_list("['a', 'b']", "f: row 1") == ["a", "b"]
    assert tsv.literal_list('["a"]', "f: row 1") == ["a"]
    assert tsv.literal_list("plain text", "f: row 1") is None
    with pytest.raises(UserError, match=r"^f: row 1: cell .* not a Python or JSON list literal; write it as"):
        tsv.literal_list("[print('hi')]", "f: row 1")


@pytest.mark.parametrize(("value", "expected"), [(12, 12), (12.0, 12), ("12", 12), (" 12 ", 12), (-1, None),
                                                 (1.5, None), ("a", None), (None, None)])
def test_parse_index(value, expected):
    assert tsv.parse_index(value) == expected


def test_unreadable_file_and_images_are_one_line(tmp_path, images):
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="bad.tsv: not a readable TSV"):
        tsv.read_tsv(bad)
    with pytest.raises(UserError, match="^where: image is not a decodable base64 image"):
        tsv.decode_base64_image("aGVsbG8=", "where")
    assert tsv.decode_base64_image(images[0], "where").mode == "RGB"
