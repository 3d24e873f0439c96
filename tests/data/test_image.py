"""Image loading, RGB conversion, LLaVA's expand2square, the preprocessor, and path checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from vlmtune.data.image import (
    ImagePreprocessor,
    expand2square,
    load_image,
    resolve_image_path,
    to_rgb,
)
from vlmtune.data.llava_json import RecordError
from vlmtune.model.vision import load_image_processor


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# ---- every PIL mode a dataset holds becomes RGB


def test_greyscale_l_and_la_repeat_the_grey_value():
    grey = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), mode="L")
    assert pixels(to_rgb(grey)).tolist() == [[[0, 0, 0], [77, 77, 77], [255, 255, 255]]]
    la = Image.merge("LA", [grey, Image.new("L", grey.size, 0)])  # fully transparent: alpha is dropped
    assert pixels(to_rgb(la)).tolist() == [[[0, 0, 0], [77, 77, 77], [255, 255, 255]]]


def test_rgba_keeps_the_colour_channels():
    rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [200, 100, 50, 255]]], dtype=np.uint8), mode="RGBA")
    out = to_rgb(rgba)
    assert out.mode == "RGB" and pixels(out).tolist() == [[[10, 20, 30], [200, 100, 50]]]


def test_palette_with_transparency_uses_the_palette_colours(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * (3 * 254))
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=1)  # index 1 (green) is transparent
    loaded = load_image(tmp_path / "p.png")
    assert loaded.mode == "RGB" and pixels(loaded).tolist() == [[[255, 0, 0], [0, 255, 0]]]


def test_cmyk_white_cyan_black():
    cmyk = Image.new("CMYK", (3, 1))
    for x, value in enumerate([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]):
        cmyk.putpixel((x, 0), value)
    assert pixels(to_rgb(cmyk)).tolist() == [[[255, 255, 255], [0, 255, 255], [0, 0, 0]]]


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 300, 600, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")  # stored as 16-bit
    out = pixels(load_image(tmp_path / "deep.png"))[0, :, 0]
    # a plain PIL convert clips everything above 255 to white; scaling keeps the ramp
    np.testing.assert_allclose(out, values[0].astype(float) * 255 / 65535, atol=1)
    assert list(out) == sorted(out) and out[-1] == 255


def test_32_bit_int_image_in_8_bit_range_is_unchanged():
    small = Image.fromarray(np.array([[0, 17, 200, 255]], dtype=np.int32))
    assert small.mode == "I"
    assert pixels(to_rgb(small))[0, :, 0].tolist() == [0, 17, 200, 255]


def test_dark_16_bit_image_stays_dark():
    # scaling follows the bit depth, not the image's own maximum: 255/65535 of full scale is ~1/255
    dark = Image.fromarray(np.array([[0, 257, 2570, 25700]], dtype=np.uint16))
    assert dark.mode == "I;16"
    assert pixels(to_rgb(dark))[0, :, 0].tolist() == [0, 1, 10, 100]


def test_missing_empty_and_broken_files_are_record_errors(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    for name, kinds in [("absent.jpg", {"image_missing"}), ("broken.jpg", {"image_undecodable"})]:
        with pytest.raises(RecordError) as e:
            load_image(tmp_path / name)
        assert e.value.kind in kinds
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(RecordError) as e:
        load_image(tmp_path / "empty.png")
    assert e.value.kind in {"image_empty", "image_undecodable"}


def test_a_folder_or_a_url_where_an_image_belongs_says_what_it_is(tmp_path):
    (tmp_path / "cat.jpg").mkdir()
    with pytest.raises(RecordError, match=r"cat\.jpg is a folder, not an image file") as e:
        load_image(tmp_path / "cat.jpg")
    assert e.value.kind == "image_missing"
    with pytest.raises(RecordError, match=r"'http://x\.org/cat\.jpg' is a URL; download the images") as e:
        resolve_image_path(tmp_path, "http://x.org/cat.jpg")  # not the file tmp_path/http:/x.org/cat.jpg
    assert e.value.kind == "image_missing"


# ---- expand2square


@pytest.mark.parametrize("size,offset", [((40, 20), (0, 10)), ((20, 41), (10, 0)), ((41, 20), (0, 10))])
def test_expand2square_centres_the_image_on_the_background(size, offset):
    w, h = size
    image = Image.new("RGB", size, (255, 0, 0))
    out = expand2square(image, (1, 2, 3))
    side = max(w, h)
    assert out.size == (side, side)
    want = np.empty((side, side, 3), dtype=np.uint8)
    want[:] = (1, 2, 3)
    x, y = offset
    want[y : y + h, x : x + w] = (255, 0, 0)
    assert np.array_equal(pixels(out), want)


def test_expand2square_leaves_a_square_alone():
    image = Image.new("RGB", (8, 8), (5, 6, 7))
    assert expand2square(image, (0, 0, 0)) is image


# ---- ImagePreprocessor = CLIPImageProcessor on LLaVA's padded image


@pytest.fixture(scope="module")
def processor(tiny):
    return load_image_processor(str(tiny.clip))


def test_pad_colour_is_the_clip_mean_as_llava_computes_it(processor):
    # LLaVA: tuple(int(x * 255) for x in image_processor.image_mean), OpenAI CLIP mean (0.4815, 0.4578, 0.4082)
    assert ImagePreprocessor(processor, pad_to_square=True).background == (122, 116, 104)


def test_padded_photo_matches_clip_processor_on_a_hand_padded_copy(processor):
    photo = skdata.chelsea()  # 300 x 451 RGB
    h, w, _ = photo.shape
    canvas = np.empty((w, w, 3), dtype=np.uint8)
    canvas[:] = (122, 116, 104)
    canvas[(w - h) // 2 : (w - h) // 2 + h] = photo
    want = processor(images=Image.fromarray(canvas), return_tensors="pt")["pixel_values"][0]
    got = ImagePreprocessor(processor, pad_to_square=True)(Image.fromarray(photo))
    assert got.shape == (3, 336, 336) and got.dtype == torch.float32
    assert torch.equal(got, want)
    # the padding normalises to about zero in every channel (mean colour, up to int rounding)
    assert got[:, :5, :].abs().max() < 0.02
    mean, std = torch.tensor(processor.image_mean), torch.tensor(processor.image_std)
    photo_centre = torch.tensor(photo[h // 2, w // 2] / 255.0, dtype=torch.float32)
    assert torch.allclose(got[:, 168, 168], (photo_centre - mean) / std, atol=0.1)  # resampled, so roughly


def test_without_padding_it_is_exactly_the_clip_processor(processor):
    photo = Image.fromarray(skdata.astronaut())
    want = processor(images=photo, return_tensors="pt")["pixel_values"][0]
    pre = ImagePreprocessor(processor, pad_to_square=False)
    assert torch.equal(pre(photo), want) and pre.crop_size == (336, 336)


# ---- paths from the data may not leave the image folder


def test_relative_paths_resolve_under_the_folder(tmp_path):
    assert resolve_image_path(tmp_path, "coco/a.jpg") == tmp_path / "coco" / "a.jpg"
    assert resolve_image_path(tmp_path, "coco/../vg/b.jpg") == tmp_path / "vg" / "b.jpg"


@pytest.mark.parametrize("relative", ["../secret.jpg", "coco/../../secret.jpg", "/etc/passwd"])
def test_escaping_paths_are_rejected(tmp_path, relative):
    folder = tmp_path / "images"
    with pytest.raises(RecordError) as e:
        resolve_image_path(folder, relative)
    assert e.value.kind == "image_path_escapes"


def test_allowed_roots_admit_paths_outside_the_folder(tmp_path):
    shared = tmp_path / "shared"
    assert resolve_image_path(tmp_path / "images", str(shared / "x.jpg"), (str(shared),)) == shared / "x.jpg"
    with pytest.raises(RecordError):
        resolve_image_path(tmp_path / "images", str(tmp_path / "other" / "x.jpg"), (str(shared),))


def test_image_size_reads_headers_as_pillow_does(tmp_path):
    """`image_size` (imagesize for JPEG/PNG, Pillow otherwise) gives the size Pillow gives, the stored one
    (EXIF orientation not applied, as load_image leaves it), on the bad corpus's odd files and more; a file
    Pillow cannot open is the same RecordError as load_image's; a decompression bomb too."""
    import io

    from bad_corpus import photo, write_images

    from vlmtune.data.image import image_size

    folder = tmp_path / "images"
    write_images(folder, tmp_path / "outside")
    astronaut = photo("astronaut", 300).resize((300, 200))
    astronaut.save(folder / "progressive.jpg", progressive=True, quality=80)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 (a phone photo); the stored size is 300x200
    thumbnail = io.BytesIO()
    astronaut.resize((160, 120)).save(thumbnail, format="JPEG")  # a frame header inside the EXIF segment
    exif[0x0201], exif[0x0202] = 0, len(thumbnail.getvalue())
    astronaut.save(folder / "rotated.jpg", exif=exif.tobytes() + thumbnail.getvalue())
    astronaut.save(folder / "interlaced.png", interlace=1)
    for fmt in ("webp", "bmp", "tiff"):
        astronaut.save(folder / f"photo.{fmt}")
    checked = 0
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            with Image.open(path) as image:
                width, height = image.size
        except Exception:  # noqa: BLE001 - what Pillow refuses, image_size must refuse alike
            kinds = []
            for read in (image_size, load_image):
                with pytest.raises(RecordError) as e:
                    read(path)
                kinds.append(e.value.kind)
            assert kinds[0] == kinds[1], path.name
            continue
        assert image_size(path) == (height, width), path.name
        checked += 1
    assert checked >= 14 and image_size(folder / "rotated.jpg") == (200, 300)
    with pytest.raises(RecordError) as e:
        image_size(folder / "bomb.png")
    assert e.value.kind == "image_too_large"
