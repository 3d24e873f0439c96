"""Model step overhead: vlmtune's LlavaModel vs transformers' LlavaForConditionalGeneration, forward + backward.

    python scripts/bench/bench_model_step.py [--batch-size 4] [--text-tokens 256] [--repeats 40] [--threads 1] [--profile]

Both models hold the same tiny weights (ours built by `make_tiny` + `build_model`, fp32; transformers' Llava
loaded from our state dict through KEYMAP below, strictly: every key matched both ways) and train the same
parts (LLM + projector; CLIP frozen, as in LLaVA finetuning). Batch: B samples, each one image (576 patches)
+ T text tokens with the instruction half masked; ours gets the image as one IMAGE_TOKEN_INDEX id, transformers
gets it expanded to 576 `<image>` ids (what its processor feeds it). A step = forward (loss) + backward.

Three variants run in the same interleaved rounds (the order rotated each round: scripts/bench/_common.py):
- vlmtune target-only: the default, the LM head only at positions that predict a target (`logits_to_keep`,
  `LlavaModel.transformers_llm`);
- vlmtune full logits: the same model with `transformers_llm = False`: logits at every position `[:, :-1]`,
  the work transformers' Llava does;
- transformers: LlavaForConditionalGeneration (full logits).
Printed, each as the median of per-round ratios with min-max and IQR: (a) the overhead, vlmtune full logits /
transformers, the same work (target <= 1.05); (b) the target-only saving, target-only / full logits, the same
model; and, labelled as different work, target-only / transformers. Before timing, the loss and every
gradient of both vlmtune variants are checked against transformers' (the tolerances are printed; exit 1 on a
mismatch). `--profile` adds a per-stage breakdown of the timed step (forward + backward) of both variants.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch
from _common import footer, header, interleave, ratios, spread
from transformers import LlavaConfig, LlavaForConditionalGeneration

from vlmtune.config import ModelConfig
from vlmtune.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vlmtune.model.build import build_model, load_tokenizer
from vlmtune.tiny import make_tiny

PATCHES = 576
# our prefix -> LlavaForConditionalGeneration's in-memory prefix (transformers 5), first match wins
KEYMAP = (
    ("llm.model.", "model.language_model."), ("llm.lm_head.", "lm_head."), ("visual_encoder.", "model.vision_tower."),
    ("projector.model.0.", "model.multi_modal_projector.linear_1."),
    ("projector.model.2.", "model.multi_modal_projector.linear_2."),
)
LOSS_RTOL = 1e-5  # |loss ours - loss transformers| <= LOSS_RTOL * |loss transformers|
GRAD_RTOL = 1e-4  # per tensor: max |g ours - g transformers| <= GRAD_RTOL * max |g transformers| (fp32, other op order)
VARIANTS = {"vlmtune target-only": True, "vlmtune full logits": False}  # name -> model.transformers_llm


def hf_name(key: str) -> str:
    """Our parameter name -> the same tensor's name in transformers' Llava."""
    mine, theirs = next(rule for rule in KEYMAP if key.startswith(rule[0]))
    return theirs + key[len(mine):]


def to_hf(ours, image_token_id: int) -> LlavaForConditionalGeneration:
    """transformers' Llava with our weights (every key mapped both ways) and the same trainable parts."""
    config = LlavaConfig(
        vision_config=ours.visual_encoder.config.to_dict(), text_config=ours.llm.config.to_dict(),
        image_token_index=image_token_id, vision_feature_layer=ours.visual_select_layer,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", multimodal_projector_bias=True,
        image_seq_length=PATCHES,
    )
    hf = LlavaForConditionalGeneration(config)
    hf.load_state_dict({hf_name(k): v.clone() for k, v in ours.state_dict().items()}, strict=True)
    hf.model.vision_tower.requires_grad_(False)
    return hf.train()


