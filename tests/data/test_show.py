"""`vlmtune data show`: the sample training would see, with trained spans marked, ids, labels and the cut."""
from __future__ import annotations

import json
import re

from vlmtune.cli import main as cli
from vlmtune.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vlmtune.data.llava_json import normalize_record
from vlmtune.data.templates import get_template
from vlmtune.data.tokenize import tokenize_conversation


def shown(capsys, *argv) -> str:
    assert cli(["data", "show", *argv]) == 0
    return capsys.readouterr().out


def expected(tiny, tokenizer, index: int, max_length: int):
    """ids/labels of record `index` of the tiny finetune data, tokenized directly by the masking rule."""
    raw = json.loads(tiny.finetune_json.read_text())[index]
    sample = normalize_record(raw, index)
    return tokenize_conversation(sample.turns, tokenizer, get_template("internlm2_chat"), max_length, 576, sample.system)


def runs(ids, labels, tokenizer) -> list[str]:
    """Decoded runs of consecutive trained ids."""
    out, run = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            out.append(tokenizer.decode(run)), run.clear()
    return out + ([tokenizer.decode(run)] if run else [])


def test_shows_the_ids_labels_and_trained_spans_of_the_training_sample(tiny, tiny_tokenizer, tmp_path, capsys):
    out = shown(capsys, "tiny_llava_finetune_lora", "--index", "0", "9", "--work-dir", str(tmp_path / "w"), "--color", "never")
    blocks = out.split("sample ")[1:]
    assert len(blocks) == 2
    for block, index in zip(blocks, (0, 9)):
        want = expected(tiny, tiny_tokenizer, index, 1024)
        ids = json.loads(re.search(r"input_ids \(\d+\): (\[.*\])", block).group(1))
        labels = json.loads(re.search(r"labels +\(\d+\): (\[.*\])", block).group(1))
        assert (ids, labels) == (want.input_ids, want.labels)
        assert re.findall(r"\[\[(.*?)\]\]", block, flags=re.S) == runs(ids, labels, tiny_tokenizer)
        assert block.count("<image x576>") == ids.count(IMAGE_TOKEN_INDEX)
        assert f"{want.length} positions" in block and "not truncated" in block


def test_a_truncated_sample_shows_where_it_was_cut(tiny, tiny_tokenizer, tmp_path, capsys):
    full = expected(tiny, tiny_tokenizer, 0, 10**9)
    limit = full.length - 10  # cuts into the last answer (record 0 has two turns)
    out = shown(capsys, "tiny_llava_finetune_lora", "--index", "0", "--work-dir", str(tmp_path / "w"), "--color", "always",
                "--cfg-options", f"max_length={limit}")
    cut = expected(tiny, tiny_tokenizer, 0, limit)
    assert cut.length < full.length and cut.trainable
    assert f"cut at {cut.length} of {full.length} (max_length {limit})" in out
    assert "\033[32m" in out and "cut here by max_length" in out and "[[" not in out


def test_an_anyres_sample_shows_each_image_s_own_positions(tiny, tiny_tokenizer, tmp_path, capsys):
    """tiny_llava_anyres_task_finetune_lora: each image slot shows the positions of its own grid (model/anyres.py
    from the image's size), and the total is the table's exact length."""
    from PIL import Image

    from vlmtune.model.anyres import DEFAULT_PINPOINTS, image_layout
    from vlmtune.model.vision import vision_config

    _, anyres = image_layout(vision_config(str(tiny.clip)), None, DEFAULT_PINPOINTS)
    records = json.loads((tiny.task / "anyres.json").read_text())
    out = shown(capsys, "tiny_llava_anyres_task_finetune_lora", "--index", "0", "1", "--work-dir", str(tmp_path / "w"),
                "--color", "never")
    seen = []
    for block, record in zip(out.split("sample ")[1:], records):
        height, width = Image.open(tiny.task / record["image"]).size[::-1]
        tokens = anyres.tokens((height, width))
        ids = json.loads(re.search(r"input_ids \(\d+\): (\[.*\])", block).group(1))
        assert f"<image x{tokens}>" in block and f"(images {tokens} + {len(ids) - 1} text)" in block
        assert f"{len(ids) - 1 + tokens} positions" in block
        seen.append(tokens)
    assert len(seen) == 2 and seen[0] != seen[1]  # 224x112 and 112x224: the same 1x2 grid, unpadded differently
