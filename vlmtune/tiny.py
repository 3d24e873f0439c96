"""Tiny offline models: the one factory that tests, the quickstart and benchmarks use.

`make_tiny(root)` writes, in a few seconds and with no network:
    root/llm/          a tiny Llama (or Qwen2) causal LM + a BPE tokenizer with the chat special tokens
    root/clip/         a tiny CLIPVisionModel (336 px, patch 14 -> 576 patches) + its CLIPImageProcessor
    root/siglip/       a tiny SiglipVisionModel (384 px, patch 14 -> 729 patches, no CLS, a pooling head LLaVA
                       does not use) + its SiglipImageProcessor (mean/std 0.5, resized without a crop)
    root/data/         the bundled example dataset (real photos + LLaVA JSON)
    root/task/         a synthetic visual task the tiny models can learn in minutes: drawn shapes whose colour
                       only the image tells (train / held-out splits, an MMBench-format TSV of the held-out set)
Everything is loaded back by users' code path (`from_pretrained` of a folder). The tiny configs in configs/
point at `{{$VLMTUNE_TINY_DIR:./work_dirs/tiny}}`, so `vlmtune make-tiny` then `vlmtune train tiny_...` works.
"""
from __future__ import annotations

import base64
import io
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmtune.convert import keymaps
from vlmtune.weights import save_model_renamed

ASSETS = Path(__file__).resolve().parent / "assets" / "example"

# The tiny LLM's weight init std. transformers' default (0.02) gives a 64-wide model logits within ~+-1.3, which a
# frozen LM head can never sharpen: LoRA then gets the argmax right but the loss stays near ln(vocab). With 0.1 the
# LoRA finetune of the synthetic task trains as a pretrained LLM's would (loss 5.9 -> 1.6 in 144 steps).
INIT_RANGE = 0.1
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
    def siglip(self) -> Path:
        return self.root / "siglip"

    @property
    def pretrain_json(self) -> Path:
        return self.data / "pretrain.json"

    @property
    def finetune_json(self) -> Path:
        return self.data / "finetune.json"

    @property
    def task(self) -> Path:
        """The synthetic task (`make_task`): pretrain.json, finetune.json, heldout.json, heldout_mmbench.tsv,
        labels.json."""
        return self.root / "task"


def make_tiny(root: str | Path, arch: str = "llama", seed: int = 0) -> TinyPaths:
    """Build and save the tiny LLM + tokenizer, CLIP + processor, and example data under `root`."""
    root = Path(root)
    paths = TinyPaths(root=root, llm=root / ("llm" if arch == "llama" else f"llm_{arch}"), clip=root / "clip", data=root / "data")
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    save_tokenizer(tokenizer, paths.llm)
    make_llm(tokenizer, arch).save_pretrained(paths.llm)
    if not (paths.clip / "config.json").is_file():
        vision, processor = make_clip()
        # as hub CLIP checkpoints are stored: with transformers 4.x's `vision_model.` level (5.x reads both)
        save_model_renamed(vision, paths.clip, keymaps.CLIP_VISION_MODEL)
        processor.save_pretrained(paths.clip)
    if not (paths.siglip / "config.json").is_file():
        vision, processor = make_siglip()
        save_model_renamed(vision, paths.siglip, keymaps.CLIP_VISION_MODEL)  # the same 4.x `vision_model.` level
        processor.save_pretrained(paths.siglip)
    if not paths.data.is_dir():
        shutil.copytree(ASSETS, paths.data)
    if not (paths.task / "heldout_mmbench.tsv").is_file():
        make_task(paths.task)
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
    lines += [TASK_QUESTION, TASK_FREE_QUESTION, TASK_CAPTION_QUESTION, TASK_PAIR_QUESTION, *TASK_TEXT]
    lines += [_caption(c, s) for c in COLOURS for s in SHAPES] + [f"{c.capitalize()}." for c in COLOURS]
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


def save_tokenizer(tokenizer, folder: Path) -> None:
    """`save_pretrained`, with the tokenizer_config.json written as hub tokenizers have it (class
    PreTrainedTokenizerFast, `additional_special_tokens`), which transformers 4.x reads too; transformers 5
    writes its own class name (TokenizersBackend) and `extra_special_tokens`, which 4.x cannot load."""
    tokenizer.save_pretrained(folder)
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["additional_special_tokens"] = config.pop("extra_special_tokens", [])
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")


