"""Fixtures for the eval tests: real base64 JPEGs and a circular dev TSV."""
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
