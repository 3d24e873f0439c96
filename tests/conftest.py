"""Shared fixtures: the tiny offline models (built once per session) and a real 32k SentencePiece tokenizer.

- `tiny`: `vlmtune.tiny.make_tiny` output (TinyPaths: .root, .llm, .clip, .data, .pretrain_json,
  .finetune_json), built once per session; VLMTUNE_TINY_DIR points at it, so the shipped tiny_* configs
  resolve to these models and data (`load_config("tiny_llava_pretrain")` just works).
- `tiny_tokenizer`: the tiny LLM's tokenizer loaded the way training loads it (`load_tokenizer`). A
  byte-level BPE: decoding is lossless, so decoded ids can be compared with strings exactly.
- `real_tokenizer`: the Llama-style 32k SentencePiece model that ships inside the mistral-common wheel, as
  a `LlamaTokenizer` (BOS `<s>`=1, EOS `</s>`=2; no chat special tokens, so `<|im_start|>` etc. are split
  into ordinary pieces, as they would be for a Llama-2/Vicuna LLM).

Everything here is offline; HF_HUB_OFFLINE is set before transformers is imported by any test.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # huggingface_hub reads it once, at import
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny Llama + BPE tokenizer, tiny CLIP (336 px, 576 patches) + processor, and the example data."""
    from vlmtune.tiny import make_tiny

    paths = make_tiny(tmp_path_factory.mktemp("tiny"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLMTUNE_TINY_DIR", str(paths.root))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield paths


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny):
    """The tiny LLM's tokenizer, loaded through `vlmtune.model.build.load_tokenizer` (pad = unk)."""
    from vlmtune.model.build import load_tokenizer

    return load_tokenizer(str(tiny.llm))


def _sentencepiece_model() -> Path:
    """Path of the 32k Llama-style tokenizer.model inside the installed mistral-common wheel."""
    mistral_common = pytest.importorskip("mistral_common")
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        pytest.skip(f"mistral-common has no {path.name}")
    return path


@pytest.fixture(scope="session")
def real_tokenizer(tmp_path_factory):
    """A real 32k SentencePiece LlamaTokenizer (legacy=False: no extra space after special tokens)."""
    from transformers import LlamaTokenizer

    folder = tmp_path_factory.mktemp("real_tokenizer")
    shutil.copyfile(_sentencepiece_model(), folder / "tokenizer.model")
    return LlamaTokenizer.from_pretrained(str(folder), legacy=False)
