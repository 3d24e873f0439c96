"""The pipeline learns: pretrain -> finetune (full, LoRA) -> convert -> merge on the synthetic task of
`vlmtune make-tiny`, scored on held-out images through `vlmtune mmbench`, and every exported layout answers alike.

The task: a shape drawn on grey; "What colour is the shape?" with options A. red B. green C. blue D. yellow
(tiny.TASK_OPTIONS). Only the image tells the colour, so a bug anywhere between pixels and the score (a feature
spliced at the wrong place, labels shifted by one, an adapter not loaded, a converted folder missing a part)
leaves the model at chance.

Threshold: 48 held-out questions, 4 options, so chance is 0.25. Requiring >= 0.75 (36 of 48): a model that
guesses passes with probability P(Binomial(48, 0.25) >= 36) ~ 2e-12; a model that learned scores 1.0 in both
paths (measured on this machine: 48/48 for full and for LoRA finetunes of 3 epochs).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from convert.convert_helpers import LOGIT_ATOL, chat_generator

from vlmtune.cli import main as cli
from vlmtune.tiny import TASK_FREE_QUESTION, TASK_OPTIONS

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
THRESHOLD = 0.75


def train(config: str, work_dir: Path, *options: str) -> Path:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NPROC_PER_NODE", "NNODES")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    cmd = [sys.executable, "-m", "vlmtune", "train", config, "--work-dir", str(work_dir)]
    run = subprocess.run(cmd + (["--cfg-options", *options] if options else []), env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return sorted(work_dir.glob("iter_*.pth"), key=lambda p: int(p.stem.split("_")[1]))[-1]


def mmbench(tmp: Path, name: str, *model: str) -> tuple[float, dict[int, str]]:
    """(overall accuracy, {index: prediction}) of `vlmtune mmbench` on the held-out TSV."""
    tiny = Path(os.environ["VLMTUNE_TINY_DIR"])
    assert cli(["mmbench", *model, "--data-path", str(tiny / "task" / "heldout_mmbench.tsv"), "--work-dir",
                str(tmp / f"eval_{name}"), "--device", "cpu", "--torch-dtype", "float32"]) == 0
    (run,) = [p for p in (tmp / f"eval_{name}").iterdir() if p.is_dir()]
    accuracy = json.loads((run / "heldout_mmbench_acc.json").read_text())["accuracy"]
    predictions = {r["index"]: r["prediction"] for r in map(json.loads, (run / "predictions.jsonl").read_text().splitlines())}
    return accuracy, predictions


def overall(accuracy: list[dict]) -> float:
    """MMBench's headline number (the circular row; the TSV has no rotated copies, so it is plain accuracy)."""
    return next(float(r["Overall"]) for r in accuracy if r["eval"] == "circular")


@pytest.fixture(scope="module")
def pretrained(tiny, tmp_path_factory) -> Path:
    return train("tiny_llava_task_pretrain", tmp_path_factory.mktemp("learn") / "pretrain")


@pytest.fixture(scope="module", params=["full", "lora"])
def learned(request, pretrained, tiny, tmp_path_factory):
    """(variant, work folder, finetune checkpoint, xtuner folder, huggingface folder) of one finetune path."""
    variant, tmp = request.param, tmp_path_factory.mktemp(f"learn_{request.param}")
    pth = train(f"tiny_llava_task_finetune_{variant}", tmp / "finetune", f"pretrained_pth={pretrained}")
    assert cli(["convert", "pth_to_hf", str(pth), str(tmp / "xtuner")]) == 0
    assert cli(["convert", "pth_to_hf", str(pth), str(tmp / "hf"), "--save-format", "huggingface"]) == 0
    return variant, tmp, tmp / "xtuner", tmp / "hf"


