"""Training on messy data through the CLI: bad records are dropped or skipped and logged, the run finishes;
past the skip budget it stops with one clear line and a non-zero exit."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def _messy_dataset(tiny, root):
    """The example finetune data plus: a record without conversations (dropped at build), a record whose
    image is corrupt on disk (skipped when loaded), and one whose image is missing (skipped when loaded)."""
    shutil.copytree(tiny.data / "images", root / "images")
    records = json.loads(tiny.finetune_json.read_text())
    (root / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    records += [
        {"id": "no-conv", "image": "images/chelsea.jpg"},
        {"id": "bad-pixels", "image": "images/corrupt.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Noise."}]},
        {"id": "gone", "image": "images/missing.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Nothing."}]},
    ]
    path = root / "messy.json"
    path.write_text(json.dumps(records))
    return path


def _train(tiny, tmp_path, data, budget):
    env = {**os.environ, "VLMTUNE_TINY_DIR": str(tiny.root), "HF_HUB_OFFLINE": "1"}
    env.pop("NPROC_PER_NODE", None)
    cmd = [sys.executable, "-m", "vlmtune", "train", "tiny_llava_finetune_lora", "--work-dir", str(tmp_path / "wd"),
           "--cfg-options", f"data_path={data}", f"image_folder={data.parent}", f"max_bad_sample_fraction={budget}",
           "max_epochs=1", "batch_size=1", "save_steps=1000", "evaluation_freq=1000", "logging_interval=1",
           f"cache_dir={tmp_path / 'cache'}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_bad_records_are_dropped_and_skipped_and_the_run_completes(tiny, tmp_path):
    data = _messy_dataset(tiny, tmp_path)
    proc = _train(tiny, tmp_path, data, budget=0.5)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "wd" / "train.log").read_text()
    assert "12/13 records kept" in log and "missing_conversations: 1" in log
    assert "skipped sample bad-pixels" in log and "image_undecodable" in log
    assert "skipped sample gone" in log and "image_missing" in log
    records = [json.loads(line) for line in (tmp_path / "wd" / "train_log.jsonl").read_text().splitlines()]
    # every failed load is counted and logged (a bad sample can also be met while replacing its neighbour)
    skip_lines = [line for line in log.splitlines() if "skipped sample" in line]
    assert records[-1]["skipped"] == len(skip_lines) >= 2
    assert all(("bad-pixels" in line) or ("gone" in line) for line in skip_lines)
    assert (tmp_path / "wd" / f"iter_{records[-1]['step']}.pth").is_file()


def test_exceeding_the_skip_budget_stops_with_one_line_and_exit_2(tiny, tmp_path):
    data = _messy_dataset(tiny, tmp_path)
    proc = _train(tiny, tmp_path, data, budget=0.1)  # 1 dropped of 13 passes the pre-flight; 2 skips do not
    assert proc.returncode == 2, proc.stderr[-3000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("vlmtune: error:")]
    assert len(error_lines) == 1
    assert "samples were skipped" in error_lines[0] and "vlmtune data check" in error_lines[0]


def test_preflight_refuses_data_that_is_mostly_broken(tiny, tmp_path):
    data = _messy_dataset(tiny, tmp_path)
    proc = _train(tiny, tmp_path, data, budget=0.0)  # default-like budget: 1 of 13 records dropped is too many
    assert proc.returncode == 2
    assert "cannot be trained on" in proc.stderr and "vlmtune data check" in proc.stderr
