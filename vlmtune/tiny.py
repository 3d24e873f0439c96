"""Tiny offline models: the one factory that tests, the quickstart and benchmarks use.

`make_tiny(root)` writes, in a few seconds and with no network:
    root/llm/          a tiny Llama (or Qwen2) causal LM + a BPE tokenizer with the chat special tokens
    root/clip/         a tiny CLIPVisionModel (336 px, patch 14 -> 576 patches) + its CLIPImageProcessor
    root/data/         the bundled example dataset (real photos + LLaVA JSON)
Everything is loaded back by users' code path (`from_pretrained` of a folder). The tiny configs in configs/
point at `{{$VLMTUNE_TINY_DIR:./work_dirs/tiny}}`, so `vlmtune make-tiny` then `vlmtune train tiny_...` works.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent / "assets" / "example"

SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>", "<image>",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
]


@dataclass
class TinyPaths:
    """Where `make_tiny` put each part."""

    root: Path
    llm: Path
    clip: Path
    data: Path

    @property
    def pretrain_json(self) -> Path:
        return self.data / "pretrain.json"

    @property
    def finetune_json(self) -> Path:
        return self.data / "finetune.json"


def make_tiny(root: str | Path, arch: str = "llama", seed: int = 0) -> TinyPaths:
    """Build and save the tiny LLM + tokenizer, CLIP + processor, and example data under `root`."""
    root = Path(root)
    paths = TinyPaths(root=root, llm=root / ("llm" if arch == "llama" else f"llm_{arch}"), clip=root / "clip", data=root / "data")
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(paths.llm)
    make_llm(tokenizer, arch).save_pretrained(paths.llm)
    if not (paths.clip / "config.json").is_file():
        vision, processor = make_clip()
        vision.save_pretrained(paths.clip)
        processor.save_pretrained(paths.clip)
    if not paths.data.is_dir():
        shutil.copytree(ASSETS, paths.data)
    return paths


def _corpus() -> list[str]:
    """Training text for the tiny BPE: the example conversations, template words, and some plain English."""
    lines = [
        "USER: ASSISTANT: system user assistant A chat between a curious user and an artificial intelligence",
        "Answer with the option's letter from the given choices directly. 请直接回答选项字母。",
        "A. B. C. D. The answer is A. Hint: Question: Options: yes no red blue green cat dog photo image",
        "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 a e i o u",
    ]
    for name in ("pretrain.json", "finetune.json"):
        for record in json.loads((ASSETS / name).read_text(encoding="utf-8")):
            lines += [m["value"] for m in record["conversations"]]
    return lines


def make_tokenizer():
    """A byte-level BPE (any text encodes) wrapped as a PreTrainedTokenizerFast with BOS/EOS like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus() * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<unk>", "<s>", "</s>")],
        model_max_length=4096,
    )


def make_llm(tokenizer, arch: str = "llama"):
    """A 2-layer, 64-wide causal LM with random weights (Llama or Qwen2 architecture)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](**common)
    return AutoModelForCausalLM.from_config(config)


def make_clip():
    """A 2-layer, 32-wide CLIPVisionModel at CLIP-L/336 geometry (576 patches) and its image processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    config = CLIPVisionConfig(
        image_size=336, patch_size=14, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, projection_dim=32,
    )
    processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": 336}, resample=3, do_center_crop=True,
        crop_size={"height": 336, "width": 336}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_convert_rgb=True,
    )
    return CLIPVisionModel(config), processor
