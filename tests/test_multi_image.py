"""Several images in one prompt, interleaved with text: vlmtune's placement, chat and the huggingface export
agree with transformers' own Llava.

The `projector` checkpoint (LLM and CLIP frozen, nothing merged) converted by `convert pth_to_hf
--save-format huggingface` runs in plain transformers with the exported processor and chat template; its
logits must equal vlmtune's at every position (max abs diff <= 1e-5) for a 2-image and a 3-image prompt, the
tags where the text puts them; `vlmtune chat --image a --image b` must give transformers' greedy tokens.
"""
from __future__ import annotations

import json

import pytest
import torch
from convert.convert_helpers import chat_generator, checkpoint, converted, error_line, truth  # noqa: F401

from vlmtune.cli import main as cli
from vlmtune.data.image import load_image
from vlmtune.data.llava_json import normalize_record

PHOTOS = ["chelsea.jpg", "coffee.jpg", "rocket.jpg"]
PROMPTS = {2: "Compare <image> with <image>: which is a drink?",
           3: "First <image>, then <image>, last <image>. Which one flies?"}


def photos(tiny, n: int):
    return [load_image(tiny.data / "images" / name) for name in PHOTOS[:n]]


def test_two_or_more_tags_in_a_turn_stay_where_they_are_one_moves_to_the_front():
    raw = {"image": ["a.jpg", "b.jpg", "c.jpg"], "conversations": [
        {"from": "human", "value": PROMPTS[2]}, {"from": "gpt", "value": "The second."},
        {"from": "human", "value": "And this one? <image>"}, {"from": "gpt", "value": "A rocket."}]}
    assert normalize_record(raw, 0).turns == [(PROMPTS[2], "The second."), ("<image>\nAnd this one?", "A rocket.")]


@pytest.mark.parametrize("n", [2, 3])
def test_interleaved_prompt_logits_equal_transformers_llava(n, converted, truth, tiny):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = converted("projector", "huggingface")
    model, cfg = truth("projector")
    generator = chat_generator(cfg.model.llm_name_or_path, "--llava", str(converted("projector", "xtuner")))
    generator.model = model
    images = photos(tiny, n)
    ids = generator.prompt_ids([(PROMPTS[n], None)])
    inputs = generator.embed([ids], generator.encode_images(images))
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    text = processor.apply_chat_template([{"role": "user", "content": PROMPTS[n]}], add_generation_prompt=True)
    hf_inputs = processor(images=images, text=text, return_tensors="pt", add_special_tokens=False)
    assert torch.equal(hf_inputs["pixel_values"], generator.pixel_values(images))
    with torch.no_grad():
        ours, theirs = model.llm(**inputs).logits[0], hf(**hf_inputs).logits[0]
        swapped = hf(**{**hf_inputs, "pixel_values": hf_inputs["pixel_values"].flip(0)}).logits[0]
    diff = (ours - theirs).abs().max().item()
    print(f"\n{n} images: max |logits ours - transformers Llava| = {diff:.3e} over {ours.shape[0]} positions")
    assert ours.shape == theirs.shape and diff <= 1e-5
    assert (swapped - theirs).abs().max() > 1e-2  # the images' order matters to the comparison


def test_chat_with_two_images_gives_transformers_greedy_tokens(converted, truth, tiny, tmp_path, capsys):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = converted("projector", "huggingface")
    images = [str(tiny.data / "images" / name) for name in PHOTOS[:2]]
    batch = tmp_path / "batch.jsonl"
    batch.write_text(json.dumps({"image": PHOTOS[:2], "prompt": PROMPTS[2]}) + "\n")
    for name in PHOTOS[:2]:
        (tmp_path / name).symlink_to(tiny.data / "images" / name)
    argv = ["chat", str(folder), "--max-new-tokens", "6", "--device", "cpu", "--torch-dtype", "float32"]
    assert cli([*argv, "--image", images[0], "--image", images[1], "--prompt", PROMPTS[2], "--no-streamer"]) == 0
    answer = capsys.readouterr().out.strip()
    assert cli([*argv, "--batch", str(batch)]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == answer  # --batch takes a list of images too
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    text = processor.apply_chat_template([{"role": "user", "content": PROMPTS[2]}], add_generation_prompt=True)
    hf_inputs = processor(images=photos(tiny, 2), text=text, return_tensors="pt", add_special_tokens=False)
    out = hf.generate(**hf_inputs, max_new_tokens=6, do_sample=False)
    decoded = processor.decode(out[0, hf_inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert decoded.strip() == answer


def test_a_tag_count_that_does_not_match_the_images_is_one_line(converted, tiny, capsys):
    folder = converted("projector", "huggingface")
    image = str(tiny.data / "images" / PHOTOS[0])
    assert cli(["chat", str(folder), "--image", image, "--prompt", PROMPTS[2], "--device", "cpu"]) == 2
    assert "2 <image> tag(s) for 1 image(s)" in error_line(capsys)
