"""AnyRes (LLaVA-NeXT): an image of any shape as a grid of encoder tiles plus one overview tile.

Every AnyRes fact has its owner here, written after transformers' LlavaNext (modeling_llava_next.py,
processing_llava_next.py, image_processing_utils.select_best_resolution), which the tests compare against:

    image (h, w) -> the pinpoint (H, W) that keeps the most of its pixels, then wastes the least (`best_resolution`)
                 -> resized into (H, W) keeping its aspect ratio, zero-padded, cut into (H / t) x (W / t) tiles of
                    the encoder's size t; the whole image squashed to t x t goes first (the base tile)
    tiles [1 + R * C, 3, t, t] --encoder, projector--> [1 + R * C, s * s, D]   (s = t / patch tokens per side)
    `pack`: the base tile's s * s rows, then the grid's features laid out as one (R * s) x (C * s) map with the
            rows and columns that only cover padding cut off (`unpadded`), each map row followed by the
            `image_newline` vector: s * s + h' * (w' + 1) rows in all (`tokens`).

The preprocessing itself is transformers' LlavaNextImageProcessorPil (data/image.py builds it from the
encoder's processor and these pinpoints), so pixels are transformers' by construction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmtune.errors import UserError
from vlmtune.model import vision

# LLaVA-NeXT's (and transformers' LlavaNextImageProcessor's) default grid for 336-pixel tiles: 1x2, 2x1, 2x2, 3x1, 1x3
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def best_resolution(size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """The pinpoint (height, width) an image of `size` (height, width) is fitted into: the most of its pixels
    kept after a downscale that keeps the aspect ratio, then the fewest wasted (transformers'
    select_best_resolution, ties going to the first listed)."""
    height, width = size
    best, most, least = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > most or (effective == most and wasted < least):
            best, most, least = (h, w), effective, wasted
    return best


@dataclass(frozen=True)
class AnyRes:
    """The tiling of one encoder: `pinpoints` (height, width) in pixels, multiples of `tile` (the encoder's
    image size); `side` feature rows/columns per tile (image_size // patch_size)."""

    pinpoints: tuple[tuple[int, int], ...]
    tile: int
    side: int

    @classmethod
    def for_encoder(cls, pinpoints, vision_config, tokens_per_tile: int) -> AnyRes:
        """The tiling of an encoder whose tiles give `tokens_per_tile` features each; a pinpoint that is not a
        whole number of tiles, or features that are not a square grid (CLIP's CLS kept: strategy 'full'), is
        an error naming the fix."""
        tile, side = vision_config.image_size, vision_config.image_size // vision_config.patch_size
        points = tuple((int(h), int(w)) for h, w in pinpoints)
        if not points:
            raise UserError("image_grid_pinpoints is empty; list the (height, width) grids, e.g. "
                            f"{[list(p) for p in DEFAULT_PINPOINTS]}")
        bad = [p for p in points if min(p) <= 0 or p[0] % tile or p[1] % tile]
        if bad:
            raise UserError(f"image_grid_pinpoints {[list(p) for p in bad]}: each side must be a positive multiple of "
                            f"the encoder's image size {tile}")
        if tokens_per_tile != side * side:
            raise UserError(f"AnyRes lays each tile's features out as a {side}x{side} grid, but a tile gives "
                            f"{tokens_per_tile} (a CLS token kept): set vision_feature_select_strategy='default'")
        return cls(points, tile, side)

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of tiles for an image of `size` (height, width)."""
        h, w = best_resolution(size, self.pinpoints)
        return h // self.tile, w // self.tile

    def tiles(self, size: tuple[int, int]) -> int:
        """Encoder inputs for an image of `size`: the base tile and the grid."""
        rows, cols = self.grid(size)
        return 1 + rows * cols

    def unpadded(self, size: tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of the grid's feature map left after cutting off what covers only padding
        (transformers' unpad_image: the padding is centred, rounding as there)."""
        rows, cols = self.grid(size)
        height, width = rows * self.side, cols * self.side
        orig_h, orig_w = size
        if orig_w / orig_h > width / height:
            new_h = int(round(orig_h * (width / orig_w), 7))
            return height - 2 * ((height - new_h) // 2), width
        new_w = int(round(orig_w * (height / orig_h), 7))
        return height, width - 2 * ((width - new_w) // 2)

    def tokens(self, size: tuple[int, int]) -> int:
        """Sequence positions an image of `size` takes: base tile + unpadded map + one newline per map row."""
        h, w = self.unpadded(size)
        return self.side * self.side + h * (w + 1)

    @property
    def max_tokens(self) -> int:
        """The most positions any image can take (the largest pinpoint, nothing cut): what `max_length` and
        packing count an image as before its size is known."""
        return self.side * self.side + max((h // self.tile * self.side) * (w // self.tile * self.side + 1)
                                           for h, w in self.pinpoints)

    def pack(self, features: torch.Tensor, size: tuple[int, int], newline: torch.Tensor) -> torch.Tensor:
        """[1 + R * C, s * s, D] projected tile features of one image -> [tokens(size), D] (module docstring)."""
        rows, cols = self.grid(size)
        s, D = self.side, features.shape[-1]
        grid = features[1:].view(rows, cols, s, s, D).permute(0, 2, 1, 3, 4).reshape(rows * s, cols * s, D)
        h, w = self.unpadded(size)
        top, left = (rows * s - h) // 2, (cols * s - w) // 2
        grid = grid[top : top + h, left : left + w]  # [h, w, D]
        with_newlines = torch.cat([grid, newline.to(grid.dtype).expand(h, 1, D)], dim=1)  # [h, w + 1, D]
        return torch.cat([features[0], with_newlines.reshape(-1, D)])


def image_positions(sizes, image_length: int, anyres: AnyRes | None) -> list[int]:
    """Positions each image of (height, width) `sizes` takes after the splice: with AnyRes the tokens of its own
    size, else `image_length` each. The one rule the model, the table build and `data check` share."""
    if anyres is None:
        return [image_length] * len(sizes)
    return [anyres.tokens(tuple(size)) for size in sizes]


def image_layout(vision_config, strategy: str | None, pinpoints) -> tuple[int, AnyRes | None]:
    """(positions an image takes after the splice - with AnyRes the most one can -, the tiling or None) for
    an encoder config, its feature strategy and `image_grid_pinpoints`: what LlavaModel uses and what the
    data side (table build, `data check`, `data show`) gets without loading weights."""
    tile_tokens = vision.image_tokens(vision_config, strategy)
    if not pinpoints:
        return tile_tokens, None
    anyres = AnyRes.for_encoder(pinpoints, vision_config, tile_tokens)
    return anyres.max_tokens, anyres
