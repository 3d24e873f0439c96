"""image_preprocess='fast': the CLIP transform in torch gives the CLIPImageProcessor's tensors up to resampling
rounding (at most 2 of 255 levels, on well under 1 % of values), for padded and unpadded photos of many sizes
(downscaled, upscaled, barely resized), and refuses processor settings it does not reproduce."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from vlmtune.config import load_config
from vlmtune.data.image import ImagePreprocessor, load_image
from vlmtune.errors import UserError
from vlmtune.model.vision import load_image_processor

SIZES = [None, (640, 480), (480, 640), (500, 375), (200, 150), (1024, 768), (337, 336)]


@pytest.fixture(scope="module")
def processor(tiny):
    return load_image_processor(str(tiny.clip))


def level(processor) -> float:
    """One 8-bit level in normalised units, for the channel with the largest step."""
    return 1 / 255 / min(processor.image_std)


@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("photo", ["chelsea", "coffee", "camera"])
def test_fast_matches_the_clip_processor_up_to_resampling_rounding(processor, photo, pad):
    image = Image.fromarray(getattr(skdata, photo)()).convert("RGB")
    hf = ImagePreprocessor(processor, pad_to_square=pad, method="hf")
    fast = ImagePreprocessor(processor, pad_to_square=pad, method="fast")
    for size in SIZES:
        x = image if size is None else image.resize(size, Image.BICUBIC)
        want, got = hf(x), fast(x)
        assert got.shape == want.shape == (3, 336, 336) and got.dtype == want.dtype == torch.float32
        diff = (got - want).abs()
        assert diff.max() <= 2 * level(processor) + 1e-5, (size, diff.max())
        assert (diff > 1e-4).float().mean() < 0.02 and diff.mean() < 3e-4, size


def test_fast_pads_with_the_mean_colour_and_normalises_it_to_about_zero(tiny, processor):
    pre = ImagePreprocessor(processor, pad_to_square=True, method="fast")
    pixels = pre(load_image(tiny.data / "images" / "rocket.jpg"))  # 427 x 640: bands above and below
    assert pixels[:, :10].abs().max() < 0.02 and pixels[:, -10:].abs().max() < 0.02
    assert pixels[:, 168].abs().max() > 0.5  # the photo itself is there


def test_fast_crops_and_zero_pads_like_transformers_when_the_crop_is_larger(processor):
    small = processor.__class__(**{**processor.to_dict(), "size": {"shortest_edge": 300}, "crop_size": {"height": 336, "width": 320}})
    image = Image.fromarray(skdata.astronaut()).resize((400, 300))
    want = ImagePreprocessor(small, False, "hf")(image)
    got = ImagePreprocessor(small, False, "fast")(image)
    assert got.shape == want.shape == (3, 336, 320)
    assert (got - want).abs().max() <= 2 * level(processor) + 1e-5


@pytest.mark.parametrize("change, name", [
    ({"resample": 0}, "resample"),  # nearest
    ({"size": {"shortest_edge": 336, "longest_edge": 500}}, "size"),
    ({"do_pad": True}, "do_pad"),
])
def test_fast_refuses_settings_it_does_not_reproduce(processor, change, name):
    other = processor.__class__(**{**processor.to_dict(), **change})
    with pytest.raises(ValueError, match=f"does not support .*{name}"):
        ImagePreprocessor(other, True, "fast")


def test_config_key_selects_the_method_and_rejects_others(tiny):
    assert load_config("tiny_llava_pretrain").data.image_preprocess == "hf"  # default: bit-exact with transformers
    assert load_config("tiny_llava_pretrain", {"image_preprocess": "fast"}).data.image_preprocess == "fast"
    with pytest.raises(UserError, match="image_preprocess.*one of fast, hf"):
        load_config("tiny_llava_pretrain", {"image_preprocess": "pil"})
    with pytest.raises(ValueError, match="image_preprocess"):
        ImagePreprocessor(load_image_processor(str(tiny.clip)), True, "pil")


def test_hf_method_is_exactly_the_processor(processor):
    image = Image.fromarray(np.asarray(skdata.coffee()))
    want = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(ImagePreprocessor(processor, False, "hf")(image), want)
