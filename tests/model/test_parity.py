"""Parity with transformers' own LlavaForConditionalGeneration: same weights, same image + prompt, same logits.

Our LlavaModel's weights are renamed with the converter's key map (`vlmtune.convert.keymaps.HUGGINGFACE_LLAVA`,
the layout `convert --save-format huggingface` writes), saved beside a tiny LlavaConfig, and read back by
`LlavaForConditionalGeneration.from_pretrained` with no missing or unexpected key. transformers is then the
independent reference for: CLIP layer -2 without CLS, the mlp2x_gelu projector (exact-erf GELU, biases), and
where image features go in the sequence (each image token expanded to 576).
"""
from __future__ import annotations

import pytest
import torch
from convert.convert_helpers import IMAGE, QUESTION, chat_generator, checkpoint, converted, one_turn_ids, truth  # noqa: F401
from safetensors.torch import save_file
from transformers import LlavaConfig, LlavaForConditionalGeneration

from vlmtune.constants import IMAGE_TOKEN_INDEX
from vlmtune.convert.keymaps import HUGGINGFACE_LLAVA
from vlmtune.model.build import build_model

PATCHES = 576


def to_hf_keys(state_dict: dict) -> dict:
    """Apply the key map's longest matching (our prefix, their prefix) rule to every key."""
    out = {}
    for key, value in state_dict.items():
        ours, theirs = max((rule for rule in HUGGINGFACE_LLAVA if key.startswith(rule[0])), key=lambda r: len(r[0]))
        out[theirs + key[len(ours):]] = value.clone()
    return out


def expand_image_tokens(input_ids, attention_mask, image_token_id, pad_id):
    """HF Llava's input: every IMAGE_TOKEN_INDEX becomes 576 `<image>` ids; rows right-padded again."""
    rows = []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        row = []
        for i, m in zip(ids, mask):
            if m:
                row += [image_token_id] * PATCHES if i == IMAGE_TOKEN_INDEX else [i]
        rows.append(row)
    L = max(len(r) for r in rows)
    out = torch.full((len(rows), L), pad_id)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
    return out, mask


@pytest.fixture(scope="module")
def models(tiny_model_config, tiny_tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    ours = build_model(tiny_model_config(), for_training=False).eval()
    config = LlavaConfig(
        vision_config=ours.visual_encoder.config.to_dict(),
        text_config=ours.llm.config.to_dict(),
        image_token_index=tiny_tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        image_seq_length=PATCHES,
    )
    folder = tmp_path_factory.mktemp("hf_llava")
    config.save_pretrained(folder)
    save_file(to_hf_keys(ours.state_dict()), folder / "model.safetensors", metadata={"format": "pt"})
    hf, info = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return ours, hf.eval()


def test_logits_match_transformers_llava(models, tiny_batch, tiny_tokenizer):
    ours, hf = models
    ids, mask, pixels = tiny_batch["input_ids"], tiny_batch["attention_mask"], tiny_batch["pixel_values"]
    hf_ids, hf_mask = expand_image_tokens(ids, mask, hf.config.image_token_index, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        inputs = ours.prepare_inputs(ids, mask, None, pixels)
        our_logits = ours.llm(**inputs).logits
        hf_logits = hf(input_ids=hf_ids, attention_mask=hf_mask, pixel_values=pixels).logits
        blind = hf(input_ids=hf_ids, attention_mask=hf_mask, pixel_values=torch.zeros_like(pixels)).logits
    assert torch.equal(inputs["attention_mask"], hf_mask) and our_logits.shape == hf_logits.shape
    valid = hf_mask.bool()
    diff = (our_logits[valid] - hf_logits[valid]).abs().max().item()
    print(f"\nmax |logits ours - transformers Llava| = {diff:.3e} over {int(valid.sum())} positions")
    assert diff < 1e-5
    # the comparison sees the images: other pixels move the logits far more than the tolerance
    assert (blind[valid] - hf_logits[valid]).abs().max() > 1e-2


def test_image_features_match_transformers_llava(models, tiny_batch):
    ours, hf = models
    with torch.no_grad():
        got = ours.encode_images(tiny_batch["pixel_values"])
        want = torch.stack(hf.model.get_image_features(pixel_values=tiny_batch["pixel_values"]).pooler_output)
    assert got.shape == want.shape == (3, PATCHES, 64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# ---- SigLIP: no CLS token, 'full' features, through the real huggingface export ---------------------------


def test_siglip_logits_match_transformers_llava_through_the_export(converted, truth, tiny):
    """The `siglip` checkpoint converted by `vlmtune convert pth_to_hf --save-format huggingface` and run by plain
    transformers (LlavaForConditionalGeneration + the exported processor and chat template) gives the logits of
    the checkpoint's own LlavaModel at every position."""
    from transformers import AutoProcessor

    from vlmtune.data.image import load_image

    folder = converted("siglip", "huggingface")
    model, cfg = truth("siglip")
    assert model.feature_strategy == "full" and model.image_length == 729
    generator = chat_generator(cfg.model.llm_name_or_path, "--llava", str(converted("siglip", "xtuner")))
    generator.model = model
    image = load_image(IMAGE)
    inputs = generator.embed([one_turn_ids(generator)], generator.encode_images([image]))
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    assert hf.config.vision_feature_select_strategy == "full" and hf.config.vision_config.model_type == "siglip_vision_model"
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    hf_inputs = processor(images=image, text=text, return_tensors="pt", add_special_tokens=False)
    assert torch.equal(hf_inputs["pixel_values"], generator.pixel_values([image]))  # the processor pads as training
    assert (hf_inputs["input_ids"] == hf.config.image_token_index).sum() == 729
    with torch.no_grad():
        ours = model.llm(**inputs).logits[0]
        theirs = hf(**hf_inputs).logits[0]
        blind = hf(**{**hf_inputs, "pixel_values": torch.zeros_like(hf_inputs["pixel_values"])}).logits[0]
    diff = (ours - theirs).abs().max().item()
    print(f"\nSigLIP: max |logits ours - transformers Llava| = {diff:.3e} over {ours.shape[0]} positions")
    assert ours.shape == theirs.shape and diff <= 1e-5
    assert (blind - theirs).abs().max() > 1e-2  # the comparison sees the image
