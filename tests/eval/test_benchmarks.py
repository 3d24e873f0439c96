"""eval/benchmarks.py: which benchmark a file is (its VLMEvalKit name), and each row's prompt."""
from __future__ import annotations

import pytest
from bench_tsv import MCQ_COLUMNS, MMMU_COLUMNS, mcq_rows, mmmu_rows
from mmbench_tsv import write_tsv

from vlmtune.errors import UserError
from vlmtune.eval import benchmarks


@pytest.mark.parametrize(("name", "kind"), [
    ("MME", "MME"), ("POPE", "POPE"), ("HallusionBench", "HallusionBench"), ("TextVQA_VAL", "TextVQA_VAL"),
    ("GQA_TestDev_Balanced", "GQA_TestDev_Balanced"), ("ChartQA_TEST", "ChartQA_TEST"), ("DocVQA_VAL", "DocVQA_VAL"),
    ("OCRBench", "OCRBench"), ("SEEDBench_IMG", "SEEDBench_IMG"), ("MMStar", "MMStar"), ("ScienceQA_TEST", "ScienceQA_TEST"),
    ("AI2D_TEST", "AI2D_TEST"), ("MMMU_DEV_VAL", "MMMU_DEV_VAL"),
    # VLMEvalKit's circular sets (image_mcq.py:270): any name holding mmbench / ccbench / circular / mmcr
    ("MMBench_DEV_CN_V11", "MMBench_DEV_CN_V11"), ("CCBench", "CCBench"), ("SEEDBench_circular", "SEEDBench_circular"),
])
def test_kind_from_the_file_name(name, kind):
    found = benchmarks.kind_for(f"/data/{name}.tsv")
    assert found.name == kind
    assert (found.score is None) == benchmarks.is_mmbench(name)


def test_dataset_flag_overrides_and_unknown_names(tmp_path, images):
    assert benchmarks.kind_for("mine.tsv", "POPE").name == "POPE"
    with pytest.raises(UserError, match="--dataset MMVet: not a benchmark vlmtune scores"):
        benchmarks.kind_for("mine.tsv", "MMVet")
    mcq = write_tsv(tmp_path / "my_quiz.tsv", mcq_rows(images), MCQ_COLUMNS)
    assert benchmarks.kind_for(mcq).name == "my_quiz" and benchmarks.kind_for(mcq).max_new_tokens == 5
    other = write_tsv(tmp_path / "notes.tsv", [dict(index=0, question="q", image=images[0])], ["index", "question", "image"])
    with pytest.raises(UserError, match="notes.tsv: the file name does not say which benchmark"):
        benchmarks.kind_for(other)


def test_rows_sharing_images_share_a_group_and_each_image_gets_a_tag(tmp_path, images):
    kind = benchmarks.kind_for("MMMU_DEV_VAL.tsv")
    data = kind.load(write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", mmmu_rows(images), MMMU_COLUMNS), kind.name)
    asked = benchmarks.prompts(kind, data)
    assert [p.n_images for p in asked] == [2, 1, 1]
    assert asked[0].text.startswith("<image>\n<image>\nWhich picture shows <image 1> best?\nA. the first")
    assert asked[0].group == images[0] + "\n" + images[1] and asked[1].group == images[2]


def test_an_image_tag_written_in_a_question_is_refused(tmp_path, images):
    rows = mcq_rows(images)
    rows[0]["question"] = "What is <image> here?"
    kind = benchmarks.kind_for("ScienceQA_VAL.tsv")
    data = kind.load(write_tsv(tmp_path / "ScienceQA_VAL.tsv", rows, MCQ_COLUMNS), kind.name)
    with pytest.raises(UserError, match=r"ScienceQA_VAL.tsv: index 100: the text writes <image>"):
        benchmarks.prompts(kind, data)
