"""The training dataset: a small LLaVA JSON with good and bad records -> DataReport, rows, samples, cache.

Most tests read the token table (`lazy_tokenize=False`: ids and labels stored); the last ones check that
lazy tokenization (the text table, tokenized in `__getitem__`) gives every sample exactly the same tensors.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vlmtune.data.dataset as dataset_module
from vlmtune.config import DataConfig
from vlmtune.constants import IMAGE_TOKEN_INDEX
from vlmtune.data.dataset import build_dataset
from vlmtune.data.image import ImagePreprocessor
from vlmtune.data.llava_json import normalize_record
from vlmtune.data.templates import get_template
from vlmtune.data.tokenize import tokenize_conversation
from vlmtune.model.vision import load_image_processor


def conv(*values):
    return [{"from": role, "value": v} for role, v in zip(["human", "gpt"] * len(values), values)]


RECORDS = [
    {"id": "img", "image": "images/chelsea.jpg", "conversations": conv("What animal is this?\n<image>", "A cat.")},
    {"id": "txt", "conversations": conv("Say hi.", "Hi.")},
    {"id": "multi", "image": "images/coffee.jpg", "conversations": conv("<image>\nWhat is it?", "Coffee.", "Hot?", "Yes.")},
    {"id": "uni", "image": "images/astronaut.jpg", "conversations": conv("<image>\n这是谁？🚀", "宇航员。Ünïcödé ✓")},
    42,  # not_an_object
    {"id": "noconv"},  # missing_conversations
    {"id": "notoken", "image": "images/rocket.jpg", "conversations": conv("Describe.", "A rocket.")},
    {"id": "noimg", "conversations": conv("<image>\nDescribe.", "Nothing.")},
    {"id": "order", "conversations": conv("Q", "A") + [{"from": "gpt", "value": "again"}]},
    {"id": "long", "conversations": conv("word " * 3000, "Short.")},  # no_trainable_tokens at max_length 1024
    {"id": "gone", "image": "images/missing.jpg", "conversations": conv("<image>", "?")},  # kept: checked on load
    {"id": "escape", "image": "../secret.jpg", "conversations": conv("<image>", "?")},  # kept: checked on load
    {"id": "trunc", "image": "images/horse.png", "conversations": conv("<image>\nDescribe in detail.", "word " * 2000)},
]
KEPT = ["img", "txt", "multi", "uni", "gone", "escape", "trunc"]
DROPPED = {
    "not_an_object": 1, "missing_conversations": 1, "image_token_missing": 1, "image_token_without_image": 1,
    "roles_out_of_order": 1, "no_trainable_tokens": 1,
}


@pytest.fixture
def setup(tiny, tiny_tokenizer, tmp_path):
    """(DataConfig, tokenizer, preprocessor, cache dir) for RECORDS over the tiny example images."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    cfg = DataConfig(data_path=str(data), image_folder=str(tiny.data), prompt_template="internlm2_chat", max_length=1024,
                     lazy_tokenize=False)
    preprocess = ImagePreprocessor(load_image_processor(str(tiny.clip)), pad_to_square=True)
    return cfg, tiny_tokenizer, preprocess, tmp_path / "cache"


def build(setup, **changes):
    cfg, tok, preprocess, cache = setup
    return build_dataset(dataclasses.replace(cfg, **changes), tok, preprocess, 576, cache)


def test_report_counts_every_kind_and_keeps_the_good_records(setup):
    dataset, report = build(setup)
    assert (report.total, report.kept, report.truncated) == (len(RECORDS), len(KEPT), 1)
    assert report.dropped == DROPPED
    (example,) = report.examples["no_trainable_tokens"]
    assert (example["index"], example["id"]) == (9, "long") and "max_length=1024" in example["detail"]
    assert report.examples["not_an_object"][0]["index"] == 4
    assert list(dataset.table["id"]) == KEPT and len(dataset) == len(KEPT)
    assert "7/13 records kept, 1 truncated" in report.summary()


