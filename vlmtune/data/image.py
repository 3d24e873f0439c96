"""Image loading and preprocessing, shared by training, chat and evaluation.

An image goes: file -> PIL (any mode) -> RGB -> optional pad-to-square with the CLIP mean colour (LLaVA's
`expand2square`) -> the encoder's CLIPImageProcessor -> float tensor [3, H, W].
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlmtune.data.llava_json import RecordError


def resolve_image_path(image_folder: str | Path, relative: str, allowed_roots: tuple[str, ...] = ()) -> Path:
    """`relative` under `image_folder`; a path that escapes it (`..`, absolute) is an error unless it lies
    under one of `allowed_roots`.

    The check is on the written path (normalised, symlinks not followed): a `..` or absolute path in the
    data cannot leave the folder, while symlinks the user put inside it (`coco -> /datasets/coco`) work.
    """
    root = Path(os.path.abspath(image_folder))
    path = Path(os.path.normpath(root / relative))
    for base in (root, *(Path(os.path.abspath(r)) for r in allowed_roots)):
        if path.is_relative_to(base):
            return path
    raise RecordError("image_path_escapes", f"{relative!r} resolves outside the image folder {root}")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of any PIL mode; 16-bit and float greyscale are scaled to 8 bits first (plain convert clips)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        scale = 255.0 / max(float(array.max()), 255.0)  # 16-bit data is scaled down, 8-bit-range data kept
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open, fully decode and convert to RGB; a file that cannot be used raises RecordError
    (image_missing, image_empty, image_too_large: Pillow's decompression-bomb guard, image_undecodable)."""
    path = Path(path)
    if not path.is_file():
        raise RecordError("image_missing", f"{path} does not exist")
    if path.stat().st_size == 0:
        raise RecordError("image_empty", f"{path} is an empty file")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except Image.DecompressionBombError as e:
        raise RecordError("image_too_large", f"{path}: {e}") from None
    except Exception as e:  # decoders of broken files raise OSError, SyntaxError, EOFError, struct.error, ...
        raise RecordError("image_undecodable", f"{path}: {type(e).__name__}: {e}") from None


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad the shorter side equally on both sides to a square (LLaVA's expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class ImagePreprocessor:
    """PIL RGB image -> pixel tensor [3, H, W] exactly as the model sees it in training and inference."""

    def __init__(self, image_processor, pad_to_square: bool):
        self.image_processor = image_processor
        self.pad_to_square = pad_to_square
        # LLaVA pads with the processor's mean colour, so padding normalises to ~0.
        self.background = tuple(int(x * 255) for x in image_processor.image_mean)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.pad_to_square:
            image = expand2square(image, self.background)
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    @property
    def crop_size(self) -> tuple[int, int]:
        """(height, width) of the tensors this preprocessor returns."""
        size = self.image_processor.crop_size
        return size["height"], size["width"]
