"""LlavaModel: the vectorised splice against a per-sample Python reference, the loss, and zero gradients."""
from __future__ import annotations

import pytest
import torch

from vlmtune.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vlmtune.model.build import build_model
from vlmtune.model.llava import splice_image_features

IMG = IMAGE_TOKEN_INDEX


def naive_splice(text_embeds, input_ids, attention_mask, labels, features, padding_side):
    """Reference: walk every sample token by token; an image id takes the next image's P rows."""
    B, _, D = text_embeds.shape
    rows, row_labels, k = [], [], 0
    for b in range(B):
        r, lab = [], []
        for t in range(input_ids.shape[1]):
            if not attention_mask[b, t]:
                continue
            if input_ids[b, t] == IMG:
                r += list(features[k])
                lab += [IGNORE_INDEX] * features.shape[1]
                k += 1
            else:
                r.append(text_embeds[b, t])
                lab.append(int(labels[b, t]))
        rows.append(r)
        row_labels.append(lab)
    assert features is None or k == len(features)
    L = max(len(r) for r in rows)
    out = torch.zeros(B, L, D)
    mask = torch.zeros(B, L, dtype=torch.long)
    new_labels = torch.full((B, L), IGNORE_INDEX)
    for b, (r, lab) in enumerate(zip(rows, row_labels)):
        s = L - len(r) if padding_side == "left" else 0
        out[b, s : s + len(r)] = torch.stack(r)
        mask[b, s : s + len(r)] = 1
        new_labels[b, s : s + len(r)] = torch.tensor(lab)
    return out, mask, new_labels