def test_rows_hold_what_tokenize_produces(setup):
    cfg, tok, _, _ = setup
    dataset, _ = build(setup)
    for row, raw in zip(range(4), RECORDS[:4]):  # img, txt, multi, uni
        sample = normalize_record(raw, row)
        want = tokenize_conversation(sample.turns, tok, get_template(cfg.prompt_template), cfg.max_length, 576)
        got = dataset.table[row]
        assert got["input_ids"].tolist() == want.input_ids and got["labels"].tolist() == want.labels
        assert got["length"] == want.length
    uni = dataset.table[3]
    supervised = [int(i) for i, label in zip(uni["input_ids"], uni["labels"]) if label >= 0]
    assert tok.decode(supervised) == "宇航员。Ünïcödé ✓<|im_end|>"


def test_modality_lengths_count_images_and_mark_text_only_negative(setup):
    dataset, _ = build(setup)
    ids = dataset.table["input_ids"]
    expanded = np.array([len(x) + 575 * list(x).count(IMAGE_TOKEN_INDEX) for x in ids])
    has_image = np.array([len(x) > 0 for x in dataset.table["images"]])
    assert has_image.tolist() == [True, False, True, True, True, True, True]
    assert dataset.modality_lengths.tolist() == np.where(has_image, expanded, -expanded).tolist()
    assert dataset.modality_lengths[KEPT.index("trunc")] == 1024  # truncated to exactly max_length


