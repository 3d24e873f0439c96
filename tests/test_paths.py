"""Model, data and checkpoint paths that do not exist are one line, before torchrun or DeepSpeed start."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from vlmtune.errors import UserError
from vlmtune.paths import is_path_like, require_model_folder


def test_path_like_names_are_told_apart_from_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work_dirs" / "tiny").mkdir(parents=True)
    for name in ("./llm", "../llm", "/opt/models/llm", "~/llm", "work_dirs/tiny/llm", "."):
        assert is_path_like(name), name
    for name in ("openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5", "gpt2"):
        assert not is_path_like(name), name


def test_a_missing_folder_is_no_such_folder_and_a_hub_id_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"llm_name_or_path ./nope: no such folder$"):
        require_model_folder("./nope", "llm_name_or_path")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="is a file; pass the model's folder"):
        require_model_folder("./file.bin", "llm_name_or_path")
    require_model_folder("internlm/internlm2-chat-7b", "llm_name_or_path")  # transformers' business
    require_model_folder(str(tmp_path), "llm_name_or_path")


def test_from_pretrained_of_a_missing_folder_says_so_not_a_hub_error(tmp_path):
    from vlmtune.model.build import load_tokenizer

    with pytest.raises(UserError, match="no such folder") as e:
        load_tokenizer(str(tmp_path / "nope"))
    assert "Repo id" not in str(e.value)


def test_a_tiny_config_before_make_tiny_names_the_folder_and_the_command_before_torchrun(tmp_path):
    """With NPROC_PER_NODE=2 the error must come from the launching process, not from two ranks after
    DeepSpeed has started."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(VLMTUNE_TINY_DIR=str(tmp_path / "not_built"), NPROC_PER_NODE="2", HF_HUB_OFFLINE="1")
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "vlmtune", "train", "tiny_llava_pretrain", "--work-dir", str(tmp_path / "w")],
                         env=env, capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - start
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines == [f"vlmtune: error: llm_name_or_path {tmp_path}/not_built/llm: no such folder (the tiny models are "
                     f"not built yet: run `vlmtune make-tiny {tmp_path}/not_built` first)"], run.stderr
    assert "launching" not in run.stderr and seconds < 30
