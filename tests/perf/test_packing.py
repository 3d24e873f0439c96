"""Multimodal packing: a packed row trains exactly like the same samples unpacked.

The model (tiny Llama + CLIP + projector, everything trainable, fp32) sees four real samples, image and
text-only mixed (1, 0, 2, 0 images), once as a right-padded batch and once as one packed sequence
(`collate_packed` + `segment_ids`): the summed loss, the target count and every gradient must agree. Then the
pieces: position ids restart per sample after image expansion, a sample's logits ignore its neighbours, the
packer covers every sample once within the budget, and the sampler splits packs over ranks and resumes.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmtune.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vlmtune.data.collate import collate, collate_packed
from vlmtune.data.image import ImagePreprocessor, load_image
from vlmtune.data.sampler import PackedBatchSampler, pack_by_length
from vlmtune.data.templates import get_template
from vlmtune.data.tokenize import tokenize_conversation
from vlmtune.model.build import build_model
from vlmtune.model.vision import load_image_processor
from vlmtune.model.llava import splice_image_features

CONVERSATIONS = [
    (["chelsea.jpg"], [("<image>\nWhat is in the image?", "A cat.")]),
    ([], [("Say hi.", "Hi there."), ("Again?", "Hi.")]),
    (["coffee.jpg", "rocket.jpg"], [("<image>\n<image>\nCompare them.", "A cup and a rocket.")]),
    ([], [("Count to three.", "One, two, three.")]),
]


@pytest.fixture(scope="module")
def samples(tiny, tiny_tokenizer):
    """Dataset samples as LlavaDataset gives them; sample 3's first label is made a real target, so a
    packed row would predict it from sample 2's last token unless the collate masks it."""
    preprocess = ImagePreprocessor(load_image_processor(str(tiny.clip)), pad_to_square=True)
    template = get_template("vicuna")
    out = []
    for i, (images, turns) in enumerate(CONVERSATIONS):
        tok = tokenize_conversation(turns, tiny_tokenizer, template, 4096, 576)
        loaded = [load_image(tiny.data / "images" / name) for name in images]
        pixels = [preprocess(im) for im in loaded]
        labels = torch.tensor(tok.labels)
        if i == 3:
            labels[0] = tok.input_ids[0]
        out.append({"id": str(i), "input_ids": torch.tensor(tok.input_ids), "labels": labels,
                    "pixel_values": torch.stack(pixels) if pixels else torch.zeros(0, 3, 336, 336),
                    "image_sizes": torch.tensor([(im.height, im.width) for im in loaded]).reshape(-1, 2)})
    return out


@pytest.fixture(scope="module")
def model(tiny_model_config):
    torch.manual_seed(0)
    cfg = tiny_model_config(freeze_llm=False, freeze_visual_encoder=False)
    return build_model(cfg, for_training=False).train()


def loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, int, dict]:
    model.zero_grad(set_to_none=True)
    keys = ("input_ids", "attention_mask", "labels", "pixel_values", "segment_ids")
    loss_sum, n_targets = model(**{k: batch[k] for k in keys if k in batch})
    loss_sum.backward()
    return loss_sum.detach(), int(n_targets), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_unpacked(tiny_model_config, samples, tiny_tokenizer, attention):
    torch.manual_seed(0)  # the model is built through the config key, as `vlmtune train` builds it
    cfg = tiny_model_config(freeze_llm=False, freeze_visual_encoder=False, attn_implementation=attention)
    model = build_model(cfg, for_training=False).train()
    assert model.llm.config._attn_implementation == attention
    unpacked = loss_and_grads(model, collate(samples, tiny_tokenizer.pad_token_id))
    packed_batch = collate_packed(samples, tiny_tokenizer.pad_token_id)
    packed = loss_and_grads(model, packed_batch)
    assert packed_batch["input_ids"].shape[0] == 1 and len(packed_batch["pixel_values"]) == 3
    assert packed[1] == unpacked[1] > 20  # same targets: the boundary label of sample 3 is not one
    torch.testing.assert_close(packed[0], unpacked[0], rtol=1e-5, atol=1e-4)
    assert unpacked[2].keys() == packed[2].keys() and any(k.startswith("visual_encoder.") for k in packed[2])
    for name, grad in unpacked[2].items():  # float32 sums in another order: error relative to the tensor's scale
        atol = max(1e-6, 1e-5 * float(grad.abs().max()))
        torch.testing.assert_close(packed[2][name], grad, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")


def test_a_sample_does_not_see_its_neighbours(model, samples, tiny_tokenizer):
    """Changing sample 0's text changes its own logits but not those of the sample packed after it."""
    def logits(batch):
        with torch.no_grad():
            inputs = model.prepare_inputs(batch["input_ids"], batch["attention_mask"], None, batch["pixel_values"],
                                          segment_ids=batch["segment_ids"])
            return model.llm(inputs_embeds=inputs["inputs_embeds"], position_ids=inputs["position_ids"], use_cache=False).logits[0]

    first, second = samples[0], samples[1]
    changed = dict(first, input_ids=first["input_ids"].clone())
    changed["input_ids"][-3:] = torch.tensor([30, 31, 32])
    a = logits(collate_packed([first, second], tiny_tokenizer.pad_token_id))
    b = logits(collate_packed([changed, second], tiny_tokenizer.pad_token_id))
    n0 = len(first["input_ids"]) + 575  # sample 0 after expanding its one image
    assert (a[:n0] - b[:n0]).abs().max() > 1e-3
    torch.testing.assert_close(a[n0:], b[n0:], rtol=0, atol=1e-6)


def test_flex_attention_packs_like_sdpa(tiny_model_config, samples, tiny_tokenizer):
    """`attn_implementation='flex_attention'` (block-sparse on GPUs) keeps each packed sample to itself too:
    same logits as sdpa's block mask. Forward only: flex attention has no backward on CPU."""
    batch = collate_packed(samples, tiny_tokenizer.pad_token_id)
    logits = {}
    for attention in ("sdpa", "flex_attention"):
        torch.manual_seed(0)  # the same projector for both
        model = build_model(tiny_model_config(attn_implementation=attention), for_training=False).eval()
        with torch.no_grad():
            inputs = model.prepare_inputs(batch["input_ids"], batch["attention_mask"], None, batch["pixel_values"],
                                          segment_ids=batch["segment_ids"])
            logits[attention] = model.llm(inputs_embeds=inputs["inputs_embeds"], position_ids=inputs["position_ids"],
                                          use_cache=False).logits[0]
    torch.testing.assert_close(logits["flex_attention"], logits["sdpa"], rtol=1e-4, atol=1e-4)


def test_positions_restart_per_sample_after_image_expansion():
    # row: sample 0 = [t, IMG, t] (P=3 -> 5 rows), sample 1 = [t, t], sample 2 = [IMG, t] (4 rows)
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 2, 3, 4, IMAGE_TOKEN_INDEX, 5]])
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, 2]])
    features = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    out = splice_image_features(torch.zeros(1, 7, 2), ids, torch.ones_like(ids), ids.clone(), features, segment_ids=segments)
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3]]
    assert out["inputs_embeds"].shape == (1, 11, 2) and out["attention_mask"].all()


def test_collate_packed_concatenates_masks_first_labels_and_numbers_samples(samples):
    batch = collate_packed(samples[:3], pad_token_id=0)
    lengths = [len(s["input_ids"]) for s in samples[:3]]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["segment_ids"].shape == (1, sum(lengths))
    assert batch["attention_mask"].all()
    starts = np.cumsum([0, *lengths[:-1]])
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts)
    assert batch["segment_ids"][0].tolist() == [i for i, n in enumerate(lengths) for _ in range(n)]
    # images in sample order, as the splice consumes them
    want = torch.cat([s["pixel_values"] for s in samples[:3]])
    assert torch.equal(batch["pixel_values"], want) and batch["ids"] == ["0", "1", "2"]


