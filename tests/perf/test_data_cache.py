"""The fast token cache: the parallel build gives exactly the per-record tokens, and the cache is keyed right.

- A malformed file raises, from the table build, the located error the reader gives (how chunks are cut:
  tests/data/test_reader.py).
- `build_table` over a synthetic mix (several chunks, forked workers) must hold, row for row, what
  `tokenize_conversation` gives each record (the golden-tested masking rule), with the same drops.
- The text table (lazy tokenization) gives, through the dataset's RowTokenizer, every sample the same
  tokens, and estimated lengths close to the exact ones.
- The cache is reused when nothing changed and rebuilt when the template, max_length, system text or the
  data file change (both tables); a second rank waits on the build lock (no timeout) and then reads the
  same table. (The key's rule sources: tests/data/test_dataset.py.)
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from vlmtune.config import DataConfig
from vlmtune.data import llava_json, reader
from vlmtune.data.dataset import build_dataset, build_table
from vlmtune.data.llava_json import normalize_record
from vlmtune.data.reader import JSONSyntaxError, read_records
from vlmtune.data.templates import get_template
from vlmtune.data.tokenize import tokenize_conversation, tokenize_conversations, truncate
from vlmtune.errors import UserError

ROOT = Path(__file__).resolve().parents[2]

def make_mix(path: Path, records: int) -> Path:
    """A small synthetic mix665k, written by the benchmark's generator."""
    spec = importlib.util.spec_from_file_location("make_synthetic_mix", ROOT / "scripts/bench/make_synthetic_mix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([str(path), "--records", str(records)])
    return path


@pytest.mark.parametrize("text", [
    "", "[]", "[ ]", '[{"a": 1},]', '[{"a": 1} {"b": 2}]', '[{"a": 1}, {"b": 2}', '{"a": 1}', '[{"a": 1}] x',
    '[{"a": "unterminated}]', "[1, 2]]", "[,]",
])
@pytest.mark.parametrize("lazy", [True, False])
def test_malformed_lists_raise_what_the_streaming_reader_raises(tmp_path, tiny_tokenizer, text, lazy):
    path = tmp_path / "d.json"
    path.write_text(text)
    cfg = DataConfig(data_path=str(path), image_folder="", prompt_template="vicuna", lazy_tokenize=lazy)
    try:
        expected = list(read_records(path))
    except (JSONSyntaxError, UserError) as e:
        with pytest.raises(type(e)) as got:
            build_table(cfg, tiny_tokenizer, 576, tmp_path / "cache")
        assert str(got.value) == str(e)
    else:
        table, report = build_table(cfg, tiny_tokenizer, 576, tmp_path / "cache")
        assert expected == [] and len(table) == report.total == 0


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    return make_mix(tmp_path_factory.mktemp("mix") / "mix.json", 240)


@pytest.mark.parametrize("tokenizer,template", [("real", "vicuna"), ("tiny", "internlm2_chat")])
def test_parallel_table_equals_tokenize_conversation_per_record(mix, tmp_path, monkeypatch, request, tokenizer, template):
    monkeypatch.setattr(reader, "CHUNK_BYTES", 40_000)  # ~10 chunks over the forked workers
    tok = request.getfixturevalue(f"{tokenizer}_tokenizer")
    cfg = DataConfig(data_path=str(mix), image_folder="", prompt_template=template, max_length=900, lazy_tokenize=False)
    table, report = build_table(cfg, tok, 576, tmp_path)
    rows = table.with_format("numpy", columns=["input_ids", "labels"], output_all_columns=True)
    kept, dropped = [], 0
    for index, raw in enumerate(json.loads(mix.read_text())):
        sample = normalize_record(raw, index)
        want = tokenize_conversation(sample.turns, tok, get_template(template), 900, 576)
        if want.trainable:
            kept.append((sample, want))
        else:
            dropped += 1
    assert (report.total, report.kept, report.dropped.get("no_trainable_tokens", 0)) == (240, len(kept), dropped)
    assert report.truncated == sum(w.truncated for _, w in kept) > 0
    assert len(rows) == len(kept)
    for row, (sample, want) in zip(rows, kept):
        assert row["id"] == sample.id and row["images"] == sample.images[: want.num_images]
        assert row["input_ids"].tolist() == want.input_ids and row["labels"].tolist() == want.labels
        assert (row["length"], row["n_images"]) == (want.length, want.num_images)


@pytest.mark.parametrize("tokenizer,template", [("real", "vicuna"), ("tiny", "internlm2_chat")])
def test_lazy_samples_equal_tokenize_conversation_and_lengths_are_close(mix, tmp_path, monkeypatch, request, tokenizer, template):
    monkeypatch.setattr(reader, "CHUNK_BYTES", 40_000)  # ~10 chunks over the forked workers
    tok = request.getfixturevalue(f"{tokenizer}_tokenizer")
    cfg = DataConfig(data_path=str(mix), image_folder="", prompt_template=template, max_length=900, lazy_tokenize=True)
    dataset, report = build_dataset(cfg, tok, None, 576, tmp_path)
    records = json.loads(mix.read_text())
    assert report.lazy and report.total == report.kept == len(dataset) == len(records)
    errors, text_tokens = [], 0
    for index, raw in enumerate(records):
        sample = normalize_record(raw, index)
        want = tokenize_conversation(sample.turns, tok, get_template(template), 900, 576)
        row = dataset.table[index]
        assert (row["id"], row["images"], row["n_images"]) == (sample.id, sample.images, len(sample.images))
        if not want.trainable:
            with pytest.raises(llava_json.RecordError, match="no_trainable_tokens"):
                dataset.row_tokenizer(row)
            continue
        got = dataset.row_tokenizer(row)
        assert (got.input_ids, got.labels, got.length) == (want.input_ids, want.labels, want.length)
        errors.append(row["length"] - want.length)
        text_tokens += want.length - 576 * want.num_images
    # the estimate: images exact, the text's tokens from the fitted byte-count model
    assert np.mean(np.abs(errors)) < 0.1 * text_tokens / len(errors), (np.mean(np.abs(errors)), text_tokens / len(errors))


def test_batched_truncation_matches_one_by_one(real_tokenizer):
    """tokenize_conversations over many samples = each alone, at limits inside, at and beyond the samples."""
    template = get_template("vicuna")
    conversations = [([("<image>\nDescribe." + " word" * k, "An answer." * k), ("More?", "Yes.")], "") for k in range(0, 60, 7)]
    for max_length in (1, 577, 600, 620, 2048, sys.maxsize):
        batch = tokenize_conversations(conversations, real_tokenizer, template, max_length, 576)
        for i, (turns, system) in enumerate(conversations):
            full = tokenize_conversation(turns, real_tokenizer, template, sys.maxsize, 576)
            assert batch[i] == truncate(full.input_ids, full.labels, max_length, 576)
            assert batch.trainable[i] == batch[i].trainable
        assert batch.truncated.any() == (max_length <= 620)


def entries(cache: Path) -> dict[str, int]:
    """Cache folder -> mtime of its table (changes only when it is rebuilt)."""
    return {p.name: (p / "table.arrow").stat().st_mtime_ns for p in cache.iterdir() if p.is_dir()}


@pytest.mark.parametrize("lazy", [True, False])
def test_cache_reused_unless_a_key_changes(mix, tmp_path, tiny_tokenizer, lazy):
    data = tmp_path / "data" / "mix.json"
    data.parent.mkdir()
    data.write_bytes(mix.read_bytes())
    cache = tmp_path / "cache"
    cfg = DataConfig(data_path=str(data), image_folder="", prompt_template="vicuna", max_length=2048, lazy_tokenize=lazy)
    build = lambda **kw: build_table(dataclasses.replace(cfg, **kw), tiny_tokenizer, 576, cache)  # noqa: E731
    first, _ = build()
    before = entries(cache)
    again, _ = build()
    assert entries(cache) == before and again.data.equals(first.data)  # reused, not rebuilt
    for n, change in enumerate([{"prompt_template": "internlm2_chat"}, {"max_length": 1024}, {"system": "Be brief."}], 2):
        changed, _ = build(**change)
        assert len(entries(cache)) == n and not changed.data.equals(first.data)
    assert {k: v for k, v in entries(cache).items() if k in before} == before  # the others are untouched
    data.write_text(json.dumps(json.loads(data.read_text())[:10]))  # the data file changes
    table, report = build()
    assert len(entries(cache)) == 5 and report.total == len(table) == 10


def _build_in_child(cfg, tokenizer, cache, out):
    table, report = build_table(cfg, tokenizer, 576, cache)
    out.put((len(table), report.kept))


def test_a_second_rank_waits_for_the_build_lock(mix, tmp_path, tiny_tokenizer):
    cfg = DataConfig(data_path=str(mix), image_folder="", prompt_template="vicuna", max_length=2048)
    table, _ = build_table(cfg, tiny_tokenizer, 576, tmp_path)
    (folder,) = entries(tmp_path)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    with FileLock(str(tmp_path / folder) + ".lock"):  # rank 0 "building"
        child = ctx.Process(target=_build_in_child, args=(cfg, tiny_tokenizer, tmp_path, out))
        child.start()
        time.sleep(1.5)
        assert child.is_alive() and out.empty()  # waiting, not failed, not timed out
    child.join(30)
    assert out.get(timeout=1) == (len(table), len(table)) and child.exitcode == 0


def test_dataset_modality_lengths_come_from_the_columns(mix, tmp_path, tiny_tokenizer):
    cfg = DataConfig(data_path=str(mix), image_folder="", prompt_template="vicuna", max_length=2048)
    dataset, _ = build_dataset(cfg, tiny_tokenizer, None, 576, tmp_path)
    lengths = np.asarray(dataset.table["length"])
    has_image = np.array([len(x) > 0 for x in dataset.table["images"]])
    assert 0 < (~has_image).sum() < len(dataset)  # both modalities present
    assert dataset.modality_lengths.tolist() == np.where(has_image, lengths, -lengths).tolist()