def make_batch(B: int, T: int, vocab: int, image_token_id: int, gen: torch.Generator) -> tuple[dict, dict]:
    """(ours, transformers') inputs for the same B samples: [BOS, image, T-2 text ids]; loss on the second half."""
    text = torch.randint(10, vocab, (B, T - 2), generator=gen)
    ids = torch.cat([torch.ones(B, 1, dtype=torch.long), torch.full((B, 1), IMAGE_TOKEN_INDEX), text], 1)
    labels = ids.clone()
    labels[:, : T // 2] = IGNORE_INDEX
    pixels = torch.randn(B, 3, 336, 336, generator=gen)
    ours = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": pixels}
    hf_ids = torch.cat([ids[:, :1], torch.full((B, PATCHES), image_token_id), text], 1)
    hf_labels = torch.cat([labels[:, :1], torch.full((B, PATCHES), IGNORE_INDEX), labels[:, 2:]], 1)
    theirs = {"input_ids": hf_ids, "attention_mask": torch.ones_like(hf_ids), "labels": hf_labels, "pixel_values": pixels}
    return ours, theirs


def step_ours(model, batch, target_only: bool) -> float:
    """One forward + backward of one vlmtune variant; returns the mean token loss."""
    model.transformers_llm = target_only
    loss_sum, n = model(**batch)
    (loss_sum / n).backward()
    return float(loss_sum.detach() / n)


def step_hf(model, batch) -> float:
    """One forward + backward of transformers' Llava; returns its (mean token) loss."""
    loss = model(**batch).loss
    loss.backward()
    return float(loss.detach())


def timed(step, model) -> float:
    """Seconds of one step, gradients cleared first (outside the clock)."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def grads(model, rename=lambda k: k) -> dict[str, torch.Tensor]:
    """Every gradient the last step left, by (renamed) parameter name."""
    return {rename(k): p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def check(ours, hf, batch, hf_batch) -> bool:
    """Loss and ALL gradients of both vlmtune variants vs transformers' Llava, within LOSS_RTOL / GRAD_RTOL."""
    hf.zero_grad(set_to_none=True)
    ref_loss, ref = step_hf(hf, hf_batch), grads(hf)
    ok = True
    for name, target_only in VARIANTS.items():
        ours.zero_grad(set_to_none=True)
        loss, mine = step_ours(ours, batch, target_only), grads(ours, hf_name)
        errors = {k: float((mine[k] - ref[k]).abs().max() / ref[k].abs().max().clamp(min=1e-30))
                  for k in ref.keys() & mine.keys()}
        worst = max(errors, key=errors.get)
        same = (mine.keys() == ref.keys() and errors[worst] <= GRAD_RTOL
                and abs(loss - ref_loss) <= LOSS_RTOL * abs(ref_loss))
        print(f"check {name}: loss {loss:.7f} vs transformers {ref_loss:.7f} (tolerance {LOSS_RTOL:g} relative); "
              f"{len(mine)} gradients vs {len(ref)} ({len(mine.keys() ^ ref.keys())} present on one side only), "
              f"largest error {errors[worst]:.1e} of the tensor's max |grad| ({worst}; tolerance {GRAD_RTOL:g}): "
              f"{'match' if same else 'MISMATCH'}")
        ok = ok and same
    return ok


def profile(model, batch, repeats: int) -> None:
    """Where the timed step's time goes, for both vlmtune variants (medians, alternating steps): forward hooks
    time CLIP, the projector, the LLM and, inside it, the LM head; the rest of the forward is the embedding,
    splice and loss; the backward is timed whole. The hooks add a few microseconds per module call."""
    parts = {"clip (all layers, hidden states)": model.visual_encoder, "projector": model.projector,
             "llm (incl. LM head)": model.llm, "  of which LM head": model.llm.lm_head}
    stamp: dict[str, float] = {}
    handles = [h for name, m in parts.items() for h in (
        m.register_forward_pre_hook(lambda *_, n=name: stamp.__setitem__(n, time.perf_counter())),
        m.register_forward_hook(lambda *_, n=name: stamp.__setitem__(n, time.perf_counter() - stamp[n])))]
    stages = {v: {} for v in VARIANTS}
    for _ in range(repeats):
        for variant, target_only in VARIANTS.items():
            model.zero_grad(set_to_none=True)
            model.transformers_llm = target_only
            t0 = time.perf_counter()
            loss_sum, n = model(**batch)
            t1 = time.perf_counter()
            (loss_sum / n).backward()
            row = {**stamp, "embed + splice + loss": t1 - t0 - sum(stamp[k] for k in list(parts)[:3]),
                   "backward": time.perf_counter() - t1, "step": time.perf_counter() - t0}
            for k, v in row.items():
                stages[variant].setdefault(k, []).append(v)
    for h in handles:
        h.remove()
    print("\nthe timed step by stage (median ms, share of the step):")
    print(f"  {'':38s}" + "".join(f"{v:>27s}" for v in VARIANTS))
    for stage in stages["vlmtune full logits"]:
        cells = (statistics.median(stages[v][stage]) / statistics.median(stages[v]["step"]) for v in VARIANTS)
        ms = (statistics.median(stages[v][stage]) * 1e3 for v in VARIANTS)
        print(f"  {stage:38s}" + "".join(f"{m:17.2f} ms {c:6.1%}" for m, c in zip(ms, cells)))


def setup(args):
    """Our tiny model (fp32, LLM + projector trained), transformers' copy of it and the two batches."""
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny(tmp)
        tokenizer = load_tokenizer(str(tiny.llm))
        torch.manual_seed(0)
        cfg = ModelConfig(llm_name_or_path=str(tiny.llm), visual_encoder_name_or_path=str(tiny.clip),
                          torch_dtype="float32", freeze_llm=False, use_gradient_checkpointing=False)
        ours = build_model(cfg, for_training=False).train()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    hf = to_hf(ours, image_token_id)
    gen = torch.Generator().manual_seed(0)
    return ours, hf, *make_batch(args.batch_size, args.text_tokens, len(tokenizer), image_token_id, gen)


def report(times: dict[str, list[float]]) -> bool:
    """Per-variant step times, then the per-round ratios; True when the same-work overhead meets 1.05."""
    for name, values in times.items():
        print(f"{name:20s} min {min(values) * 1e3:8.2f} ms/step, median {statistics.median(values) * 1e3:8.2f}, "
              f"max {max(values) * 1e3:8.2f}")
    full, target, hf = times["vlmtune full logits"], times["vlmtune target-only"], times["transformers"]
    overhead = ratios(full, hf)
    met = statistics.median(overhead) <= 1.05
    print(f"(a) overhead, same work: vlmtune full logits / transformers = {spread(overhead)}  "
          f"(target <= 1.05: {'met' if met else 'NOT met'})")
    print(f"(b) target-only saving: vlmtune target-only / full logits = {spread(ratios(target, full))}  (this tiny "
          f"model and batch only: its saving grows with the vocabulary and the share of positions without targets)")
    print(f"    different work, for reference: vlmtune target-only / transformers = {spread(ratios(target, hf))}")
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=40, help="timed rounds (each: one step of every variant)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared machine)")
    parser.add_argument("--profile", action="store_true", help="also print a per-stage breakdown of both vlmtune steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header(("torch", "transformers"), f"torch threads {torch.get_num_threads()}")

    ours, hf, batch, hf_batch = setup(args)
    print(f"attention: ours {ours.llm.config._attn_implementation}, transformers {hf.config.text_config._attn_implementation}")
    print(f"batch: {args.batch_size} x ({args.text_tokens} text + {PATCHES} image tokens), fp32, LLM + projector "
          f"trained, targets on the last {args.text_tokens - args.text_tokens // 2} text positions")
    matched = check(ours, hf, batch, hf_batch)
    variants = {name: (lambda t=t: timed(lambda: step_ours(ours, batch, t), ours)) for name, t in VARIANTS.items()}
    variants["transformers"] = lambda: timed(lambda: step_hf(hf, hf_batch), hf)
    report(interleave(variants, args.repeats, args.warmup))
    if args.profile:
        profile(ours, batch, args.repeats)
    ours.transformers_llm = True  # leave the model as built
    footer()
    return 0 if matched else 1


if __name__ == "__main__":
    sys.exit(main())