def mix_lengths(n: int, seed: int = 0) -> np.ndarray:
    """LLaVA-665K-like modality lengths: 94 % image samples of ~850 tokens (576 of them the image), 6 % text-only."""
    rng = np.random.default_rng(seed)
    image = rng.random(n) > 0.06
    lengths = np.where(image, 596 + rng.gamma(4, 70, n).astype(int), 20 + rng.gamma(1.5, 300, n).astype(int))
    lengths = np.minimum(lengths, 2048)
    return np.where(image, lengths, -lengths)


def test_pack_by_length_covers_every_sample_once_within_the_budget():
    lengths = np.abs(mix_lengths(6000))
    packs = pack_by_length(lengths, 8192, np.random.default_rng(0), pool=2000)
    flat = np.concatenate(packs)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert max(lengths[p].sum() for p in packs) <= 8192
    fill = lengths.sum() / (len(packs) * 8192)
    assert fill > 0.97, fill
    with pytest.raises(ValueError, match="longer than"):
        pack_by_length(np.array([10, 9000]), 8192, np.random.default_rng(0))


def test_packed_sampler_splits_ranks_reshuffles_epochs_and_resumes():
    lengths = mix_lengths(3000)
    ranks = [PackedBatchSampler(lengths, 4096, world_size=2, rank=r, seed=7) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(ranks[0].packs) // 2
    steps = [list(s) for s in ranks]
    seen = [i for r in steps for pack in r for i in pack]
    assert set(seen) == set(range(3000)) and len(seen) - 3000 <= 1  # one repeated pack at most pads the ranks
    assert all(np.abs(lengths[p]).sum() <= 4096 for r in steps for p in r)
    assert not set(steps[0][0]) & set(steps[1][0])
    # same seed -> same packs and order; a new epoch deals the same packs in another order
    again = PackedBatchSampler(lengths, 4096, world_size=2, rank=0, seed=7)
    assert list(again) == steps[0]
    for s in (again, ranks[1]):
        s.set_epoch(1)
    epoch1 = list(again)
    both = sorted(map(tuple, epoch1 + list(ranks[1])))
    assert epoch1 != steps[0] and both == sorted(map(tuple, steps[0] + steps[1]))
    # resume in the middle of epoch 1
    resumed = PackedBatchSampler(lengths, 4096, world_size=2, rank=0, seed=7)
    resumed.load_state_dict({"epoch": 1, "start": 5})
    assert list(resumed) == epoch1[5:]


def test_training_path_with_pack_to_max_length(tiny, tiny_tokenizer, model, tmp_path):
    """The config key takes train.py's loader to packed rows that the model trains on, every sample once."""
    import functools

    from vlmtune.config import load_config
    from vlmtune.data.dataset import build_dataset
    from vlmtune.distributed import DistInfo
    from vlmtune.train import _batching

    cfg = load_config("tiny_llava_finetune_lora", {"pack_to_max_length": True, "max_packed_length": 2048})
    preprocess = ImagePreprocessor(load_image_processor(str(tiny.clip)), True, cfg.data.image_preprocess)
    dataset, report = build_dataset(cfg.data, tiny_tokenizer, preprocess, 576, tmp_path)
    assert not report.lazy and dataset.row_tokenizer is None  # packing tokenizes up front: exact lengths
    sampler, collate_fn = _batching(cfg, dataset, DistInfo(0, 1, 0, torch.device("cpu")))
    assert isinstance(sampler, PackedBatchSampler) and collate_fn is collate_packed
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                         collate_fn=functools.partial(collate_fn, pad_token_id=tiny_tokenizer.pad_token_id))
    batches = list(loader)
    ids = [i for b in batches for i in b["ids"]]
    assert len(ids) == len(set(ids)) == len(dataset)
    assert len(batches) < len(dataset) and all(b["input_ids"].shape[0] == 1 for b in batches)
    batch = max(batches, key=lambda b: len(b["ids"]))
    loss_sum, n_targets = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values", "segment_ids")})
    assert torch.isfinite(loss_sum) and n_targets > 0
    with pytest.raises(Exception, match="below max_length"):
        _batching(load_config("tiny_llava_finetune_lora", {"pack_to_max_length": True, "max_packed_length": 512}),
                  dataset, DistInfo(0, 1, 0, torch.device("cpu")))
