"""Train -> convert -> chat, with a checkpoint the real trainer wrote (`vlmtune train`, DeepSpeed ZeRO-2).

The ZeRO folder (iter_N.ds/) and the .pth file of the same step convert to the same weights, and the
huggingface folder made from the ZeRO folder generates with plain transformers what `vlmtune chat` answers
on the xtuner folder made from the .pth.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from convert_helpers import IMAGE, chat_generator, chat_tokens, hf_greedy
from safetensors.torch import load_file

from vlmtune.cli import main as cli_main
from vlmtune.data.image import load_image

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """work dir of a 2-step LoRA finetune of the tiny models on one process."""
    work_dir = tmp_path_factory.mktemp("train")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    for key in ("NPROC_PER_NODE", "NNODES", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "vlmtune", "train", "tiny_llava_finetune_lora", "--work-dir", str(work_dir),
           "--cfg-options", "max_steps=2", "save_steps=2", "evaluation_freq=1000", "lr=0.01"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (work_dir / "iter_2.pth").is_file() and (work_dir / "iter_2.ds").is_dir()
    return work_dir


def test_zero_folder_converts_like_the_pth(trained, tmp_path):
    for source in ("iter_2.pth", "iter_2.ds"):  # no CONFIG argument: the checkpoint carries it
        assert cli_main(["convert", "pth_to_hf", str(trained / source), str(tmp_path / source)]) == 0
    for part in ("llm_adapter/adapter_model.safetensors", "visual_encoder_adapter/adapter_model.safetensors",
                 "projector/model.safetensors"):
        a, b = load_file(tmp_path / "iter_2.pth" / part), load_file(tmp_path / "iter_2.ds" / part)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), part
    # training moved the LoRA B matrices off their zero init: the adapters are real
    lora_b = [v for k, v in load_file(tmp_path / "iter_2.pth" / "llm_adapter/adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)


def test_trained_checkpoint_huggingface_generates_as_chat(trained, tiny, tmp_path):
    assert cli_main(["convert", "pth_to_hf", str(trained / "iter_2.ds"), str(tmp_path / "hf"), "--save-format", "huggingface"]) == 0
    assert cli_main(["convert", "pth_to_hf", str(trained / "iter_2.pth"), str(tmp_path / "xtuner")]) == 0
    chat = chat_generator(str(tiny.llm), "--llava", str(tmp_path / "xtuner"))
    hf_tokens, _ = hf_greedy(tmp_path / "hf", pixel_values=chat.pixel_values([load_image(IMAGE)]))  # training's pixels
    assert hf_tokens == chat_tokens(chat)