def padded(rows, side, pad=0):
    """[B, T] ids and mask from ragged rows, padded on `side`."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        s = T - len(r) if side == "left" else 0
        ids[b, s : s + len(r)] = torch.tensor(r)
        mask[b, s : s + len(r)] = 1
    return ids, mask


ROWS = [
    [1, 11, IMG, 12, 13, IMG, 14],  # two images, one between text
    [1, 21, 22, 23],  # text only, between image samples
    [1, IMG, 31],  # one image
    [IMG, 41, 42, 43, 44, 45, 46, 47, 48],  # image first, longest
]


@pytest.mark.parametrize("in_side", ["right", "left"])
@pytest.mark.parametrize("out_side", ["right", "left"])
def test_splice_matches_the_per_sample_reference(in_side, out_side):
    torch.manual_seed(0)
    ids, mask = padded(ROWS, in_side)
    labels = torch.where(mask.bool() & (ids != IMG), ids + 1000, IGNORE_INDEX)
    P, D = 5, 8
    embeds = torch.randn(*ids.shape, D)
    features = torch.randn(4, P, D)
    got = splice_image_features(embeds, ids, mask, labels, features, out_side)
    want, want_mask, want_labels = naive_splice(embeds, ids, mask, labels, features, out_side)
    assert torch.equal(got["inputs_embeds"], want)
    assert torch.equal(got["attention_mask"], want_mask)
    assert torch.equal(got["labels"], want_labels)
    # every image row has IGNORE as label; lengths are text + P per image
    assert got["attention_mask"].sum(1).tolist() == [5 + 2 * P, 4, 2 + P, 8 + P]
    assert int((got["labels"] != IGNORE_INDEX).sum()) == sum(len(r) - r.count(IMG) for r in ROWS)


def test_text_only_batch_is_a_copy_of_the_embeddings():
    ids, mask = padded([[1, 2, 3], [1, 4]], "right")
    embeds = torch.randn(2, 3, 4)
    got = splice_image_features(embeds, ids, mask, ids.clone(), None)
    assert torch.equal(got["inputs_embeds"][mask.bool()], embeds[mask.bool()])
    assert torch.equal(got["attention_mask"], mask) and got["labels"][1, 2] == IGNORE_INDEX


def test_image_count_mismatch_is_an_error():
    ids, mask = padded([[1, IMG, 2], [IMG, 3]], "right")
    with pytest.raises(ValueError, match="2 image tokens but 1 images"):
        splice_image_features(torch.zeros(2, 3, 4), ids, mask, None, torch.zeros(1, 5, 4))
    with pytest.raises(ValueError, match="2 image tokens but 0 images"):
        splice_image_features(torch.zeros(2, 3, 4), ids, mask, None, None)


def test_splice_passes_gradients_to_features_and_embeddings():
    ids, mask = padded(ROWS[:3], "right")
    embeds = torch.randn(*ids.shape, 4, requires_grad=True)
    features = torch.randn(3, 2, 4, requires_grad=True)
    out = splice_image_features(embeds, ids, mask, None, features)["inputs_embeds"]
    out.sum().backward()
    assert torch.equal(features.grad, torch.ones_like(features))
    assert torch.equal(embeds.grad, (mask.bool() & (ids != IMG)).float()[..., None].expand_as(embeds))


# ---- the assembled model on the tiny parts


@pytest.fixture(scope="module")
def pretrain_model(tiny_model_config):
    torch.manual_seed(0)
    return build_model(tiny_model_config())


def test_loss_is_the_llm_own_loss_on_the_spliced_inputs(pretrain_model, tiny_batch):
    """loss_sum / n_tokens equals transformers' mean next-token loss given the same embeddings and labels."""
    model = pretrain_model
    with torch.no_grad():
        loss_sum, n_tokens = model(**{k: tiny_batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")})
        inputs = model.prepare_inputs(tiny_batch["input_ids"], tiny_batch["attention_mask"], tiny_batch["labels"], tiny_batch["pixel_values"])
        reference = model.llm(**inputs).loss
    # every supervised token of the collated batch is a target (none is the first token of its row)
    assert n_tokens == int((tiny_batch["labels"] != IGNORE_INDEX).sum())
    assert inputs["inputs_embeds"].shape[1] == tiny_batch["attention_mask"].sum(1).add(575 * torch.tensor([1, 0, 2])).max()
    torch.testing.assert_close(loss_sum / n_tokens, reference, rtol=1e-5, atol=1e-5)


def test_lm_head_only_at_target_positions_gives_the_same_loss_and_gradients(tiny_model_config, tiny_batch):
    """build_model marks a transformers LLM (`transformers_llm`): logits only where some sample predicts a target
    (the image and prompt rows get none), with the loss, target count and every gradient of the full-logits pass."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config(freeze_llm=False, freeze_visual_encoder=False), for_training=False).train()
    assert model.transformers_llm
    batch = {k: tiny_batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
    head_rows = []
    hook = model.llm.get_output_embeddings().register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[1]))
    results = {}
    for only in (True, False):
        model.transformers_llm = only
        model.zero_grad(set_to_none=True)
        loss_sum, n_targets = model(**batch)
        loss_sum.backward()
        results[only] = (loss_sum.detach(), int(n_targets), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    hook.remove()
    (selected, full), (loss, n, grads) = head_rows, results[True]
    assert selected < full / 2  # most rows of these samples are image and prompt rows
    assert n == results[False][1] == int((tiny_batch["labels"] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, results[False][0], rtol=1e-5, atol=1e-5)
    assert grads.keys() == results[False][2].keys() and any(k.startswith("llm.") for k in grads)
    for name, grad in results[False][2].items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_image_features_come_from_layer_minus_2_without_cls(pretrain_model, tiny_batch):
    model = pretrain_model
    with torch.no_grad():
        hidden = model.visual_encoder(tiny_batch["pixel_values"], output_hidden_states=True).hidden_states
        want = model.projector(hidden[len(hidden) - 2][:, 1:])  # 2 CLIP layers: hidden[1] is layer 1's output
        got = model.encode_images(tiny_batch["pixel_values"])
    assert got.shape == (3, 576, 64) and torch.equal(got, want)


def grad_ready_order(model, batch: dict) -> list[str]:
    """Trainable parameter names in the order backward makes their gradients ready (fresh .grad each call)."""
    order: list[str] = []
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    handles = [p.register_post_accumulate_grad_hook(lambda _, n=n: order.append(n)) for n, p in named]
    model.zero_grad(set_to_none=True)
    loss_sum, n_tokens = model(**batch)
    (loss_sum / n_tokens).backward()
    for handle in handles:
        handle.remove()
    return order


@pytest.mark.parametrize("lora", [False, True])
def test_text_only_batch_readies_the_same_gradients_in_the_same_order(tiny_model_config, tiny_batch, lora):
    """ZeRO-2 reduces gradients in buckets filled in ready order, so a rank with a text-only micro-batch next
    to a rank with an image must ready the same parameters in the same order (a 2-rank finetune crashed, or
    mixed up gradients, when it did not). The vision parameters' gradients from text alone are exactly zero."""
    extra = dict(llm_lora=dict(r=4), visual_encoder_lora=dict(r=4)) if lora else {}
    torch.manual_seed(0)
    model = build_model(tiny_model_config(**extra))
    image_row, text_row = 0, 1  # tiny_batch: sample 0 has one image (the first), sample 1 none
    image_batch = {k: tiny_batch[k][image_row : image_row + 1] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
    text_batch = {k: tiny_batch[k][text_row : text_row + 1] for k in ("input_ids", "attention_mask", "labels")}
    image_order = grad_ready_order(model, image_batch)
    assert grad_ready_order(model, text_batch) == image_order
    vision = [n for n in image_order if not n.startswith("llm.")]
    # projector (2 linears) + CLIP LoRA A/B on 6 linears of layer 0; layer 1 is after visual_select_layer=-2
    assert len(vision) == (4 + 2 * 6 if lora else 4)
    params = dict(model.named_parameters())
    for name in vision:
        assert torch.count_nonzero(params[name].grad) == 0, name
    if lora:  # the LLM's adapter still learns from the text
        assert any(params[n].grad.abs().sum() > 0 for n in image_order if n.startswith("llm."))


def forward_order(model, batch) -> list[str]:
    """Names of the modules holding parameters, in the order a forward pass enters them (repeats folded):
    the order ZeRO-3 gathers their partitioned weights in, on every rank together."""
    order, handles = [], []
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: order.append(name)))
    try:
        model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return [n for i, n in enumerate(order) if i == 0 or order[i - 1] != n]


def test_text_only_batch_runs_the_modules_in_the_image_batch_order(tiny_model_config, tiny_batch):
    """Under ZeRO-3 a rank with a text-only micro-batch beside one with an image must enter the same modules in
    the same order: each entry gathers that module's weights from all ranks. The blank image once ran after the
    embeddings; a 2-rank ZeRO-3 LoRA finetune with batch 1 then hung at the first mixed step."""
    model = build_model(tiny_model_config(llm_lora=dict(r=4), visual_encoder_lora=dict(r=4)))
    image_batch = {k: tiny_batch[k][0:1] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
    text_batch = {k: tiny_batch[k][1:2] for k in ("input_ids", "attention_mask", "labels")}
    image_order = forward_order(model, image_batch)
    assert forward_order(model, text_batch) == image_order
    first_llm = next(i for i, n in enumerate(image_order) if n.startswith("llm."))
    assert image_order[0].startswith("visual_encoder.") and all(not n.startswith("llm.") for n in image_order[:first_llm])
