"""`Generator.generate_shared` on the tiny models: prompts sharing an image and a prefix (MMBench's circular
rotations) must give exactly the ids, and to float rounding the logits, of running each prompt alone, while CLIP
sees each image once and the LLM runs each shared prefix once.

A random tiny model answers gibberish, which is fine: the checks compare the two paths with each other.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from skimage import data as skdata

from vlmtune.config import ModelConfig
from vlmtune.constants import IMAGE_TOKEN_INDEX
from vlmtune.data.image import ImagePreprocessor
from vlmtune.data.templates import get_template
from vlmtune.inference import Generator, Group, shared_prefix_length
from vlmtune.model.build import build_model, load_tokenizer
from vlmtune.model.vision import load_image_processor

MAX_NEW = 8
LOGIT_ATOL = 1e-4  # float32; the two paths differ only in how the attention sums are grouped


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def generator(tiny) -> Generator:
    """Tiny Llama + tiny CLIP + a seeded random projector, Vicuna template, images padded to square."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(str(tiny.llm), str(tiny.clip), torch_dtype="float32"), for_training=False)
    preprocess = ImagePreprocessor(load_image_processor(str(tiny.clip)), pad_to_square=True)
    return Generator(model.eval(), load_tokenizer(str(tiny.llm)), get_template("vicuna"), preprocess, 576)


def rotated_prompts(generator: Generator, question: str, options: list[str], copies: int) -> list[list[int]]:
    """Prompt ids of `copies` circular rotations of a multiple-choice question (as eval/prompt.py lays them out)."""
    prompts = []
    for k in range(copies):
        rotated = options[k:] + options[:k]
        text = "<image>\n" + question + "".join(f"\n{letter}. {o}" for letter, o in zip("ABCD", rotated))
        prompts.append(generator.prompt_ids([(text + "\nAnswer with the option's letter.", None)]))
    return prompts


@pytest.fixture(scope="module")
def groups(generator) -> list[Group]:
    """Three groups of 3, 1 and 2 prompts: prefixes and suffixes of different lengths, so both get padding."""
    pictures = [Image.fromarray(a).convert("RGB") for a in (skdata.astronaut(), skdata.coffee(), skdata.chelsea())]
    return [
        ([pictures[0]], rotated_prompts(generator, "Hint: a portrait.\nWho is shown here?",
                                        ["an astronaut", "a cook", "a dog"], 3)),
        ([pictures[1]], rotated_prompts(generator, "What is in the cup?", ["coffee", "tea"], 1)),
        ([pictures[2]], rotated_prompts(generator, "Which animal?", ["a cat with long whiskers", "a cow"], 2)),
    ]


def test_shared_prefix_length_stops_before_the_first_difference_and_the_last_id():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5, 4]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # one id is left to run for each prompt
    assert shared_prefix_length([[7, 8, 9]]) == 2
    with pytest.raises(ValueError, match="image slot"):
        shared_prefix_length([[1, 2, IMAGE_TOKEN_INDEX], [1, 3, IMAGE_TOKEN_INDEX]])


def test_shared_prefix_ids_equal_each_prompt_alone(generator, groups):
    shared = generator.generate_shared(groups, max_new_tokens=MAX_NEW, do_sample=False)
    alone = [[generator.generate_ids([p], [images], max_new_tokens=MAX_NEW, do_sample=False)[0] for p in prompts]
             for images, prompts in groups]
    print(f"\nshared-prefix answers: {[[generator.decode(ids) for ids in g] for g in shared]}")
    assert shared == alone
    assert len({tuple(ids) for g in alone for ids in g}) > 1  # the tiny model does answer differently


def test_shared_prefix_logits_match_each_prompt_alone(generator, groups):
    inputs, cache = generator.shared_inputs(groups)
    held = cache.get_seq_length()  # Lp: the longest prefix, in LLM positions
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, held:]  # what generate derives from the mask
    with torch.inference_mode():
        shared = generator.model.llm(inputs_embeds=inputs["inputs_embeds"][:, held:], attention_mask=mask,
                                     position_ids=positions, cache=cache).logits[:, -1]
        alone = torch.stack([
            generator.model.llm(**generator.embed([p], generator.encode_images(images))).logits[0, -1]
            for images, prompts in groups for p in prompts
        ])
    diff = (shared - alone).abs().max().item()
    print(f"\nshared prefix of {held} positions; max |last logits shared - alone| = {diff:.2e}")
    assert held > generator.image_length and diff < LOGIT_ATOL


def test_each_image_encoded_and_each_prefix_run_once(generator, groups):
    seen_images: list[int] = []  # images per pass through CLIP
    run_lengths: list[tuple[int, int]] = []  # (rows, positions) of every pass through the LLM's first layer
    layer = next(m for name, m in generator.model.llm.named_modules() if name.endswith("layers.0"))
    hooks = [
        generator.model.visual_encoder.register_forward_pre_hook(lambda m, args: seen_images.append(len(args[0]))),
        layer.register_forward_pre_hook(lambda m, args, kwargs: run_lengths.append(
            tuple((args[0] if args else kwargs["hidden_states"]).shape[:2])), with_kwargs=True),
    ]
    try:
        generator.generate_shared(groups, max_new_tokens=2, do_sample=False)
    finally:
        for hook in hooks:
            hook.remove()
    prompts = sum(len(p) for _, p in groups)
    prefills = [n for rows, n in run_lengths if n > generator.image_length]
    assert seen_images == [len(groups)]  # one CLIP pass over one image per group
    assert len(prefills) == len(groups) and all(rows == 1 for rows, n in run_lengths[: len(groups)])
    assert run_lengths[len(groups)][0] == prompts  # then every prompt's suffix in one batch
    assert run_lengths[len(groups)][1] < 40 and len(run_lengths) == len(groups) + 2  # + one decode step


def test_a_remote_code_llm_runs_every_prompt_whole_with_the_same_ids(generator, groups):
    """A remote-code LLM (loading marks it `transformers_llm=False`) takes generate_ids' plain path."""
    assert generator.model.transformers_llm  # build_model's mark for a transformers LLM
    seen_images: list[int] = []
    hook = generator.model.visual_encoder.register_forward_pre_hook(lambda m, args: seen_images.append(len(args[0])))
    generator.model.transformers_llm = False
    try:
        got = generator.generate_shared(groups, max_new_tokens=3, do_sample=False)
    finally:
        generator.model.transformers_llm = True
        hook.remove()
    assert seen_images == [sum(len(p) for _, p in groups)]  # each prompt's image encoded for it
    assert got == generator.generate_shared(groups, max_new_tokens=3, do_sample=False)