def make_llm(tokenizer, arch: str = "llama"):
    """A 2-layer, 64-wide causal LM with random weights (Llama or Qwen2 architecture)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        initializer_range=INIT_RANGE,
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


def make_siglip():
    """A 2-layer, 32-wide SiglipVisionModel at so400m-patch14-384 geometry (729 patches, no CLS token, with the
    pooling head a hub checkpoint has) and its image processor (bicubic resize to 384, mean = std = 0.5)."""
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(image_size=384, patch_size=14, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2)
    processor = SiglipImageProcessorPil(do_resize=True, size={"height": 384, "width": 384}, resample=3, do_rescale=True,
                                        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return SiglipVisionModel(config), processor


# ---- the synthetic task ---------------------------------------------------------------------------------

COLOURS = {"red": (215, 38, 38), "green": (34, 170, 60), "blue": (40, 80, 215), "yellow": (230, 205, 30)}
SHAPES = ("square", "circle", "triangle")
TASK_QUESTION = "What colour is the shape?"  # multiple choice: options A-D are the four colours, always in this order
# (a 2-layer, 64-wide LLM learns colour -> letter in a minute; matching the colour against options in a random
# order, which circular MMBench rotations ask for, takes it far longer than a quickstart: measured 3/21 held-out
# after 480 steps), so the TSV has no circular copies
TASK_FREE_QUESTION = "What colour is the shape in the picture?"  # answered with the colour word
TASK_CAPTION_QUESTION = "Describe the picture."  # pretraining captions
TASK_SIZES = {"train": 384, "heldout": 48}
TASK_PAIR_QUESTION = "First picture: <image>\nSecond picture: <image>\nWhat colour is the shape in the second picture?"
TASK_TEXT = ("Which colours can the shapes have?", "Red, green, blue or yellow.")  # a text-only turn
TASK_IMAGE_SIZE = 112  # pixels; the encoder's processor resizes to its own size
# (width, height) of anyres.json's images: AnyRes picks a different grid, so a different token count, for each
ANYRES_CANVASES = ((224, 112), (112, 224), (336, 112), (112, 336), (168, 112), (112, 112))


def _caption(colour: str, shape: str) -> str:
    return f"A {colour} {shape} on a grey background."


def draw_shape(rng: random.Random, canvas: tuple[int, int] = (TASK_IMAGE_SIZE, TASK_IMAGE_SIZE)):
    """(image, colour, shape): one filled shape at a random place and size on a random grey background of
    `canvas` (width, height) pixels."""
    from PIL import Image, ImageDraw

    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    grey = rng.randint(90, 170)
    width, height = canvas
    image = Image.new("RGB", canvas, (grey, grey, grey))
    size = rng.randint(min(canvas) // 3, min(canvas) // 2)
    x, y = rng.randint(0, width - size), rng.randint(0, height - size)
    draw, fill = ImageDraw.Draw(image), COLOURS[colour]
    if shape == "square":
        draw.rectangle((x, y, x + size, y + size), fill=fill)
    elif shape == "circle":
        draw.ellipse((x, y, x + size, y + size), fill=fill)
    else:
        draw.polygon([(x + size // 2, y), (x, y + size), (x + size, y + size)], fill=fill)
    return image, colour, shape


TASK_OPTIONS = dict(zip("ABCD", COLOURS))  # A. red  B. green  C. blue  D. yellow


def make_task(folder: str | Path, seed: int = 0) -> Path:
    """Write the synthetic task: images/, pretrain.json (captions), finetune.json (multiple-choice and free
    questions about the colour, which only the image gives), heldout.json and heldout_mmbench.tsv (the held-out
    images as MMBench rows), labels.json (each image's colour and shape), multi.json: a mix of two-image
    records (interleaved: which colour is the second shape?), one-image and text-only records, and anyres.json:
    finetune.json's questions on images of several aspect ratios (ANYRES_CANVASES)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    splits = {split: [(f"images/{split}_{i:04d}.png", *draw_shape(rng)) for i in range(n)] for split, n in TASK_SIZES.items()}
    for split, items in splits.items():
        for path, image, _, _ in items:
            image.save(folder / path)
    train = splits["train"]
    pretrain = [_record(f"cap{i}", path, TASK_CAPTION_QUESTION, _caption(c, s)) for i, (path, _, c, s) in enumerate(train)]
    finetune = [_task_record(f"ft{i}", path, colour, rng) for i, (path, _, colour, _) in enumerate(train)]
    heldout = [_task_record(f"ho{i}", path, colour, rng) for i, (path, _, colour, _) in enumerate(splits["heldout"])]
    for name, records in (("pretrain", pretrain), ("finetune", finetune), ("heldout", heldout)):
        (folder / f"{name}.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
    (folder / "multi.json").write_text(json.dumps(_mixed_records(train, finetune, rng), indent=1), encoding="utf-8")
    (folder / "anyres.json").write_text(json.dumps(_anyres_records(folder, rng), indent=1), encoding="utf-8")
    labels = {path: {"colour": colour, "shape": shape} for items in splits.values() for path, _, colour, shape in items}
    (folder / "labels.json").write_text(json.dumps(labels, indent=1), encoding="utf-8")
    _write_task_tsv(folder / "heldout_mmbench.tsv", splits["heldout"])
    return folder


def _mixed_records(train, finetune: list[dict], rng: random.Random, n: int = 96) -> list[dict]:
    """n records, a third each: two images interleaved with text, one image (from finetune.json), text only."""
    records = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            (first, *_), (second, _, colour, _) = rng.sample(train, 2)
            records.append({"id": f"pair{i}", "image": [first, second], "conversations": [
                {"from": "human", "value": TASK_PAIR_QUESTION}, {"from": "gpt", "value": f"{colour.capitalize()}."}]})
        elif kind == 1:
            records.append(dict(rng.choice(finetune), id=f"one{i}"))
        else:
            records.append({"id": f"text{i}", "conversations": [
                {"from": "human", "value": TASK_TEXT[0]}, {"from": "gpt", "value": TASK_TEXT[1]}]})
    return records


def _anyres_records(folder: Path, rng: random.Random, n: int = 96) -> list[dict]:
    """n task records (finetune.json's questions) on new images, drawn on each of ANYRES_CANVASES in turn."""
    records = []
    for i in range(n):
        path = f"images/anyres_{i:04d}.png"
        image, colour, _ = draw_shape(rng, ANYRES_CANVASES[i % len(ANYRES_CANVASES)])
        image.save(folder / path)
        records.append(_task_record(f"ar{i}", path, colour, rng))
    return records


def _record(record_id: str, image: str, question: str, answer: str) -> dict:
    return {"id": record_id, "image": image, "conversations": [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


def _task_record(record_id: str, image: str, colour: str, rng: random.Random) -> dict:
    """Every other record a multiple-choice question (the exact MMBench prompt, answered with the letter),
    else the free question (answered with the colour)."""
    from vlmtune.eval.prompt import mcq_prompt

    if rng.random() < 0.5:
        return _record(record_id, image, TASK_FREE_QUESTION, f"{colour.capitalize()}.")
    letter = next(k for k, v in TASK_OPTIONS.items() if v == colour)
    prompt = mcq_prompt(TASK_QUESTION, TASK_OPTIONS)
    return {"id": record_id, "image": image, "conversations": [
        {"from": "human", "value": prompt}, {"from": "gpt", "value": letter}]}


def _write_task_tsv(path: Path, items) -> None:
    """One MMBench row per held-out image (VLMEvalKit's columns; the image as base64 PNG)."""
    import pandas as pd

    rows = []
    for i, (_, image, colour, shape) in enumerate(items):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rows.append({"index": i, "question": TASK_QUESTION, "hint": None, **TASK_OPTIONS,
                     "answer": next(k for k, v in TASK_OPTIONS.items() if v == colour), "category": f"{shape}_colour",
                     "l2-category": "attribute_recognition", "split": "dev", "source": "vlmtune-task", "comment": None,
                     "image": base64.b64encode(buffer.getvalue()).decode()})
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
