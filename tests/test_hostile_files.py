"""A downloaded checkpoint or converted folder cannot run code through the config stored in it.

The stored config (`config_text` in iter_N.pth and in a ZeRO folder's model states, `vlmtune_config.py` in a
--llava folder or a huggingface-layout folder) is Python text. mmengine's Config.fromstring would execute it;
vlmtune reads it as `NAME = literal` lines only. Each hostile file below tries to write a marker file, and is
first shown to really write it when executed (so a missing marker means something). Every entry point that
reads one (convert pth_to_hf, pretrained_pth, chat, mmbench) must then print one line, exit 2, and leave no
marker.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from convert.convert_helpers import IMAGE, checkpoint, converted  # noqa: F401
from eval.mmbench_tsv import base_questions, jpeg_b64, write_tsv

from vlmtune.cli import main as cli
from vlmtune.config import config_from_text, read_literal_assignments
from vlmtune.weights import DS_TAG
from vlmtune.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def hostile_text(marker: Path, saved_text: str) -> str:
    """A saved config with a statement that writes `marker` when the text is executed."""
    return f"import os\n_ = open({str(marker)!r}, 'w').write('config code ran')\n{saved_text}"


def hostile_value_text(marker: Path, saved_text: str) -> str:
    """The same attack hidden in a value: `NAME = <call>`, which is an assignment but not a literal."""
    return f"system = open({str(marker)!r}, 'w').write('config code ran') and ''\n{saved_text}"


@pytest.mark.parametrize("make", [hostile_text, hostile_value_text])
def test_the_hostile_texts_really_run_code_when_executed_by_mmengine(tmp_path, make):
    from mmengine.config import Config as MMConfig

    marker = tmp_path / "marker"
    MMConfig.fromstring(make(marker, "prompt_template = 'vicuna'\n"), file_format=".py")
    assert marker.read_text() == "config code ran"


@pytest.mark.parametrize("make", [hostile_text, hostile_value_text])
def test_config_from_text_refuses_them_naming_the_file_and_line(tmp_path, make, checkpoint):
    saved = torch.load(checkpoint("lora"), weights_only=True)["config_text"]
    marker = tmp_path / "marker"
    with pytest.raises(UserError, match=r"some/iter_3\.pth: line [12]: refused to read") as e:
        config_from_text(make(marker, saved), "some/iter_3.pth")
    assert "\n" not in str(e.value) and not marker.exists()


def test_literal_reading_takes_exactly_what_the_dump_writes(checkpoint):
    saved = torch.load(checkpoint("lora"), weights_only=True)["config_text"]
    values = read_literal_assignments(saved, "x")
    assert values["llm_lora"]["r"] == 8 and isinstance(values["betas"], tuple)
    for bad in ("a.b = 1\n", "a = b = 1\n", "x, y = 1, 2\n", "a = [1, f()]\n", "a = {'k': __import__('os')}\n",
                "def f(): pass\n", "a = 1 if True else 2\n", "a: int = 1\n", "(lambda: 0)()\n"):
        with pytest.raises(UserError, match="refused to read"):
            read_literal_assignments(bad, "x")


# ---- the hostile files -------------------------------------------------------------------------------------


def hostile_pth(tmp_path: Path, clean: Path) -> tuple[Path, Path]:
    """(iter_N.pth, marker): a real checkpoint whose config_text runs code."""
    marker = tmp_path / "marker"
    payload = torch.load(clean, weights_only=True)
    payload["config_text"] = hostile_text(marker, payload["config_text"])
    path = tmp_path / "iter_1.pth"
    torch.save(payload, path)
    return path, marker


def hostile_zero_folder(tmp_path: Path, clean: Path) -> tuple[Path, Path]:
    """(iter_N.ds/, marker): DeepSpeed's model-states file of that checkpoint with the hostile config_text."""
    marker = tmp_path / "marker"
    payload = torch.load(clean, weights_only=True)
    states = {"module": payload["state_dict"], "param_shapes": [{k: v.shape for k, v in payload["state_dict"].items()}],
              "ds_config": {"zero_optimization": {"stage": 2}}, "config_name": payload["config_name"],
              "config_text": hostile_text(marker, payload["config_text"])}
    folder = tmp_path / "iter_1.ds"
    (folder / DS_TAG).mkdir(parents=True)
    torch.save(states, folder / DS_TAG / "mp_rank_00_model_states.pt")
    return folder, marker


