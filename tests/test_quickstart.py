"""The README's main job, end to end: scripts/quickstart.sh on the synthetic task of `vlmtune make-tiny`.

It runs every stage a user runs (make-tiny, data check, 2-process ZeRO-2 pretrain and QLoRA finetune, both
convert layouts, both merges, chat, mmbench) and must leave each artefact where its summary says; the QLoRA
model must have learned the task: chat names the held-out shape's colour, and the held-out MMBench accuracy
clears the threshold of tests/test_learning.py (0.75 of 48 four-option questions; chance 0.25).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from test_learning import THRESHOLD

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e


def test_quickstart_runs_the_whole_pipeline(tmp_path):
    work = tmp_path / "qs"
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC_PER_NODE", "NNODES", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "quickstart.sh"), str(work)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for step in [f"{i}/9" for i in range(1, 10)] + ["summary"]:
        assert f"== {step}" in proc.stderr
    report = json.loads((work / "data_check.json").read_text())
    assert report["exit_code"] == 0 and report["blocking"] == {} and report["records"] == report["good"] == 384
    for stage in ("pretrain", "finetune"):
        assert sorted((work / stage).glob("iter_*.pth")), stage
        assert (work / stage / "loss_curve.png").stat().st_size > 1000
        assert (work / stage / "train_log.jsonl").read_text().count('"loss"') >= 2
    assert (work / "hf" / "llm_adapter" / "adapter_config.json").is_file()
    assert (work / "hf" / "visual_encoder_adapter" / "adapter_config.json").is_file()
    assert (work / "hf" / "projector" / "config.json").is_file()
    assert (work / "hf_llava" / "config.json").is_file()
    assert (work / "merged_llm" / "config.json").is_file() and (work / "merged_clip" / "config.json").is_file()
    labels = json.loads((work / "tiny" / "task" / "labels.json").read_text())
    assert (work / "chat.txt").read_text().strip().lower().rstrip(".") == labels["images/heldout_0000.png"]["colour"]
    (run,) = [p for p in (work / "mmbench").iterdir() if p.is_dir()]
    acc = (run / "heldout_mmbench_acc.csv").read_text()
    assert acc.startswith("eval,split,Overall") and "circular" in acc
    before, after = re.search(r"held-out accuracy +: before finetuning ([\d.]+) +after ([\d.]+)", proc.stdout).groups()
    assert float(after) >= THRESHOLD and float(after) > float(before)
    assert "finetune checkpoint" in proc.stdout and str(run.name) in proc.stdout
