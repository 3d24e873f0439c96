"""AnyRes (LLaVA-NeXT) against transformers' LlavaNext, the independent reference, through the real export.

The `anyres` checkpoint (tiny CLIP-L/336-shaped encoder, the default 1x2 / 2x1 / 2x2 / 3x1 / 1x3 grids, every
trainable weight perturbed, `image_newline` included) is converted by `vlmtune convert pth_to_hf` to the
huggingface layout (LlavaNextForConditionalGeneration + LlavaNextProcessor) and to the xtuner layout; plain
transformers then runs the huggingface folder with its own processor and chat template.
"""
from __future__ import annotations

import random

import pytest
import torch
from convert.convert_helpers import IMAGE, QUESTION, chat_generator, checkpoint, converted, error_line, one_turn_ids, truth  # noqa: F401
from PIL import Image

from vlmtune.cli import main as cli
from vlmtune.config import load_config
from vlmtune.data.collate import collate, collate_packed
from vlmtune.data.image import ImagePreprocessor, load_image
from vlmtune.data.templates import get_template
from vlmtune.data.tokenize import tokenize_conversation
from vlmtune.errors import UserError
from vlmtune.model.anyres import DEFAULT_PINPOINTS, AnyRes, best_resolution
from vlmtune.model.build import build_model
from vlmtune.model.vision import load_image_processor


def shapes() -> dict[str, Image.Image]:
    """The example photo (320x213) as landscape, portrait, very tall, very wide and tiny images."""
    photo = load_image(IMAGE)
    return {"landscape": photo, "portrait": photo.transpose(Image.Transpose.ROTATE_90),
            "tall": photo.resize((100, 700)), "wide": photo.resize((900, 120)), "tiny": photo.resize((40, 30))}


@pytest.fixture(scope="module")
def hf_next(converted):
    """(LlavaNextForConditionalGeneration, its AutoProcessor) of the huggingface export, every weight placed."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    folder = converted("anyres", "huggingface")
    model, info = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval(), AutoProcessor.from_pretrained(folder)


def hf_inputs(processor, image: Image.Image, question: str = QUESTION) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=image, text=text, return_tensors="pt", add_special_tokens=False)


def test_tiling_and_token_counts_match_transformers(hf_next):
    """Grid choice, tile count and positions per image equal transformers' (select_best_resolution,
    image_size_to_num_patches, LlavaNextProcessor's count) on 400 random sizes and the corner cases."""
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    model, processor = hf_next
    layout = AnyRes.for_encoder(DEFAULT_PINPOINTS, model.config.vision_config, 576)
    rng = random.Random(0)
    sizes = [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(400)]
    sizes += [(336, 336), (672, 336), (336, 672), (1, 1), (1, 5000), (5000, 1), (1008, 336), (213, 320), (320, 213)]
    pinpoints = [list(p) for p in DEFAULT_PINPOINTS]
    theirs = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    for size, tokens in zip(sizes, theirs):
        assert best_resolution(size, DEFAULT_PINPOINTS) == select_best_resolution(size, pinpoints), size
        assert layout.tiles(size) == image_size_to_num_patches(size, pinpoints, 336), size
        assert layout.tokens(size) == tokens, size
    assert layout.max_tokens == max(theirs) == 576 + 48 * 49  # the 2x2 grid with nothing cut off


def test_training_pixels_equal_llava_next_image_processor_as_llava_hf_configures_it(tiny):
    """What training feeds (ImagePreprocessor from the encoder's processor + pinpoints) equals the tiles of a
    LlavaNextImageProcessor set up independently with llava-hf/llava-v1.6-vicuna-7b-hf's preprocessor_config
    values (CLIP-L/336: shortest edge 336, centre crop 336, bicubic, OpenAI mean/std, pad), on the PIL backend
    this machine has: pixel for pixel, tile count and image size for 5 shapes and 20 random sizes."""
    from transformers import LlavaNextImageProcessorPil
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    reference = LlavaNextImageProcessorPil(
        do_resize=True, size={"shortest_edge": 336}, resample=3, do_center_crop=True, crop_size={"height": 336, "width": 336},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True, do_pad=True, image_grid_pinpoints=[list(p) for p in DEFAULT_PINPOINTS])
    ours = ImagePreprocessor(load_image_processor(str(tiny.clip)), pad_to_square=False, pinpoints=DEFAULT_PINPOINTS)
    layout = AnyRes(DEFAULT_PINPOINTS, 336, 24)
    rng = random.Random(1)
    photo = load_image(IMAGE)
    images = [*shapes().values(), *(photo.resize((rng.randint(20, 1500), rng.randint(20, 1500))) for _ in range(20))]
    for image in images:
        want = reference(images=image, return_tensors="pt")
        tiles = ours.tiles(image)
        assert want["image_sizes"].tolist() == [[image.height, image.width]]
        assert tiles.shape[0] == layout.tiles((image.height, image.width)), image.size
        assert torch.equal(tiles, want["pixel_values"][0]), image.size


