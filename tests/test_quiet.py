"""vlmtune's own output stays clean: the libraries' known start-up notices (vlmtune/quiet.py) are not shown,
and `--verbose` / VLMTUNE_VERBOSE=1 brings them back (which also shows they are real)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vlmtune import quiet

REPO = Path(__file__).resolve().parents[1]
KNOWN = [message for _, message in quiet.LOG_MESSAGES] + [m for _, m in quiet.WARNING_MESSAGES] + quiet.PRINTED_LINES + [
    "Loading weights", "Setting OMP_NUM_THREADS environment variable"]
OWN = re.compile(r"^(\d\d/\d\d \d\d:\d\d:\d\d vlmtune |vlmtune: launching |train: )")


def run(*argv: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", quiet.VERBOSE_ENV)}
    env.update(HF_HUB_OFFLINE="1", **env_extra)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return subprocess.run([sys.executable, "-m", "vlmtune", *argv], env=env, capture_output=True, text=True, timeout=300)


def lines(stderr: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]", stderr) if line.strip()]


def known_in(stderr: str) -> list[str]:
    return [k for k in KNOWN if k in stderr]


@pytest.fixture(scope="module")
def chat_argv(tiny):
    from convert.convert_helpers import write_checkpoint

    out = tiny.root / "quiet_converted"
    if not (out / "vlmtune_config.py").is_file():
        pth = write_checkpoint(tiny.root / "quiet_iter_1.pth", {})
        assert run("convert", "pth_to_hf", str(pth), str(out)).returncode == 0
    return ["chat", str(tiny.llm), "--llava", str(out), "--image", str(tiny.data / "images" / "chelsea.jpg"),
            "--prompt", "What is it?", "--max-new-tokens", "3", "--device", "cpu"]


def test_chat_prints_only_its_answer(chat_argv):
    proc = run(*chat_argv)
    assert proc.returncode == 0 and proc.stdout.strip()
    assert lines(proc.stderr) == []


def test_verbose_shows_the_notices_again(chat_argv):
    """The notices exist (so the test above checks something): transformers' torchvision fallback and
    bitsandbytes' missing kernel appear, with the flag and with the variable."""
    for proc in (run("--verbose", *chat_argv), run(*chat_argv, **{quiet.VERBOSE_ENV: "1"})):
        assert proc.returncode == 0
        assert len(known_in(proc.stderr)) >= 3, proc.stderr[-2000:]


def test_a_two_rank_train_prints_only_vlmtune_s_lines(tiny, tmp_path):
    proc = run("train", "tiny_llava_pretrain", "--work-dir", str(tmp_path / "w"), "--cfg-options", "max_steps=2",
               NPROC_PER_NODE="2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert known_in(proc.stderr) == []
    assert [line for line in lines(proc.stderr) if not OWN.match(line)] == []
