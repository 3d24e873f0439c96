"""The eval runner on its own, with a small made-up client (no MMBench): sharding, batching, resume, the run folder.

The client asks the tiny model (real weights, random projector) about three real pictures, two or three
questions each, as a later benchmark would: Items with real prompt ids from the Generator, answered through
the real `generate_shared` path, compared with the Generator's own one-question `answer`.
"""
from __future__ import annotations

import functools
import json

import pytest
import torch
from PIL import Image
from skimage import data as skdata

from vlmtune.config import ModelConfig
from vlmtune.data.image import ImagePreprocessor
from vlmtune.data.templates import get_template
from vlmtune.eval.runner import (Item, PredictionStore, batches, gather_predictions, image_groups, open_run, run,
                                 shard)
from vlmtune.inference import Generator
from vlmtune.model.build import build_model, load_tokenizer
from vlmtune.model.vision import load_image_processor

PICTURES = {"astronaut": skdata.astronaut, "camera": skdata.camera, "coffee": skdata.coffee}
QUESTIONS = {  # different lengths, so groups and rows get sorted; a shared prefix per picture
    "astronaut": ["What is the person wearing?", "What is behind the person in this photograph?"],
    "camera": ["What is shown?", "Is it day or night?", "What is the man holding in his hands, and why?"],
    "coffee": ["What colour is the cup?"],
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def generator(tiny) -> Generator:
    torch.manual_seed(0)
    model = build_model(ModelConfig(str(tiny.llm), str(tiny.clip), torch_dtype="float32"), for_training=False)
    preprocess = ImagePreprocessor(load_image_processor(str(tiny.clip)), pad_to_square=True)
    return Generator(model.eval(), load_tokenizer(str(tiny.llm)), get_template("vicuna"), preprocess, model.image_length)


def picture(name: str) -> list[Image.Image]:
    return [Image.fromarray(PICTURES[name]()).convert("RGB").resize((64, 48))]


def client_items(generator, max_new_tokens=lambda k: 6) -> list[Item]:
    """The made-up benchmark: one item per (picture, question), ids 0, 1, ... in this order."""
    rows = [(name, q) for name, questions in QUESTIONS.items() for q in questions]
    return [Item(k, name, generator.prompt_ids([(f"<image>\n{q}", None)]), max_new_tokens(k),
                 functools.partial(picture, name)) for k, (name, q) in enumerate(rows)]


def one_at_a_time(generator, items: list[Item]) -> dict[int, str]:
    questions = [q for qs in QUESTIONS.values() for q in qs]
    return {it.id: generator.answer(questions[it.id], it.images()[0], max_new_tokens=it.max_new_tokens) for it in items}


def item(id: int, group: str, length: int) -> Item:
    return Item(id, group, [1] * length, 4, list)


# ---- pure: sharding and batching -----------------------------------------------------------------------------


def test_shard_deals_whole_groups_round_robin_in_order_of_first_appearance():
    items = [item(0, "a", 5), item(1, "b", 5), item(2, "a", 5), item(3, "c", 5), item(4, "d", 5), item(5, "b", 5)]
    parts = [[it.id for it in shard(items, rank, 2)] for rank in range(2)]
    assert parts == [[0, 2, 3], [1, 4, 5]]  # groups a, c -> rank 0; b, d -> rank 1; item order kept
    assert [it.id for it in shard(items, 0, 1)] == [0, 1, 2, 3, 4, 5]
    assert [[it.id for it in shard(items, rank, 8)] for rank in range(5)] == [[0, 2], [1, 5], [3], [4], []]


def test_image_groups_put_the_longest_rows_first():
    items = [item(0, "a", 3), item(1, "b", 9), item(2, "a", 7), item(3, "c", 1), item(4, "b", 2), item(5, "d", 7)]
    groups = [[it.id for it in g] for g in image_groups(items)]
    assert groups == [[1, 4], [2, 0], [5], [3]]  # by longest row (9, 7, 7, 1), ties in order; rows longest first


def test_batches_never_exceed_the_size_and_split_only_oversized_groups():
    groups = [[item(k, "g", 1) for k in range(n)] for n in (5, 2, 2, 1)]
    sizes = [[len(g) for g in b] for b in batches(groups, 4)]
    assert sizes == [[4], [1, 2], [2, 1]]
    assert sum(sum(s) for s in sizes) == 10 and all(sum(s) <= 4 for s in sizes)


# ---- with the tiny model -------------------------------------------------------------------------------------


def test_run_answers_every_item_as_one_at_a_time_and_hands_them_to_finish(generator, tmp_path):
    items = client_items(generator, max_new_tokens=lambda k: 2 if k % 2 else 6)  # a batch mixes two budgets
    reference = one_at_a_time(generator, items)
    assert len(set(reference.values())) > 1  # the tiny model does answer differently per question
    for batch_size in (1, 2, 6):
        run_dir = tmp_path / f"bs{batch_size}"
        run_dir.mkdir()
        finished = run(generator, items, run_dir, batch_size, lambda predictions: dict(predictions))
        assert finished == reference, f"batch size {batch_size}"
        assert gather_predictions(run_dir) == reference
        assert [p.name for p in run_dir.iterdir()] == ["predictions.jsonl"]  # the runner writes only its log


def test_a_rerun_generates_only_the_missing_items(generator, tmp_path, capsys):
    items = client_items(generator)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with PredictionStore(run_dir / "predictions.jsonl") as store:  # a run killed after two rows
        store.add(4, "kept four")
        store.add(0, "kept zero")
    seen: list[int] = []
    hook = generator.model.visual_encoder.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    try:
        finished = run(generator, items, run_dir, 8, lambda predictions: predictions)
    finally:
        hook.remove()
    assert finished[0] == "kept zero" and finished[4] == "kept four" and sorted(finished) == list(range(6))
    assert finished == {**one_at_a_time(generator, items), 0: "kept zero", 4: "kept four"}
    assert len((run_dir / "predictions.jsonl").read_text().splitlines()) == 6  # each item answered once
    assert seen == [3]  # one batch, each picture encoded once, for the 4 missing rows
    assert f"resuming {run_dir}: 2 of 6 rows already predicted" in capsys.readouterr().out


def test_open_run_resumes_the_unfinished_run_with_the_same_generation_arguments(tmp_path, capsys):
    generation = {"model": "tiny", "max_new_tokens": 6}
    first = open_run(tmp_path, generation, {"model": "tiny", "batch_size": 2}, "*_done.txt", "Made-up")
    assert f"Made-up run folder: {first}" in capsys.readouterr().out
    assert json.loads((first / "args.json").read_text()) == {"model": "tiny", "batch_size": 2, "world_size": 1,
                                                              "generation": generation}
    assert open_run(tmp_path, generation, {"batch_size": 8}, "*_done.txt", "Made-up") == first  # resumed
    assert json.loads((first / "args.json").read_text())["batch_size"] == 2  # the first run's record stays
    other = open_run(tmp_path, {**generation, "max_new_tokens": 3}, {}, "*_done.txt", "Made-up")
    assert other != first
    (first / "scores_done.txt").touch()
    assert open_run(tmp_path, generation, {}, "*_done.txt", "Made-up") not in (first, other)