def test_pack_matches_transformers(hf_next):
    """Our layout of one image's tile features equals LlavaNextModel.pack_image_features' (random features)."""
    model, _ = hf_next
    layout = AnyRes.for_encoder(DEFAULT_PINPOINTS, model.config.vision_config, 576)
    newline = torch.randn(64)
    for size in [(213, 320), (320, 213), (700, 100), (120, 900), (1000, 1000)]:
        features = torch.randn(layout.tiles(size), 576, 64)
        (want,), lengths = model.model.pack_image_features([features], torch.tensor([size]), "default", newline)
        assert torch.equal(layout.pack(features, size, newline), want) and lengths.tolist() == [layout.tokens(size)]


@pytest.mark.parametrize("layout", ["huggingface", "xtuner"])
def test_logits_match_transformers_llava_next_through_the_export(hf_next, converted, tiny, layout):
    """`vlmtune chat` on either converted folder gives transformers' LlavaNext logits at every position, for
    images of five shapes: same tiles (pixels equal), same number of image positions, same features."""
    model, processor = hf_next
    folder = converted("anyres", layout)
    argv = [str(folder)] if layout == "huggingface" else [str(tiny.llm), "--llava", str(folder)]
    generator = chat_generator(*argv)
    assert generator.model.anyres is not None and generator.model.anyres.pinpoints == DEFAULT_PINPOINTS
    for name, image in shapes().items():
        inputs = hf_inputs(processor, image)
        features = generator.encode_images([image])
        ours_inputs = generator.embed([one_turn_ids(generator)], features)
        assert torch.equal(inputs["pixel_values"][0], generator.pixel_values([image])), name
        assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == len(features[0]), name
        with torch.no_grad():
            ours = generator.model.llm(**ours_inputs).logits[0]
            theirs = model(**inputs).logits[0]
            blind = model(**{**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}).logits[0]
        assert ours.shape == theirs.shape, name
        diff = (ours - theirs).abs().max().item()
        print(f"\nAnyRes {layout} {name} {image.size}: {len(features[0])} image positions, max |logits diff| = {diff:.1e}")
        assert diff <= 1e-5, name
        assert (blind - theirs).abs().max() > 1e-2  # the comparison sees the image


def test_batched_generation_mixes_image_sizes(hf_next, converted):
    """Prompts whose images take different numbers of positions, left-padded in one batch, give each prompt's
    own logits, and greedy decoding gives transformers' LlavaNext tokens for each."""
    model, processor = hf_next
    generator = chat_generator(str(converted("anyres", "huggingface")))
    images = [shapes()["landscape"], shapes()["tall"]]
    ids = one_turn_ids(generator)
    batch = generator.embed([ids, ids], generator.encode_images(images))
    with torch.no_grad():
        together = generator.model.llm(**batch).logits
        for row, image in enumerate(images):
            alone = generator.model.llm(**generator.embed([ids], generator.encode_images([image]))).logits[0]
            mask = batch["attention_mask"][row].bool()
            torch.testing.assert_close(together[row][mask], alone, rtol=0, atol=1e-4)
    ours = generator.generate_ids([ids, ids], [[im] for im in images], max_new_tokens=8, do_sample=False)
    for image, tokens in zip(images, ours):
        inputs = hf_inputs(processor, image)
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        want = generator._strip(out[0, inputs["input_ids"].shape[1]:].tolist())
        assert tokens == want


