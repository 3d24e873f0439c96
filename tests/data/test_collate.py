"""Batching: right padding, attention mask, and the batch's images in the order the splice consumes them."""
from __future__ import annotations

import torch

from vlmtune.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vlmtune.data.collate import collate

PAD = 0


def sample(name, ids, labels, images=()):
    """A dataset sample; each image is a [3, 4, 4] tensor filled with its own marker value."""
    pixels = torch.stack([torch.full((3, 4, 4), float(v)) for v in images]) if images else torch.zeros(0, 3, 4, 4)
    return {"id": name, "input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixels,
            "image_sizes": torch.tensor([[4, 4]] * len(images), dtype=torch.long).reshape(-1, 2)}


def test_right_padding_mask_and_labels():
    batch = collate(
        [sample("a", [1, 5, 6], [-100, 5, 6]), sample("b", [1, 7, 8, 9, 10], [-100, -100, 8, 9, 10]), sample("c", [1], [-100])],
        pad_token_id=PAD,
    )
    assert batch["input_ids"].tolist() == [[1, 5, 6, PAD, PAD], [1, 7, 8, 9, 10], [1, PAD, PAD, PAD, PAD]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 5, 6, IGNORE_INDEX, IGNORE_INDEX],
        [IGNORE_INDEX, IGNORE_INDEX, 8, 9, 10],
        [IGNORE_INDEX] * 5,
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["ids"] == ["a", "b", "c"] and batch["skipped"] == []


def test_pixel_values_follow_sample_order_across_0_1_2_images():
    img = IMAGE_TOKEN_INDEX
    batch = collate(
        [
            sample("two", [1, img, 5, img, 6], [-100, -100, -100, -100, 6], images=[10, 11]),
            sample("none", [1, 7, 8], [-100, 7, 8]),
            sample("one", [1, img, 9], [-100, -100, 9], images=[12]),
        ],
        pad_token_id=PAD,
    )
    px = batch["pixel_values"]
    assert px.shape == (3, 3, 4, 4)
    assert [px[i, 0, 0, 0].item() for i in range(3)] == [10.0, 11.0, 12.0]
    # one image per IMAGE_TOKEN_INDEX, in row-major order of the padded ids: what the splice expects
    assert int((batch["input_ids"] == img).sum()) == len(px)


def test_text_only_batch_has_no_pixel_values_and_skips_ride_along():
    a = sample("a", [1, 2], [-100, 2])
    b = sample("b", [1, 3, 4], [-100, 3, 4])
    b["skipped"] = [{"index": 4, "id": "x", "kind": "image_missing", "detail": "gone"}]
    batch = collate([a, b], pad_token_id=PAD)
    assert batch["pixel_values"] is None
    assert batch["skipped"] == b["skipped"]
