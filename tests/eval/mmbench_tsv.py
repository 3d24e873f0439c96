"""Builders for MMBench-format TSVs holding real base64 JPEGs (shrunk to keep files small)."""
from __future__ import annotations

import base64
import io

import pandas as pd
from PIL import Image

STRIDE = 1_000_000


def jpeg_b64(array, size=(48, 40)) -> str:
    """A real JPEG of the array, resized, as base64 text (what MMBench TSVs store)."""
    buffer = io.BytesIO()
    Image.fromarray(array).convert("RGB").resize(size).save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode()


def rotations(question: dict, copies: int, image_refs: bool) -> list[dict]:
    """The question plus `copies - 1` circular copies: options rotated, answer letter following its option.

    With image_refs a copy's image cell is the main row's index (VLMEvalKit files), else the image repeats.
    """
    letters = [c for c in "ABCD" if question.get(c) is not None]
    texts = [question[c] for c in letters]
    answer_text = question["answer"] and texts[letters.index(question["answer"])]
    rows = []
    for k in range(copies):
        rotated = texts[k:] + texts[:k]
        row = dict(question, index=question["index"] + k * STRIDE, **dict(zip(letters, rotated)))
        if answer_text is not None:
            row["answer"] = letters[rotated.index(answer_text)]
        if k and image_refs:
            row["image"] = str(question["index"])
        rows.append(row)
    return rows


def write_tsv(path, rows: list[dict], columns: list[str] | None = None):
    """Write rows as a VLMEvalKit-style TSV (missing cells empty); returns the path."""
    columns = columns or ["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
                          "l2-category", "split", "source", "comment", "image"]
    pd.DataFrame(rows).reindex(columns=columns).to_csv(path, sep="\t", index=False)
    return path


def base_questions(images: list[str]) -> list[dict]:
    """Three 4-option dev questions in two L2 abilities and three L3 categories."""
    common = dict(split="dev", source="test", comment=None, hint=None)
    return [
        dict(common, index=0, question="What animal is shown?", A="cat", B="dog", C="bird", D="fish",
             answer="A", category="image_scene", **{"l2-category": "coarse_perception"}, image=images[0]),
        dict(common, index=1, question="What colour is the cup?", A="red", B="blue", C="green", D="white",
             answer="D", category="attribute_recognition", **{"l2-category": "finegrained_perception (instance-level)"},
             image=images[1], hint="Look at the table."),
        dict(common, index=2, question="Where is the person?", A="indoors", B="outdoors", C="in space",
             D="underwater", answer="C", category="image_topic", **{"l2-category": "coarse_perception"},
             image=images[2]),
    ]
