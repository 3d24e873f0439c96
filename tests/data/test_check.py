"""`vlmtune data check` on a corpus with every known problem: right reasons, no false alarms, a clean
output that builds and trains, JSON syntax errors located, streaming memory, worker-count independence."""
from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
import torch
from bad_corpus import MAX_LENGTH, build_broken_files, build_corpus

from vlmtune.cli import main as cli
from vlmtune.data.check import BLOCKING, WARNINGS, Settings, run_check


def run(tmp: Path, data: Path, image_folder: Path, *extra: str) -> tuple[int, dict]:
    """`vlmtune data check` in-process; (exit code, report)."""
    report = tmp / f"{data.stem}-{len(list(tmp.glob('*.report.json')))}.report.json"
    code = cli(["data", "check", str(data), "--image-folder", str(image_folder), "--report", str(report), *extra])
    return code, json.loads(report.read_text())


def kinds_by_record(section: dict) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for kind, entry in section.items():
        for index in entry["indices"]:
            out.setdefault(index, set()).add(kind)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def checked(corpus, tiny, tmp_path_factory):
    """One check of the corpus with the tiny config's tokenizer and template, 2 workers, a clean output."""
    tmp = tmp_path_factory.mktemp("checked")
    clean = tmp / "clean.json"
    code, report = run(tmp, corpus.data_json, corpus.image_folder, "--config", "tiny_llava_pretrain",
                       "--max-length", str(MAX_LENGTH), "--workers", "2", "--write-clean", str(clean))
    return code, report, clean


def test_every_bad_record_has_its_reason_and_no_good_record_is_flagged(corpus, checked):
    code, report, _ = checked
    blocking, warnings = kinds_by_record(report["blocking"]), kinds_by_record(report["warnings"])
    assert len({c.blocking for c in corpus.cases if c.blocking}) >= 15
    for index, case in enumerate(corpus.cases):
        want = {case.blocking} if case.blocking else set()
        assert blocking.get(index, set()) == want, (index, case.record)
        assert warnings.get(index, set()) == case.warnings, (index, case.record)
    assert set(report["blocking"]) <= set(BLOCKING) and set(report["warnings"]) <= set(WARNINGS)
    assert (report["records"], report["good"], report["bad"]) == (len(corpus.cases), len(corpus.good), len(corpus.cases) - len(corpus.good))
    assert code == report["exit_code"] == 1 and report["complete"]


def test_examples_give_record_index_file_line_id_and_image_path(corpus, checked):
    _, report, _ = checked
    example = report["blocking"]["image_missing"]["examples"][0]
    lines = corpus.data_json.read_text(encoding="utf-8").splitlines()
    id_line = next(n for n, text in enumerate(lines, start=1) if '"id": "b-missing"' in text)
    assert example["index"] == next(i for i, c in enumerate(corpus.cases) if c.blocking == "image_missing")
    assert (example["line"], example["id"], example["path"]) == (id_line - 1, "b-missing", "nope/missing.jpg")
    assert report["blocking"]["image_too_large"]["examples"][0]["detail"].count("decompression bomb") == 1


def test_token_statistics_count_image_tokens(corpus, checked):
    _, report, _ = checked
    tokens = report["tokens"]
    reached = len(corpus.good) + 1  # good records + the one whose prompt leaves nothing to train on
    assert (tokens["tokenized"], tokens["no_trainable_tokens"], tokens["exceed_max_length"]) == (reached, 1, 2)
    assert (tokens["max_length"], tokens["image_length"], tokens["prompt_template"]) == (MAX_LENGTH, 576, "internlm2_chat")
    # the text-only "Name a primary colour." record is short; every image record counts 576 for its image
    assert tokens["length"]["min"] < 576 < tokens["length"]["p50"]
    assert tokens["length"]["max"] > 2500 + 576


def test_clean_output_builds_with_nothing_dropped_and_trains(corpus, checked, tiny, tiny_tokenizer, tmp_path):
    from vlmtune.config import load_config
    from vlmtune.data.collate import collate
    from vlmtune.data.dataset import build_dataset
    from vlmtune.data.image import ImagePreprocessor
    from vlmtune.model.build import build_model
    from vlmtune.model.vision import load_image_processor

    _, _, clean = checked
    cfg = load_config("tiny_llava_pretrain", {"data_path": str(clean), "image_folder": str(corpus.image_folder),
                                              "max_length": MAX_LENGTH})
    preprocess = ImagePreprocessor(load_image_processor(str(tiny.clip)), pad_to_square=True)
    dataset, data_report = build_dataset(cfg.data, tiny_tokenizer, preprocess, 576, tmp_path / "cache")
    good_ids = [str(corpus.cases[i].record["id"]) for i in corpus.good]
    assert (data_report.dropped, data_report.kept, data_report.total) == ({}, len(good_ids), len(good_ids))
    samples = [dataset[i] for i in range(len(dataset))]
    assert [s["id"] for s in samples] == good_ids and not any(s["skipped"] for s in samples)
    model = build_model(cfg.model)
    samples.sort(key=lambda s: len(s["input_ids"]))  # batches of similar length: little padding
    for start in range(0, len(samples), 4):
        batch = collate(samples[start:start + 4], tiny_tokenizer.pad_token_id)
        loss_sum, n_targets = model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"])
        assert n_targets > 0 and torch.isfinite(loss_sum)
        (loss_sum / n_targets).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())