def hostile_folder(tmp_path: Path, clean: Path) -> tuple[Path, Path]:
    """(folder, marker): a copy of a converted folder whose vlmtune_config.py runs code."""
    folder, marker = tmp_path / clean.name, tmp_path / "marker"
    shutil.copytree(clean, folder)
    text = (folder / "vlmtune_config.py").read_text()
    (folder / "vlmtune_config.py").write_text(hostile_text(marker, text))
    return folder, marker


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vlmtune: error:")]
    assert len(lines) == 1, lines
    return lines[0]


def mmbench_tsv(path: Path) -> Path:
    from skimage import data

    images = [jpeg_b64(data.chelsea()), jpeg_b64(data.coffee()), jpeg_b64(data.rocket())]
    return write_tsv(path, base_questions(images))


# ---- every entry point --------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [hostile_pth, hostile_zero_folder])
def test_convert_pth_to_hf_refuses_a_hostile_checkpoint(tmp_path, capsys, checkpoint, make):
    path, marker = make(tmp_path, checkpoint("lora"))
    assert cli(["convert", "pth_to_hf", str(path), str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert "refused to read" in line and str(path) in line
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_pretrained_pth_refuses_a_hostile_checkpoint(tmp_path, checkpoint, tiny):
    path, marker = hostile_pth(tmp_path, checkpoint("lora"))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NPROC_PER_NODE", "NNODES")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")))
    run = subprocess.run([sys.executable, "-m", "vlmtune", "train", "tiny_llava_finetune_lora", "--work-dir",
                          str(tmp_path / "work"), "--cfg-options", f"pretrained_pth={path}", "max_steps=1"],
                         env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in run.stderr.splitlines() if line.startswith("vlmtune: error:")]
    assert run.returncode == 2, run.stderr[-2000:]
    assert len(errors) == 1 and "refused to read" in errors[0] and str(path) in errors[0]
    assert not marker.exists()


@pytest.mark.parametrize("layout", ["xtuner", "huggingface"])
def test_chat_refuses_a_hostile_converted_folder(tmp_path, capsys, converted, tiny, layout):
    folder, marker = hostile_folder(tmp_path, converted("lora", layout))
    model = ["--llava", str(folder)] if layout == "xtuner" else []
    argv = ["chat", str(tiny.llm) if layout == "xtuner" else str(folder), *model, "--image", str(IMAGE),
            "--prompt", "What is it?", "--max-new-tokens", "2", "--device", "cpu"]
    assert cli(argv) == 2
    line = one_error_line(capsys)
    assert "refused to read" in line and str(folder / "vlmtune_config.py") in line and not marker.exists()


@pytest.mark.parametrize("layout", ["xtuner", "huggingface"])
def test_mmbench_refuses_a_hostile_converted_folder(tmp_path, capsys, converted, tiny, layout):
    folder, marker = hostile_folder(tmp_path, converted("lora", layout))
    tsv = mmbench_tsv(tmp_path / "MMBench_DEV_EN.tsv")
    model = ["--llava", str(folder)] if layout == "xtuner" else []
    argv = ["mmbench", str(tiny.llm) if layout == "xtuner" else str(folder), *model, "--data-path", str(tsv),
            "--work-dir", str(tmp_path / "eval"), "--device", "cpu"]
    assert cli(argv) == 2
    line = one_error_line(capsys)
    assert "refused to read" in line and str(folder / "vlmtune_config.py") in line and not marker.exists()
