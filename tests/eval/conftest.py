"""Fixtures for the eval tests: real base64 JPEGs, a circular dev TSV, and CLI flags for a tiny model."""
from __future__ import annotations

import pytest
from mmbench_tsv import base_questions, jpeg_b64, rotations, write_tsv
from skimage import data as skdata


@pytest.fixture(scope="session")
def images() -> list[str]:
    """Four distinct base64 JPEGs."""
    return [jpeg_b64(a) for a in (skdata.astronaut(), skdata.camera(), skdata.coffee(), skdata.chelsea())]


@pytest.fixture
def dev_tsv(tmp_path, images):
    """A circular dev TSV: 3 questions x 4 rotations, copies referring to the main row's image."""
    rows = [r for q in base_questions(images) for r in rotations(q, 4, image_refs=True)]
    return write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows)


@pytest.fixture(scope="module")
def model_args(request, tiny, tmp_path_factory) -> list[str]:
    """CLI model flags: the tiny LLM + CLIP + a seeded projector saved as `convert pth_to_hf` saves it, and the
    requesting module's MAX_NEW as --max-new-tokens."""
    import torch

    from vlmtune.config import ModelConfig
    from vlmtune.convert.xtuner import save_projector
    from vlmtune.model.build import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(str(tiny.llm), str(tiny.clip), torch_dtype="float32"), for_training=False)
    llava = tmp_path_factory.mktemp("llava")
    save_projector(model, llava / "projector")
    return [str(tiny.llm), "--llava", str(llava), "--visual-encoder", str(tiny.clip), "--prompt-template", "vicuna",
            "--torch-dtype", "float32", "--device", "cpu", "--max-new-tokens", str(request.module.MAX_NEW)]
