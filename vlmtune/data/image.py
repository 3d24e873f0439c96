"""Image loading and preprocessing, shared by training, chat and evaluation.

An image goes: file -> PIL (any mode) -> RGB -> optional pad-to-square with the CLIP mean colour (LLaVA's
`expand2square`) -> the encoder's CLIP transform (resize, centre crop, rescale, normalise) -> float [3, H, W].

The CLIP transform runs one of two ways (`image_preprocess` in the config):
- "hf" (the config default): the CLIPImageProcessor itself (transformers' PIL backend when torchvision is
  absent): numpy, float64 rescale, PIL resize; the reference.
- "fast" (opt-in): the same steps on a uint8 tensor: one antialiased bicubic `F.interpolate` (PIL's filter,
  a = -0.5, in fixed point; the kernel transformers' torchvision backend uses), crop by slicing, then
  x * (1 / (255 std)) - mean / std in one pass. More images/s than "hf" on COCO-sized JPEGs (measured by
  scripts/bench/bench_image_preprocess.py: the figure and its spread are in docs/benchmarks.md); the resized
  pixels differ from PIL's by one, rarely two, 8-bit levels on < 1 % of values (rounding): less than casting
  the normalised pixels to bf16 changes them.
ImagePreprocessor defaults to "hf" (a model from elsewhere is fed exactly what its processor gives); training
passes the config's `image_preprocess`, and checkpoints carry it to chat and MMBench.

With AnyRes (`image_grid_pinpoints`, model/anyres.py) an image becomes tiles: transformers'
LlavaNextImageProcessorPil, set up from the encoder's processor settings (PROCESSOR_KEYS) and the pinpoints,
does it ("hf" only; it pads with zeros, not the mean colour, as transformers does).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import imagesize
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlmtune.data.llava_json import RecordError

PREPROCESS_METHODS = ("hf", "fast")
# An encoder's image processor settings that carry over to the Llava / LlavaNext image processors built from it
PROCESSOR_KEYS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
                  "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")
FAST_RESAMPLE = {2: "bilinear", 3: "bicubic"}
HEADER_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG: sizes read by `imagesize`  # PIL resample code -> F.interpolate mode (antialiased)


def resolve_image_path(image_folder: str | Path, relative: str, allowed_roots: tuple[str, ...] = ()) -> Path:
    """`relative` under `image_folder`; a path that escapes it (`..`, absolute) is an error unless it lies
    under one of `allowed_roots`.

    The check is on the written path (normalised, symlinks not followed): a `..` or absolute path in the
    data cannot leave the folder, while symlinks the user put inside it (`coco -> /datasets/coco`) work.
    """
    if "://" in relative:  # scraped sets list the source URL; normpath would make it a path that never exists
        raise RecordError("image_missing", f"{relative!r} is a URL; download the images and give their paths "
                          f"relative to the image folder")
    root = Path(os.path.abspath(image_folder))
    path = Path(os.path.normpath(root / relative))
    for base in (root, *(Path(os.path.abspath(r)) for r in allowed_roots)):
        if path.is_relative_to(base):
            return path
    raise RecordError("image_path_escapes", f"{relative!r} resolves outside the image folder {root}")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of any PIL mode; 16-bit and float greyscale are scaled to 8 bits first (plain convert clips).

    The scale follows the bit depth, not the image's own maximum (a dark 16-bit photo stays dark): 16-bit
    modes divide by 257 (65535 -> 255); 32-bit int/float data is read as 16-bit when it exceeds 255, else as
    8-bit."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        sixteen_bit = image.mode.startswith("I;16") or float(array.max()) > 255.0
        scale = 255.0 / 65535.0 if sixteen_bit else 1.0
        image = Image.fromarray(np.clip(np.rint(array * scale), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def _check_file(path: Path) -> None:
    """RecordError image_missing / image_empty for a path that is not a non-empty file."""
    if not path.is_file():
        what = "is a folder, not an image file" if path.is_dir() else "does not exist"
        raise RecordError("image_missing", f"{path} {what}")
    if path.stat().st_size == 0:
        raise RecordError("image_empty", f"{path} is an empty file")


@contextlib.contextmanager
def _opened(path: Path):
    """The image file opened by Pillow; a file that cannot be used (here or in the caller's block) raises
    RecordError: image_missing, image_empty, image_too_large (Pillow's decompression-bomb guard),
    image_undecodable."""
    _check_file(path)
    try:
        with Image.open(path) as image:
            yield image
    except Image.DecompressionBombError as e:
        raise RecordError("image_too_large", f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - broken files raise OSError, SyntaxError, EOFError, struct.error, ...
        raise RecordError("image_undecodable", f"{path}: {type(e).__name__}: {e}") from None


def load_image(path: str | Path) -> Image.Image:
    """Open, fully decode and convert to RGB; a file that cannot be used raises RecordError (`_opened`)."""
    with _opened(Path(path)) as image:
        image.load()
        return to_rgb(image)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image from its header alone, nothing decoded; RecordError as `load_image` for a
    file that is missing, empty or not an image. The size is the stored one, EXIF orientation not applied, as
    `load_image` (and LLaVA, transformers) leave it.

    JPEG and PNG headers (nearly every training image) are read by `imagesize`, which parses only the markers
    up to the frame header: about half of what `Image.open` costs per file, which matters 665K times at an
    AnyRes table build (docs/benchmarks.md; tests/data/test_image.py checks it against Pillow on odd files).
    Anything else, or a size it cannot read or that Pillow's decompression-bomb guard would refuse, goes
    through Pillow."""
    path = Path(path)
    _check_file(path)
    with open(path, "rb") as f:
        if f.read(8).startswith(HEADER_SIGNATURES):
            f.seek(0)
            width, height = imagesize.get(f, exif_rotation=False)
            limit = Image.MAX_IMAGE_PIXELS
            if width > 0 and height > 0 and (limit is None or width * height <= 2 * limit):
                return height, width
    with _opened(path) as image:
        width, height = image.size
    return height, width


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad the shorter side equally on both sides to a square (LLaVA's expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def processor_settings(image_processor) -> dict:
    """The PROCESSOR_KEYS settings of an image processor; one without a centre crop (SigLIP's: it resizes
    straight to its size) says so, since Llava's processors crop by default."""
    values = image_processor.to_dict()
    settings = {k: values[k] for k in PROCESSOR_KEYS if k in values}
    settings.setdefault("do_center_crop", False)
    return settings


def anyres_processor(image_processor, pinpoints):
    """transformers' LlavaNextImageProcessorPil with `image_processor`'s settings and these grid pinpoints."""
    from transformers import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(**processor_settings(image_processor),
                                      image_grid_pinpoints=[list(p) for p in pinpoints], do_pad=True)


class ImagePreprocessor:
    """PIL RGB image -> pixel tensor [3, H, W] exactly as the model sees it in training and inference; with
    AnyRes `pinpoints`, `tiles` gives the image's tiles [T, 3, H, W] (model/anyres.py).

    `method` is "hf" (the processor itself) or "fast" (FastClipTransform: the same steps in torch on uint8).
    """

    def __init__(self, image_processor, pad_to_square: bool, method: str = "hf", pinpoints=None):
        if method not in PREPROCESS_METHODS:
            raise ValueError(f"image_preprocess {method!r} is not one of {', '.join(PREPROCESS_METHODS)}")
        if pinpoints and (method != "hf" or pad_to_square):
            raise ValueError("AnyRes (image_grid_pinpoints) tiles the image itself: it needs image_preprocess='hf' "
                             "and pad_image_to_square=False")
        self.image_processor = image_processor
        self.pad_to_square = pad_to_square
        self.method = method
        # LLaVA pads with the processor's mean colour, so padding normalises to ~0.
        self.background = tuple(int(x * 255) for x in image_processor.image_mean)
        self.fast = FastClipTransform(image_processor) if method == "fast" else None
        self.anyres = anyres_processor(image_processor, pinpoints) if pinpoints else None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.anyres is not None:
            raise ValueError("an AnyRes image is several tiles: use ImagePreprocessor.tiles")
        if self.pad_to_square:
            image = expand2square(image, self.background)
        if self.fast is not None:
            return self.fast(image)
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def tiles(self, image: Image.Image) -> torch.Tensor:
        """The encoder inputs of one image: [1, 3, H, W], or with AnyRes its base tile and grid [T, 3, H, W]."""
        if self.anyres is None:
            return self(image)[None]
        return self.anyres(images=image, return_tensors="pt")["pixel_values"][0]

    @property
    def crop_size(self) -> tuple[int, int]:
        """(height, width) of the tensors this preprocessor returns: the centre crop's (CLIP), or the size it
        resizes to when it does not crop (SigLIP)."""
        return output_size(self.image_processor.to_dict())


class FastClipTransform:
    """A CLIPImageProcessor's resize -> centre crop -> rescale -> normalise, on a uint8 tensor in torch.

    Output sizes and crop offsets are computed as transformers computes them; only the resampling kernel
    differs (torch's antialiased fixed-point filter vs PIL's: the same filter; rounding differs by 1-2 levels).
    Settings it cannot reproduce are refused here, once, naming the setting.
    """

    def __init__(self, processor):
        values = processor.to_dict()  # CLIP's processor has crop and pad settings, SigLIP's has neither
        size = values["size"]
        unsupported = [name for name, ok in (
            ("do_resize", values["do_resize"]), ("resample", values["resample"] in FAST_RESAMPLE),
            ("do_pad", not values.get("do_pad")),  # LlavaImageProcessor's own padding: ImagePreprocessor pads
            ("size", bool(size.get("shortest_edge")) != bool(size.get("height")) and not size.get("longest_edge")),
        ) if not ok]
        if unsupported:
            raise ValueError(f"image_preprocess='fast' does not support this image processor's "
                             f"{', '.join(unsupported)} ({type(processor).__name__}); use image_preprocess='hf'")
        self.shortest_edge = size.get("shortest_edge")
        self.size = None if self.shortest_edge else (size["height"], size["width"])
        self.mode = FAST_RESAMPLE[int(values["resample"])]
        self.crop = output_size(values) if values.get("do_center_crop") else None
        mean = torch.tensor(values["image_mean"] if values["do_normalize"] else [0.0] * 3, dtype=torch.float32)
        std = torch.tensor(values["image_std"] if values["do_normalize"] else [1.0] * 3, dtype=torch.float32)
        rescale = values["rescale_factor"] if values["do_rescale"] else 1.0
        self.scale = (rescale / std).view(3, 1, 1)  # x * scale + shift == (x * rescale - mean) / std
        self.shift = (-mean / std).view(3, 1, 1)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing: transformers' get_resize_output_image_size, default_to_square=False."""
        if self.size is not None:
            return self.size
        short, long = sorted((height, width))
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB [H, W] -> float32 [3, h, w]."""
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        pixels = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None]  # [1, 3, H, W], channels-last strides
        resized = F.interpolate(pixels, size=self.output_size(image.height, image.width), mode=self.mode, antialias=True)[0]
        if self.crop is not None:
            resized = center_crop(resized, self.crop)
        return torch.addcmul(self.shift, resized.float(), self.scale)


def output_size(processor_values: dict) -> tuple[int, int]:
    """(height, width) of an image processor's output, from its settings: the centre crop's size when it crops,
    else the fixed size it resizes to."""
    size = processor_values["crop_size"] if processor_values.get("do_center_crop") else processor_values["size"]
    return size["height"], size["width"]


def center_crop(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[C, H, W] -> [C, h, w] at transformers' offsets ((H - h) // 2); a smaller image is zero-padded first,
    centred with the padding rounded up on the top/left (as transformers does)."""
    (H, W), (h, w) = pixels.shape[-2:], size
    if H < h or W < w:
        top, left = -(-max(h - H, 0) // 2), -(-max(w - W, 0) // 2)
        canvas = pixels.new_zeros(pixels.shape[0], max(H, h), max(W, w))
        canvas[:, top : top + H, left : left + W] = pixels
        pixels, (H, W) = canvas, canvas.shape[-2:]
    top, left = (H - h) // 2, (W - w) // 2
    return pixels[:, top : top + h, left : left + w]
