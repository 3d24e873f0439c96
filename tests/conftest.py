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


@pytest.fixture(scope="session")
def tiny_model_config(tiny):
    """`make(**overrides) -> ModelConfig` for the tiny LLM + CLIP in fp32, without gradient checkpointing
    (pretrain-style defaults: LLM and CLIP frozen, no LoRA; override any ModelConfig field)."""
    from vlmtune.config import ModelConfig

    def make(**overrides) -> ModelConfig:
        values = dict(
            llm_name_or_path=str(tiny.llm), visual_encoder_name_or_path=str(tiny.clip),
            torch_dtype="float32", use_gradient_checkpointing=False,
        )
        return ModelConfig(**{**values, **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_batch(tiny, tiny_tokenizer):
    """A collated internlm2_chat batch of real photos: samples with 1, 0 and 2 images (3 images in all),
    right-padded, as the training loader gives it (`input_ids`, `labels`, `attention_mask`,
    `pixel_values` [3, 3, 336, 336] padded to square, ...)."""
    import torch

    from vlmtune.data.collate import collate
    from vlmtune.data.image import ImagePreprocessor, load_image
    from vlmtune.data.templates import get_template
    from vlmtune.data.tokenize import tokenize_conversation
    from vlmtune.model.vision import load_image_processor

    preprocess = ImagePreprocessor(load_image_processor(str(tiny.clip)), pad_to_square=True)
    template = get_template("internlm2_chat")
    conversations = [
        (["chelsea.jpg"], [("<image>\nWhat is in the image?", "A cat.")]),
        ([], [("Say hi.", "Hi there."), ("Again?", "Hi.")]),
        (["coffee.jpg", "rocket.jpg"], [("<image>\n<image>\nCompare them.", "A cup and a rocket.")]),
    ]
    samples = []
    for i, (images, turns) in enumerate(conversations):
        tok = tokenize_conversation(turns, tiny_tokenizer, template, 4096, 576)
        loaded = [load_image(tiny.data / "images" / name) for name in images]
        pixels = [preprocess(im) for im in loaded]
        samples.append({
            "id": str(i), "input_ids": torch.tensor(tok.input_ids), "labels": torch.tensor(tok.labels),
            "pixel_values": torch.stack(pixels) if pixels else torch.zeros(0, 3, 336, 336),
            "image_sizes": torch.tensor([(im.height, im.width) for im in loaded], dtype=torch.long).reshape(-1, 2),
        })
    return collate(samples, pad_token_id=tiny_tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): the tiny
    models gain nothing from more, and on a busy machine threads that wait for each other at every small op make
    the runs many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
