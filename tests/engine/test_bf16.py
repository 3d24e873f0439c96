"""bf16 without a GPU (issue 17): DeepSpeed's bf16 mode on 2 CPU ranks, for the pretrain and a LoRA finetune,
and a bf16 huggingface export read back by transformers.

bf16 keeps 8 bits of mantissa, so a bf16 run is compared with the fp32 run of the same seed and data by its
losses (relative 2e-2 per step), not bit for bit; the loss itself is computed in fp32 (LlavaModel.forward casts
the logits) and the trained weights are stored in bf16.
"""
from __future__ import annotations

import pytest
import torch
from test_train import assert_ok, records, run_train, two_ranks, weights

from vlmtune.cli import main as cli

pytestmark = pytest.mark.e2e
OPTIONS = dict(max_steps=3, save_steps=3, save_total_limit=0, warmup_ratio=0.0, logging_interval=1,
               evaluation_freq=1000, group_by_length=False)
RECIPES = {"pretrain": "tiny_llava_task_pretrain", "lora": "tiny_llava_task_finetune_lora"}
LOSS_RTOL = 2e-2


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny):
    """run(recipe, dtype) -> work dir of a 3-step 2-rank ZeRO-2 run in that torch_dtype, each run once."""
    root, done = tmp_path_factory.mktemp("bf16"), {}

    def run(recipe: str, dtype: str):
        if (recipe, dtype) not in done:
            work_dir = root / f"{recipe}-{dtype}"
            assert_ok(run_train(RECIPES[recipe], work_dir, dict(OPTIONS, torch_dtype=dtype), **two_ranks()))
            done[recipe, dtype] = work_dir
        return done[recipe, dtype]

    return run


@pytest.mark.parametrize("recipe", [pytest.param("pretrain", marks=pytest.mark.slow), "lora"])  # CI time: LoRA only
def test_deepspeed_bf16_on_cpu_ranks_trains_like_fp32(runs, recipe):
    bf16, fp32 = records(runs(recipe, "bfloat16")), records(runs(recipe, "float32"))
    for step in (1, 2, 3):
        assert bf16[step]["loss"] == pytest.approx(fp32[step]["loss"], rel=LOSS_RTOL), step
    assert bf16[3]["loss"] != fp32[3]["loss"]  # it really ran in bf16
    trained = weights(runs(recipe, "bfloat16"), 3)
    assert trained and all(t.dtype == torch.bfloat16 for t in trained.values())


def test_a_bf16_huggingface_export_loads_back_in_transformers(runs, tiny, tmp_path):
    """The bf16 LoRA checkpoint exported with --save-format huggingface: transformers' Llava loads it in bf16 with
    every key placed, and its logits on the export's own processor inputs are those of vlmtune's bf16 model."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlmtune.cli import build_parser
    from vlmtune.constants import DEFAULT_IMAGE_TOKEN
    from vlmtune.loading import load_generator

    pth = runs("lora", "bfloat16") / "iter_3.pth"
    assert cli(["convert", "pth_to_hf", str(pth), str(tmp_path / "hf"), "--save-format", "huggingface"]) == 0
    model, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16,
                                                                output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.dtype == torch.bfloat16
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    image = Image.open(tiny.task / "images" / "heldout_0000.png").convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt", add_special_tokens=False)
    args = build_parser().parse_args(["chat", str(tmp_path / "hf"), "--torch-dtype", "bfloat16", "--device", "cpu"])
    generator = load_generator(args)
    assert next(generator.model.llm.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        theirs = model(**inputs).logits[0].float()
        ids = generator.prompt_ids([(f"{DEFAULT_IMAGE_TOKEN}\nWhat colour is the shape?", None)])
        ours = generator.model.llm(**generator.embed([ids], generator.encode_images([image]))).logits[0].float()
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    print(f"\nbf16 export vs vlmtune bf16: max |logits diff| {diff:.2e} (logits up to {theirs.abs().max():.2f})")
    assert diff <= 1e-2 * theirs.abs().max()