def merged_model(tmp: Path, variant: str, xtuner: Path, tiny) -> list[str]:
    """The model args of the merged path: adapters merged into the LLM and CLIP, `--llava` with the projector."""
    if variant == "full":  # nothing to merge: the LLM and CLIP are stored whole
        return [str(xtuner), "--llava", str(xtuner)]
    assert cli(["convert", "merge", str(tiny.llm), str(xtuner / "llm_adapter"), str(tmp / "merged_llm")]) == 0
    assert cli(["convert", "merge", str(tiny.clip), str(xtuner / "visual_encoder_adapter"), str(tmp / "merged_clip"),
                "--is-clip"]) == 0
    projector_only = tmp / "projector_only"
    projector_only.mkdir(exist_ok=True)
    for name in ("projector", "vlmtune_config.py"):
        src = xtuner / name
        (projector_only / name).symlink_to(src, target_is_directory=src.is_dir())
    return [str(tmp / "merged_llm"), "--visual-encoder", str(tmp / "merged_clip"), "--llava", str(projector_only)]


def test_held_out_accuracy_is_far_above_chance_and_every_layout_agrees(learned, tiny):
    variant, tmp, xtuner, hf = learned
    llm = [str(xtuner)] if variant == "full" else [str(tiny.llm)]
    accuracy, through_xtuner = mmbench(tmp, "xtuner", *llm, "--llava", str(xtuner))
    print(f"\n{variant}: held-out accuracy {overall(accuracy):.3f} (chance 0.25)")
    assert overall(accuracy) >= THRESHOLD
    _, through_hf = mmbench(tmp, "hf", str(hf))
    _, through_merged = mmbench(tmp, "merged", *merged_model(tmp, variant, xtuner, tiny))
    assert through_hf == through_xtuner == through_merged


def test_answer_margins_exceed_the_rounding_between_layouts(learned, tiny):
    """Merged weights differ from adapters at float rounding, so equal letters mean something only when each
    answer's logit lead over the runner-up exceeds that rounding (LOGIT_ATOL, measured against float64)."""
    from vlmtune.eval.mmbench_data import decode_image, load_mmbench
    from vlmtune.eval.prompt import build_prompt

    variant, _, xtuner, _ = learned
    generator = chat_generator(str(xtuner) if variant == "full" else str(tiny.llm), "--llava", str(xtuner))
    letters = [generator.tokenizer.convert_tokens_to_ids(k) for k in TASK_OPTIONS]
    data = load_mmbench(Path(os.environ["VLMTUNE_TINY_DIR"]) / "task" / "heldout_mmbench.tsv")
    margins = []
    for question in data.questions:
        ids = generator.prompt_ids([(build_prompt(question), None)])
        inputs = generator.embed([ids], generator.encode_images([decode_image(question)]))
        with torch.no_grad():
            logits = generator.model.llm(**inputs).logits[0, -1]
        top2 = logits.topk(2).values
        margins.append(float(top2[0] - top2[1]))
        assert int(logits.argmax()) in letters
    print(f"\n{variant}: smallest answer margin {min(margins):.3g} (rounding bound {LOGIT_ATOL})")
    assert min(margins) > LOGIT_ATOL


def test_transformers_generate_gives_chat_s_greedy_tokens(learned, tiny):
    """LlavaForConditionalGeneration.generate with the exported processor and chat template = `vlmtune chat`."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlmtune.data.image import load_image

    variant, _, xtuner, hf = learned
    generator = chat_generator(str(xtuner) if variant == "full" else str(tiny.llm), "--llava", str(xtuner))
    model = LlavaForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(hf)
    images = sorted((Path(os.environ["VLMTUNE_TINY_DIR"]) / "task" / "images").glob("heldout_*.png"))[:4]
    for path in images:
        image = load_image(path)
        ids = generator.prompt_ids([(f"<image>\n{TASK_FREE_QUESTION}", None)])
        ours = generator.generate_embeds(generator.embed([ids], generator.encode_images([image])),
                                         max_new_tokens=6, do_sample=False)[0].tolist()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TASK_FREE_QUESTION}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=image, text=text, return_tensors="pt", add_special_tokens=False)
        inputs["pixel_values"] = generator.pixel_values([image])  # chat's own pixels (see test_pth_to_hf)
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert theirs[:len(ours)] == ours, path.name
