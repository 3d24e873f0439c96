"""Batching: right padding, attention mask, all images of the batch stacked in sample order."""
from __future__ import annotations

import torch

from vlmtune.constants import IGNORE_INDEX


def collate(samples: list[dict], pad_token_id: int) -> dict:
    """List of dataset samples -> batch.

    input_ids/labels/attention_mask: [B, T] right-padded (pad id / IGNORE_INDEX / 0).
    pixel_values: [N, 3, H, W] with N = images in the whole batch, sample 0's first (the order the model's
    splice consumes them), or None for a text-only batch. Any number of images per sample is fine. With AnyRes
    each image is several rows of pixel_values (its tiles). image_sizes: [N, 2] the images' (height, width).
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
        "image_sizes": torch.cat([s["image_sizes"] for s in samples]),
        "ids": [s["id"] for s in samples],
        "skipped": [k for s in samples for k in s.get("skipped", [])],
    }


def collate_packed(samples: list[dict], pad_token_id: int) -> dict:
    """List of dataset samples -> one packed row (a micro-batch of the token-budget sampler).

    input_ids/labels/attention_mask/segment_ids: [1, T], T = the samples' lengths summed (no padding);
    segment_ids numbers the samples 0, 1, ...; the first label of every sample is IGNORE_INDEX, so no sample
    starts with a target predicted from the sample before it (unpacked, position 0 is never a target either).
    pixel_values and image_sizes as in `collate`. The model keeps attention within each sample (see model/llava.py).
    `pad_token_id` is unused (nothing is padded); the signature is `collate`'s, so either fits the loader.
    """
    labels = []
    for s in samples:
        own = s["labels"].clone()
        own[0] = IGNORE_INDEX
        labels.append(own)
    input_ids = torch.cat([s["input_ids"] for s in samples])[None]
    images = [s["pixel_values"] for s in samples if len(s["pixel_values"])]
    return {
        "input_ids": input_ids,
        "labels": torch.cat(labels)[None],
        "attention_mask": torch.ones_like(input_ids),
        "segment_ids": torch.cat([torch.full((len(s["input_ids"]),), i) for i, s in enumerate(samples)])[None],
        "pixel_values": torch.cat(images) if images else None,
        "image_sizes": torch.cat([s["image_sizes"] for s in samples]),
        "ids": [s["id"] for s in samples],
        "skipped": [k for s in samples for k in s.get("skipped", [])],
    }