def test_samples_load_pixels_and_bad_images_are_skipped_to_the_next(setup):
    dataset, _ = build(setup)
    img, txt = dataset[0], dataset[1]
    assert img["id"] == "img" and img["pixel_values"].shape == (1, 3, 336, 336) and img["skipped"] == []
    assert txt["id"] == "txt" and txt["pixel_values"].shape == (0, 3, 336, 336)
    assert int((img["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == 1
    got = dataset[KEPT.index("gone")]  # gone (missing file) and escape (../) are both skipped
    assert got["id"] == "trunc"
    assert [(s["id"], s["kind"]) for s in got["skipped"]] == [("gone", "image_missing"), ("escape", "image_path_escapes")]


def cache_entries(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir() if p.is_dir() and not p.name.endswith(".tmp")}


def test_cache_is_reused_and_keyed_by_template_and_max_length(setup):
    cache = setup[3]
    build(setup)
    (first,) = cache_entries(cache)
    stamp = (cache / first / "report.json").stat().st_mtime_ns
    _, report = build(setup)  # same inputs: the same table, not rebuilt
    assert cache_entries(cache) == {first} and (cache / first / "report.json").stat().st_mtime_ns == stamp
    assert report.kept == len(KEPT)
    vicuna, _ = build(setup, prompt_template="vicuna")
    assert len(cache_entries(cache)) == 2
    assert vicuna.table[1]["input_ids"].tolist() != build(setup)[0].table[1]["input_ids"].tolist()
    short, short_report = build(setup, max_length=600)  # now the image samples no longer fit
    assert len(cache_entries(cache)) == 3 and short_report.kept < len(KEPT)
    assert (cache / first / "report.json").stat().st_mtime_ns == stamp


def test_cache_is_invalidated_when_the_data_file_changes(setup):
    cfg, _, _, cache = setup
    build(setup)
    records = RECORDS[:2]
    Path(cfg.data_path).write_text(json.dumps(records), encoding="utf-8")
    dataset, report = build(setup)
    assert len(cache_entries(cache)) == 2 and report.total == 2 and list(dataset.table["id"]) == ["img", "txt"]


@pytest.mark.parametrize("module", dataset_module.RULE_MODULES)
def test_cache_key_changes_with_the_source_of_any_rule_module(setup, monkeypatch, module):
    """The key hashes the source of the modules that make the rows: an edit to any of them (even a comment)
    gives a new key; the same sources give the same key."""
    cfg, tokenizer, _, _ = setup
    key = dataset_module.cache_key(cfg, tokenizer, 576)
    read = dataset_module.rule_source
    assert len(dataset_module.RULE_MODULES) == 8 and b"\"\"\"" in read(module)  # the real source file
    def edited(name: str) -> bytes:
        return read(name) + (b"# a comment\n" if name == module else b"")

    monkeypatch.setattr(dataset_module, "rule_source", edited)
    assert dataset_module.cache_key(cfg, tokenizer, 576) != key
    monkeypatch.setattr(dataset_module, "rule_source", lambda name: bytes(read(name)))
    assert dataset_module.cache_key(cfg, tokenizer, 576) == key


def test_cache_key_covers_every_template_field(setup, monkeypatch):
    cfg, tokenizer, _, _ = setup
    template = get_template(cfg.prompt_template)
    key = dataset_module.cache_key(cfg, tokenizer, 576)
    for field in dataclasses.fields(template):
        value = getattr(template, field.name)
        changed = not value if isinstance(value, bool) else (*value, "x") if isinstance(value, tuple) else value + "x"
        edited = dataclasses.replace(template, **{field.name: changed})
        monkeypatch.setattr(dataset_module, "get_template", lambda _, t=edited: t)
        assert dataset_module.cache_key(cfg, tokenizer, 576) != key, field.name
    monkeypatch.setattr(dataset_module, "get_template", lambda _: dataclasses.replace(template))
    assert dataset_module.cache_key(cfg, tokenizer, 576) == key


def test_missing_data_file_is_a_user_error(setup):
    from vlmtune.errors import UserError

    with pytest.raises(UserError, match=r"nowhere\.json: data file not found"):
        build(setup, data_path=str(setup[3] / "nowhere.json"))


def test_default_is_lazy_unless_packing(setup):
    from vlmtune.data.dataset import tokenizes_lazily

    cfg = dataclasses.replace(setup[0], lazy_tokenize=None)
    assert tokenizes_lazily(cfg) and not tokenizes_lazily(dataclasses.replace(cfg, pack_to_max_length=True))
    assert not tokenizes_lazily(dataclasses.replace(cfg, lazy_tokenize=False))


def test_lazy_report_keeps_what_only_tokenizing_can_reject(setup):
    dataset, report = build(setup, lazy_tokenize=True)
    lazy_kept = KEPT[:4] + ["long"] + KEPT[4:]  # no_trainable_tokens is found when "long" is loaded
    assert (report.total, report.kept, report.lazy) == (len(RECORDS), len(lazy_kept), True)
    assert report.dropped == {k: v for k, v in DROPPED.items() if k != "no_trainable_tokens"}
    assert list(dataset.table["id"]) == lazy_kept
    assert "8/13 records kept, tokenized in the dataloader" in report.summary()
    got = dataset[lazy_kept.index("long")]  # long (nothing to train on), gone, escape: skipped to trunc
    assert got["id"] == "trunc"
    assert [(s["id"], s["kind"]) for s in got["skipped"]] == [
        ("long", "no_trainable_tokens"), ("gone", "image_missing"), ("escape", "image_path_escapes")]
    assert "max_length=1024" in got["skipped"][0]["detail"]


def test_lazy_samples_equal_the_token_table_samples(setup):
    eager, _ = build(setup)
    lazy, _ = build(setup, lazy_tokenize=True)
    by_id = {lazy.table[i]["id"]: i for i in range(len(lazy))}
    for i in range(len(eager)):
        want, got = eager[i], lazy[by_id[eager.table[i]["id"]]]
        assert got["id"] == want["id"] and [s["id"] for s in got["skipped"]][-2:] == [s["id"] for s in want["skipped"]]
        assert got["input_ids"].dtype == want["input_ids"].dtype == got["labels"].dtype
        assert got["input_ids"].tolist() == want["input_ids"].tolist() and got["labels"].tolist() == want["labels"].tolist()
        assert torch.equal(got["pixel_values"], want["pixel_values"])
    assert len(cache_entries(setup[3])) == 2  # the two tables are cached apart


def test_lazy_lengths_are_estimates_exact_in_images_and_capped(setup):
    eager, _ = build(setup)
    lazy, _ = build(setup, lazy_tokenize=True)
    ids = list(lazy.table["id"])
    exact = dict(zip(eager.table["id"], eager.modality_lengths.tolist()))
    estimate = dict(zip(ids, lazy.modality_lengths.tolist()))
    assert estimate["trunc"] == exact["trunc"] == 1024 and estimate["long"] == -1024  # capped at max_length
    for key in ("img", "txt", "multi", "uni"):  # the sign (image or not) is exact, the text part close
        assert np.sign(estimate[key]) == np.sign(exact[key])
        assert abs(estimate[key] - exact[key]) <= 0.35 * (abs(exact[key]) - 576 * (key != "txt")) + 2


@pytest.mark.parametrize("lazy", [True, False])
def test_a_broken_jsonl_line_is_dropped_as_data_check_reports_it(setup, tmp_path, lazy):
    """A cut-off line (a download or a writer interrupted) costs that record, not the build; same index,
    line and kind as `data check` gives (tests/data/test_check.py)."""
    from bad_corpus import build_broken_files

    _, (path, bad_line, n_good) = build_broken_files(tmp_path).values()
    lines = path.read_text().splitlines()
    path.write_text("\n\n".join(lines[:2]) + "\n" + "\n".join(lines[2:]) + "\n" + lines[0][:25])  # a blank line; a partial last line
    dataset, report = build(setup, data_path=str(path), lazy_tokenize=lazy)
    assert (report.total, report.kept, report.dropped) == (n_good + 2, n_good, {"json_syntax": 2})
    first, last = report.examples["json_syntax"]
    assert (first["index"], last["index"]) == (bad_line - 1, n_good + 1)
    assert first["detail"].startswith(f"line {bad_line + 1} column ") and last["detail"].startswith(f"line {len(lines) + 2} column ")
    assert [dataset[i]["id"] for i in range(len(dataset))] == ["l0", "l1", "l3"]


@pytest.mark.parametrize("lazy", [True, False])
def test_an_empty_jsonl_file_has_no_records_and_an_empty_json_file_says_so(setup, tmp_path, lazy):
    from vlmtune.errors import UserError

    (tmp_path / "empty.jsonl").write_text("")
    dataset, report = build(setup, data_path=str(tmp_path / "empty.jsonl"), lazy_tokenize=lazy)
    assert (len(dataset), report.total, report.kept) == (0, 0, 0)
    (tmp_path / "empty.json").write_text(" \n")
    with pytest.raises(UserError, match=r"empty\.json: invalid JSON at line 2 column 1: the file is empty"):
        build(setup, data_path=str(tmp_path / "empty.json"), lazy_tokenize=lazy)


# ---- AnyRes: every image's (height, width) read from its header at the build, its tokens counted exactly


@pytest.fixture
def anyres_setup(setup, tiny, tmp_path):
    """(DataConfig over a copy of the example images, max positions per image, AnyRes, preprocessor)."""
    import shutil

    from vlmtune.model.anyres import DEFAULT_PINPOINTS, image_layout
    from vlmtune.model.vision import vision_config

    cfg, _, _, _ = setup
    shutil.copytree(tiny.data / "images", tmp_path / "photos" / "images")
    image_length, anyres = image_layout(vision_config(str(tiny.clip)), None, DEFAULT_PINPOINTS)
    preprocess = ImagePreprocessor(load_image_processor(str(tiny.clip)), pad_to_square=False, pinpoints=anyres.pinpoints)
    return dataclasses.replace(cfg, image_folder=str(tmp_path / "photos"), max_length=4096), image_length, anyres, preprocess


@pytest.mark.parametrize("lazy", [False, True])
def test_anyres_lengths_equal_the_positions_the_model_splices(setup, anyres_setup, tiny_model_config, lazy):
    """The table's length of every sample is what LlavaModel.prepare_inputs really produces for it (the token
    table exactly; the text table's estimate differs from the fixed-size build's by the image counts only)."""
    from PIL import Image

    from vlmtune.data.collate import collate
    from vlmtune.data.table import row_sizes
    from vlmtune.model.anyres import DEFAULT_PINPOINTS
    from vlmtune.model.build import build_model

    _, tok, _, cache = setup
    cfg, image_length, anyres, preprocess = anyres_setup
    cfg = dataclasses.replace(cfg, lazy_tokenize=lazy)
    dataset, report = build_dataset(cfg, tok, preprocess, image_length, cache, anyres)
    assert (report.dropped["image_missing"], report.dropped["image_path_escapes"]) == (1, 1)  # known at the build
    model = build_model(tiny_model_config(image_grid_pinpoints=DEFAULT_PINPOINTS), for_training=False).eval()
    fixed, _ = build_dataset(cfg, tok, None, 576, cache)  # no AnyRes: every image 576
    fixed_lengths = {row["id"]: row["length"] for row in fixed.table}
    counts = set()
    for i in range(len(dataset)):
        row, sample = dataset.table[i], dataset[i]
        if sample["skipped"]:  # lazily, the 'long' record has nothing to train on: the next one stands in
            assert lazy and row["id"] == "long"
            continue
        sizes = row_sizes(row["image_sizes"])
        assert sizes == [tuple(hw) for hw in sample["image_sizes"].tolist()]
        assert sizes == [Image.open(Path(cfg.image_folder) / p).size[::-1] for p in row["images"]]
        image_tokens = [anyres.tokens(hw) for hw in sizes]
        counts.update(image_tokens)
        if lazy:  # estimates are capped at max_length ('trunc' is over it either way)
            expected = min(cfg.max_length, fixed_lengths[row["id"]] + sum(image_tokens) - 576 * len(sizes))
            assert row["length"] == expected
            continue
        batch = collate([sample], tok.pad_token_id)
        with torch.no_grad():
            spliced = model.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                           batch["pixel_values"], image_sizes=batch["image_sizes"])
        assert row["length"] == spliced["inputs_embeds"].shape[1] == spliced["attention_mask"].sum()
    assert len(counts) >= 3 and max(counts) < image_length  # several grids; none of these photos takes the most


def test_anyres_image_replaced_after_the_build_is_caught_when_loaded(setup, anyres_setup):
    from PIL import Image

    _, tok, _, cache = setup
    cfg, image_length, anyres, preprocess = anyres_setup
    dataset, _ = build_dataset(cfg, tok, preprocess, image_length, cache, anyres)
    index = list(dataset.table["id"]).index("img")
    Image.new("RGB", (90, 300), (1, 2, 3)).save(Path(cfg.image_folder) / "images" / "chelsea.jpg")
    sample = dataset[index]
    assert sample["id"] != "img" and sample["skipped"][0]["kind"] == "image_changed"
    assert "213x320 when the data cache was built" in sample["skipped"][0]["detail"]


def test_anyres_cache_key_follows_the_tiling_and_the_image_folder(setup, anyres_setup):
    from vlmtune.model.anyres import AnyRes

    _, tok, _, _ = setup
    cfg, image_length, anyres, _ = anyres_setup
    key = dataset_module.cache_key(cfg, tok, image_length, anyres)
    assert key != dataset_module.cache_key(cfg, tok, image_length)
    other = AnyRes(anyres.pinpoints[:2], anyres.tile, anyres.side)
    assert dataset_module.cache_key(cfg, tok, image_length, other) != key
    assert dataset_module.cache_key(dataclasses.replace(cfg, image_folder="elsewhere"), tok, image_length, anyres) != key
    assert dataset_module.cache_key(cfg, tok, image_length, anyres) == key