def test_checking_the_clean_output_finds_nothing_blocking(corpus, checked, tmp_path):
    _, first, clean = checked
    code, report = run(tmp_path, clean, corpus.image_folder, "--config", "tiny_llava_pretrain",
                       "--max-length", str(MAX_LENGTH), "--workers", "1")
    assert (code, report["blocking"], report["records"]) == (0, {}, first["good"])
    assert {k: v["count"] for k, v in report["warnings"].items()} == {k: v["count"] for k, v in first["warnings"].items()}


def test_one_worker_and_two_workers_agree(corpus, checked, tiny, tmp_path):
    _, two, _ = checked
    code, one = run(tmp_path, corpus.data_json, corpus.image_folder, "--tokenizer", str(tiny.llm),
                    "--prompt-template", "internlm2_chat", "--visual-encoder", str(tiny.clip), "--max-length",
                    str(MAX_LENGTH), "--workers", "1")
    assert code == 1
    assert (one["blocking"], one["warnings"], one["tokens"]["length"]) == (two["blocking"], two["warnings"], two["tokens"]["length"])


def test_without_a_tokenizer_lengths_are_skipped_but_everything_else_is_checked(corpus, checked, tmp_path):
    _, full, _ = checked
    code, report = run(tmp_path, corpus.data_json, corpus.image_folder, "--workers", "2")
    assert code == 1 and report["tokens"] is None
    assert set(full["blocking"]) - set(report["blocking"]) == {"no_trainable_tokens"}
    assert set(full["warnings"]) - set(report["warnings"]) == {"exceeds_max_length"}


def test_json_syntax_error_stops_with_line_and_column_and_writes_no_clean_file(tmp_path):
    (path, line, column), _ = build_broken_files(tmp_path).values()
    clean = tmp_path / "clean.json"
    code, report = run(tmp_path, path, tmp_path, "--write-clean", str(clean), "--workers", "1")
    assert code == 1 and not report["complete"] and report["records"] == 2
    example = report["blocking"]["json_syntax"]["examples"][0]
    assert example["line"] == line and example["detail"].startswith(f"line {line} column {column}: Expecting ','")
    assert not clean.exists() and not list(tmp_path.glob("*.tmp"))


def test_broken_jsonl_line_is_one_bad_record_and_clean_jsonl_keeps_the_rest(tmp_path):
    _, (path, bad_line, n_good) = build_broken_files(tmp_path).values()
    clean = tmp_path / "clean.jsonl"
    code, report = run(tmp_path, path, tmp_path, "--write-clean", str(clean), "--workers", "2")
    assert code == 1 and report["complete"] and report["good"] == n_good
    assert report["blocking"]["json_syntax"]["indices"] == [bad_line - 1]
    assert report["blocking"]["json_syntax"]["examples"][0]["line"] == bad_line
    assert [json.loads(line)["id"] for line in clean.read_text().splitlines()] == ["l0", "l1", "l3"]


def test_bad_flags_are_one_line_user_errors(corpus, tiny, capsys):
    data, images = str(corpus.data_json), str(corpus.image_folder)
    before = corpus.data_json.read_bytes()
    assert cli(["data", "check", data, "--image-folder", images, "--tokenizer", str(tiny.llm)]) == 2
    assert cli(["data", "check", data, "--image-folder", images + "/nope"]) == 2
    assert cli(["data", "check", data + ".missing", "--image-folder", images]) == 2
    assert cli(["data", "check", data, "--image-folder", images, "--write-clean", data]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("vlmtune: error: ") for line in err)
    assert ["--prompt-template" in err[0], "not a folder" in err[1], "not found" in err[2], "overwrite" in err[3]] == [True] * 4
    assert corpus.data_json.read_bytes() == before


