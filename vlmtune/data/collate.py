"""Batching: right padding, attention mask, all images of the batch stacked in sample order."""
from __future__ import annotations

import torch

from vlmtune.constants import IGNORE_INDEX


def collate(samples: list[dict], pad_token_id: int) -> dict:
    """List of dataset samples -> batch.

    input_ids/labels/attention_mask: [B, T] right-padded (pad id / IGNORE_INDEX / 0).
    pixel_values: [N, 3, H, W] with N = images in the whole batch, sample 0's first (the order the model's
    splice consumes them), or None for a text-only batch. Any number of images per sample is fine.
    """
    T = max(len(s["input_ids"]) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[i, :n] = s["input_ids"]
        labels[i, :n] = s["labels"]
        attention_mask[i, :n] = 1
    images = [s["pixel_values"] for s in samples if len(s["pixel_values"])]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": torch.cat(images) if images else None,
        "ids": [s["id"] for s in samples],
        "skipped": [k for s in samples for k in s.get("skipped", [])],
    }
