"""The `vlmtune` command, run as users run it (`python -m vlmtune ...` in a subprocess)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vlmtune.config import CONFIG_DIR

SUBCOMMANDS = ["train", "convert", "chat", "serve", "mmbench", "data", "list-cfg", "copy-cfg"]
NESTED = [["convert", "pth_to_hf"], ["convert", "merge"], ["data", "check"], ["data", "prepare"], ["make-tiny"]]


def vlmtune(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "vlmtune", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_help_lists_every_subcommand():
    out = vlmtune("--help")
    assert out.returncode == 0 and out.stderr == ""
    listed = out.stdout.split("positional arguments:")[1]
    for name in SUBCOMMANDS:
        assert f"\n    {name} " in listed, name


@pytest.mark.parametrize("command", [[c] for c in SUBCOMMANDS] + NESTED, ids=" ".join)
def test_each_subcommand_help_works(command):
    out = vlmtune(*command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: vlmtune {' '.join(command)}")


def test_missing_subcommand_is_an_argparse_error():
    out = vlmtune()
    assert out.returncode == 2 and "required: COMMAND" in out.stderr


def test_user_error_is_one_line_on_stderr_and_exit_2(tmp_path):
    out = vlmtune("copy-cfg", "tiny_llava_pretrian", str(tmp_path))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("vlmtune: error: ")
    assert "tiny_llava_pretrian" in out.stderr and "did you mean tiny_llava_pretrain" in out.stderr
    assert "Traceback" not in out.stderr


def test_list_cfg_prints_the_shipped_names():
    out = vlmtune("list-cfg", "-p", "tiny")
    assert out.returncode == 0
    assert out.stdout.split() == sorted(p.stem for p in CONFIG_DIR.glob("tiny*.py"))


def test_copy_cfg_writes_an_identical_copy_named_like_xtuner(tmp_path):
    out = vlmtune("copy-cfg", "tiny_llava_finetune_lora", str(tmp_path / "mine"))
    assert out.returncode == 0, out.stderr
    copy = tmp_path / "mine" / "tiny_llava_finetune_lora_copy.py"
    assert copy.read_text() == (CONFIG_DIR / "tiny_llava_finetune_lora.py").read_text()
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = vlmtune("copy-cfg", "tiny_llava_pretrain", str(blocker))
    assert out.returncode == 2 and "is not a folder" in out.stderr and out.stderr.count("\n") == 1


def test_copied_config_loads_like_the_shipped_one(tiny, tmp_path):
    from vlmtune.config import load_config

    assert vlmtune("copy-cfg", "tiny_llava_pretrain", str(tmp_path)).returncode == 0
    copy = load_config(str(tmp_path / "tiny_llava_pretrain_copy.py"))
    shipped = load_config("tiny_llava_pretrain")
    assert (copy.model, copy.data, copy.train) == (shipped.model, shipped.data, shipped.train)


def test_copied_config_with_a_base_loads(tiny, tmp_path):
    from vlmtune.config import load_config

    assert vlmtune("copy-cfg", "tiny_llava_finetune_qlora", str(tmp_path)).returncode == 0
    assert load_config(str(tmp_path / "tiny_llava_finetune_qlora_copy.py")).model.quantization == "4bit"