def test_a_large_json_list_is_streamed_not_loaded(tmp_path):
    """20K records, ~21 MB of JSON: the check's Python memory stays a small constant (1M-character blocks)."""
    record = {"conversations": [{"from": "human", "value": "Tell me a fact. " * 30}, {"from": "gpt", "value": "Water is wet. " * 30}]}
    data = tmp_path / "big.json"
    data.write_text(json.dumps([dict(record, id=i) for i in range(20_000)], indent=1))
    assert data.stat().st_size > 20e6
    tracemalloc.start()
    report = run_check(Settings(str(data), str(tmp_path)), workers=1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert report["good"] == 20_000 and report["exit_code"] == 0
    assert peak < 8e6, f"peak {peak / 1e6:.1f} MB for a {data.stat().st_size / 1e6:.1f} MB file"


@pytest.mark.parametrize("source", ["json", "jsonl"])
def test_clean_jsonl_keeps_a_lone_surrogate_in_a_field_no_rule_reads(tmp_path, source):
    """Such a record is good (training ignores the field); writing it must not crash the check: the escape
    stays an escape, the rest of the text stays readable."""
    records = [{"id": "a", "source": "web \ud83d", "conversations": [{"from": "human", "value": "图?"}, {"from": "gpt", "value": "Ok"}]},
               {"id": "b", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello", "meta": "\udc00"}]}]
    data = tmp_path / f"data.{source}"
    if source == "json":
        data.write_text(json.dumps(records, indent=1), encoding="utf-8")
    else:
        data.write_text("\n".join(json.dumps(r, ensure_ascii=False).replace("\ud83d", "\\ud83d").replace("\udc00", "\\udc00")
                                  for r in records) + "\n", encoding="utf-8")
    clean = tmp_path / "clean.jsonl"
    code, report = run(tmp_path, data, tmp_path, "--write-clean", str(clean), "--workers", "1")
    assert (code, report["good"]) == (0, 2)
    assert [json.loads(line) for line in clean.read_text(encoding="utf-8").splitlines()] == records
    assert "\\ud83d" in clean.read_text(encoding="utf-8")


def test_tokens_per_image_come_from_the_encoder_s_config(corpus, tiny, tmp_path, capsys):
    """No 336/14 constant: the count is read from the encoder's config (576 for the tiny CLIP-L/336), or given."""
    from vlmtune.model.vision import image_tokens, vision_config

    data, images = str(corpus.data_json), str(corpus.image_folder)
    base = ["--tokenizer", str(tiny.llm), "--prompt-template", "vicuna", "--workers", "1"]
    assert cli(["data", "check", data, "--image-folder", images, *base]) == 2
    assert "pass --config, --visual-encoder" in capsys.readouterr().err
    _, report = run(tmp_path, corpus.data_json, corpus.image_folder, *base, "--visual-encoder", str(tiny.clip))
    assert report["tokens"]["image_length"] == image_tokens(vision_config(str(tiny.clip))) == 576
    _, report = run(tmp_path, corpus.data_json, corpus.image_folder, *base, "--image-length", "729")
    assert report["tokens"]["image_length"] == 729


def test_anyres_lengths_count_each_image_from_its_size_as_training_does(tiny, tiny_tokenizer, tmp_path, capsys):
    """With an AnyRes config every image counts the tokens of its own grid: the report's lengths are the
    training table's exact lengths (built with packing's up-front tokenization), record for record."""
    import numpy as np

    from vlmtune.config import load_config
    from vlmtune.data.dataset import build_dataset
    from vlmtune.model.anyres import image_layout
    from vlmtune.model.vision import vision_config

    data, images = tiny.task / "anyres.json", tiny.task
    code, report = run(tmp_path, data, images, "--config", "tiny_llava_anyres_task_finetune_lora", "--workers", "1")
    assert code == 0 and "AnyRes: each its own, at most 2928" in capsys.readouterr().out
    cfg = load_config("tiny_llava_anyres_task_finetune_lora", {"lazy_tokenize": False})
    image_length, anyres = image_layout(vision_config(str(tiny.clip)), None, cfg.model.image_grid_pinpoints)
    dataset, _ = build_dataset(cfg.data, tiny_tokenizer, None, image_length, tmp_path / "cache", anyres)
    lengths = np.asarray(dataset.table["length"])
    tokens = report["tokens"]
    assert tokens["image_length"] == image_length == 2928 and tokens["anyres_pinpoints"] == [list(p) for p in anyres.pinpoints]
    assert tokens["length"] == {name: int(np.percentile(lengths, q))
                                for name, q in (("min", 0), ("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}
    assert len(set(lengths.tolist())) >= 4  # six aspect ratios: several grids
    assert cli(["data", "check", str(data), "--image-folder", str(images), "--config", "tiny_llava_anyres_task_finetune_lora",
                "--image-length", "576"]) == 2
    assert "drop --image-length" in capsys.readouterr().err
