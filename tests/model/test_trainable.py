"""What trains in each LLaVA stage, TRL style: after ONE optimizer step, trainable weights changed and every
frozen weight is bit-for-bit what it was.

The step is plain torch AdamW on LlavaModel.forward's loss_sum / n_tokens over a real batch (1, 0 and 2
images). LoRA adapters are built with `init_lora_weights=False` (A and B both random): with peft's default
B = 0, A gets an exactly-zero gradient on the first step and could not show it trains.

CLIP's last layer never reaches the loss: LLaVA takes hidden_states[-2] (`visual_select_layer`), so its
LoRA weights (trainable, in LLaVA and XTuner too) get no gradient on image batches. The tests pin that set.
"""
from __future__ import annotations

import pytest
import torch

from vlmtune.model.build import build_model

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False)
INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values")


def one_step(model, batch):
    """Snapshot, one AdamW step; returns (before, after, trainable names with no gradient)."""
    model.train()
    before = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    loss_sum, n_tokens = model(**{k: batch[k] for k in INPUTS})
    (loss_sum / n_tokens).backward()
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    optimizer.step()
    after = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    return before, after, no_grad


def changed(before, after) -> set[str]:
    return {n for n in before if not torch.equal(before[n], after[n])}


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def last_clip_layer(model) -> str:
    return f"encoder.layers.{model.visual_encoder.config.num_hidden_layers - 1}."


def build(tiny_model_config, **overrides):
    torch.manual_seed(0)
    return build_model(tiny_model_config(**overrides))


def test_pretrain_changes_only_the_projector(tiny_model_config, tiny_batch):
    model = build(tiny_model_config)
    assert trainable(model) == {n for n, _ in model.projector.named_parameters(prefix="projector")}
    before, after, no_grad = one_step(model, tiny_batch)
    assert not no_grad
    assert changed(before, after) == trainable(model)


def test_lora_changes_adapters_and_projector_base_weights_stay(tiny_model_config, tiny_batch):
    model = build(tiny_model_config, llm_lora=LORA, visual_encoder_lora=LORA)
    names = trainable(model)
    llm_lora = {n for n in names if n.startswith("llm.") and ".lora_" in n}
    clip_lora = {n for n in names if n.startswith("visual_encoder.") and ".lora_" in n}
    projector = {n for n in names if n.startswith("projector.")}
    assert names == llm_lora | clip_lora | projector and llm_lora and clip_lora and len(projector) == 4
    assert not any("lm_head" in n for n in llm_lora)  # XTuner/peft all-linear: every linear but the head
    before, after, no_grad = one_step(model, tiny_batch)
    unused = {n for n in clip_lora if last_clip_layer(model) in n}
    assert unused and no_grad == unused
    assert changed(before, after) == names - unused


def test_qlora_changes_adapters_and_projector_4bit_base_untouched(tiny_model_config, tiny_batch):
    pytest.importorskip("bitsandbytes")
    model = build(tiny_model_config, quantization="4bit", llm_lora=LORA, visual_encoder_lora=LORA,
                  use_gradient_checkpointing=True)
    packed = {n for n, p in model.named_parameters() if n.startswith("llm.") and p.dtype == torch.uint8}
    assert len(packed) == 7 * model.llm.config.num_hidden_layers  # q k v o gate up down, nf4-packed
    names = trainable(model)
    assert names and all(".lora_" in n or n.startswith("projector.") for n in names)
    before, after, no_grad = one_step(model, tiny_batch)
    unused = {n for n in names if n.startswith("visual_encoder.") and last_clip_layer(model) in n}
    assert no_grad == unused
    assert changed(before, after) == names - unused
    assert all(torch.equal(before[n], after[n]) for n in packed)


def test_full_finetune_changes_every_llm_tensor_clip_frozen(tiny_model_config, tiny_batch):
    model = build(tiny_model_config, freeze_llm=False)
    names = trainable(model)
    llm = {n for n, _ in model.llm.named_parameters(prefix="llm")}
    assert names == llm | {n for n in names if n.startswith("projector.")}
    before, after, no_grad = one_step(model, tiny_batch)
    assert not no_grad
    assert changed(before, after) == names  # embed_tokens changes in the rows the batch uses
    assert not any(n.startswith("visual_encoder.") for n in changed(before, after))


def test_lora_over_a_frozen_llm_trains_the_same_with_gradient_checkpointing(tiny_model_config, tiny_batch):
    """Non-reentrant checkpointing (model/build.py) needs no enable_input_require_grads: with the LLM frozen
    (plain LoRA, no k-bit preparation) the adapters and the projector get the gradients, and the step, of a run
    without checkpointing."""
    steps = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build(tiny_model_config, llm_lora=LORA, visual_encoder_lora=LORA, use_gradient_checkpointing=checkpointing)
        assert model.llm.is_gradient_checkpointing == checkpointing
        steps.append(one_step(model, tiny_batch))
    (before, plain, _), (_, checkpointed, no_grad) = steps
    names = trainable(model)
    assert changed(before, checkpointed) == changed(before, plain) == names - no_grad and len(names - no_grad) > 10
    assert all(torch.allclose(plain[n], checkpointed[n], rtol=0, atol=1e-6) for n in names)