def test_packed_loss_equals_padded_loss_with_variable_image_lengths(truth, tiny_tokenizer, tiny):
    """Three samples (two AnyRes images of different sizes, one text-only) packed into one row give the loss
    sum and target count of the same samples padded: the splice places each image's own number of rows."""
    model, _ = truth("anyres")
    template = get_template("internlm2_chat")
    preprocess = ImagePreprocessor(load_image_processor(str(tiny.clip)), False, pinpoints=DEFAULT_PINPOINTS)
    samples = []
    for i, (images, turns) in enumerate([
        ([shapes()["landscape"]], [("<image>\nWhat is it?", "A cat.")]),
        ([], [("Say hi.", "Hi there.")]),
        ([shapes()["tall"], shapes()["tiny"]], [("<image>\n<image>\nCompare.", "Two cats.")]),
    ]):
        tok = tokenize_conversation(turns, tiny_tokenizer, template, 10**6, model.image_length)
        samples.append({
            "id": str(i), "input_ids": torch.tensor(tok.input_ids), "labels": torch.tensor(tok.labels),
            "pixel_values": torch.cat([preprocess.tiles(im) for im in images]) if images else torch.zeros(0, 3, 336, 336),
            "image_sizes": torch.tensor([(im.height, im.width) for im in images]).reshape(-1, 2),
        })
    keys = ("input_ids", "attention_mask", "labels", "pixel_values", "segment_ids", "image_sizes")
    padded, packed = collate(samples, tiny_tokenizer.pad_token_id), collate_packed(samples, tiny_tokenizer.pad_token_id)
    assert len(padded["pixel_values"]) == 3 + 4 + 3  # base + 1x2 grid; base + 3x1 grid (1008x336); base + 1x2
    with torch.no_grad():
        loss_padded, n_padded = model(**{k: padded[k] for k in keys if k in padded})
        loss_packed, n_packed = model(**{k: packed[k] for k in keys if k in packed})
    # packing masks each sample's first label (padded rows never have a target there either)
    assert n_packed == n_padded and n_padded > 0
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-4)


def test_newline_trains_with_the_projector_and_text_only_batches_reach_it(tiny_model_config, tiny_batch):
    """image_newline is trainable whenever the projector is, gets a gradient from an image batch, and a
    text-only batch reaches it too (through the blank image), so ZeRO-2's gradient buckets agree across ranks."""
    model = build_model(tiny_model_config(image_grid_pinpoints=list(DEFAULT_PINPOINTS)), for_training=True)
    assert model.image_newline.requires_grad and model.image_newline.shape == (64,)
    text_only = {k: v[1:2] for k, v in tiny_batch.items() if k in ("input_ids", "attention_mask", "labels")}
    loss, _ = model(**text_only)
    loss.backward()
    assert model.image_newline.grad is not None and model.projector.first.weight.grad is not None
    assert torch.count_nonzero(model.image_newline.grad) == 0  # reached, with a zero gradient (0 * blank)


def test_anyres_settings_that_cannot_work_fail_at_load(tmp_path, tiny_model_config):
    pinpoints = [list(p) for p in DEFAULT_PINPOINTS]
    for options, expected in [
        ({"image_grid_pinpoints": pinpoints}, "pad_image_to_square=True and image_grid_pinpoints (AnyRes) disagree"),
        ({"image_grid_pinpoints": pinpoints, "pad_image_to_square": False, "image_preprocess": "fast"},
         "set image_preprocess='hf'"),
        ({"image_grid_pinpoints": [], "pad_image_to_square": False}, "positive (height, width)"),
    ]:
        with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            load_config("tiny_llava_finetune_lora", options)
    with pytest.raises(UserError, match="multiple of the encoder's image size 336"):
        build_model(tiny_model_config(image_grid_pinpoints=[[336, 600]]), for_training=False)
    with pytest.raises(UserError, match="vision_feature_select_strategy='default'"):
        build_model(tiny_model_config(image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full"),
                    for_training=False)


def test_official_layout_refuses_anyres(checkpoint, tmp_path, capsys):
    assert cli(["convert", "pth_to_hf", str(checkpoint("anyres")), str(tmp_path / "out"), "--save-format", "official"]) == 2
    line = error_line(capsys)
    assert "no AnyRes" in line and "--save-format huggingface" in line
    assert not (tmp_path / "out" / "config.json").exists()


def test_mmbench_refuses_square_padding_on_an_anyres_model(converted, tiny, tmp_path, capsys):
    folder = converted("anyres", "huggingface")
    argv = ["mmbench", str(folder), "--data-path", str(tiny.task / "heldout_mmbench.tsv"), "--work-dir", str(tmp_path),
            "--device", "cpu", "--pad-image-to-square"]
    assert cli(argv) == 2
    assert "tiles images with AnyRes" in error_line(capsys) and not any(tmp_path.iterdir())
