"""Model step overhead: vlmtune's LlavaModel vs transformers' LlavaForConditionalGeneration, forward + backward.

    python scripts/bench/bench_model_step.py [--batch-size 4] [--text-tokens 256] [--repeats 40] [--threads 1]

Both models hold the same tiny weights (ours built by `make_tiny` + `build_model`, fp32; transformers' Llava
loaded from our state dict through KEYMAP below, strictly: every key matched both ways) and train the same
parts (LLM + projector; CLIP frozen, as in LLaVA finetuning). Batch: B samples, each one image (576 patches)
+ T text tokens with the instruction half masked; ours gets the image as one IMAGE_TOKEN_INDEX id, transformers
gets it expanded to 576 `<image>` ids (what its processor feeds it). A step = forward (loss) + backward; the
two models alternate, `--repeats` steps each after warm-up; printed: the ratio of the fastest steps and the
median ratio of adjacent steps (target <= 1.05). `--profile` adds a per-stage breakdown of our step.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import transformers
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


def machine() -> str:
    """One line: platform, CPUs, threads, versions, load average."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{platform.platform()} | {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()} | "
            f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__} | "
            f"load average {load}")


def to_hf(ours, image_token_id: int) -> LlavaForConditionalGeneration:
    """transformers' Llava with our weights (every key mapped both ways) and the same trainable parts."""
    config = LlavaConfig(
        vision_config=ours.visual_encoder.config.to_dict(), text_config=ours.llm.config.to_dict(),
        image_token_index=image_token_id, vision_feature_layer=ours.visual_select_layer,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", multimodal_projector_bias=True,
        image_seq_length=PATCHES,
    )
    hf = LlavaForConditionalGeneration(config)
    state = {}
    for key, value in ours.state_dict().items():
        mine, theirs = next(rule for rule in KEYMAP if key.startswith(rule[0]))
        state[theirs + key[len(mine):]] = value.clone()
    hf.load_state_dict(state, strict=True)
    hf.model.vision_tower.requires_grad_(False)
    return hf.train()


def make_batch(B: int, T: int, vocab: int, image_token_id: int, gen: torch.Generator) -> tuple[dict, dict]:
    """(ours, transformers') inputs for the same B samples: [BOS, image, T-2 text ids]; loss on the second half."""
    text = torch.randint(10, vocab, (B, T - 2), generator=gen)
    ids = torch.cat([torch.ones(B, 1, dtype=torch.long), torch.full((B, 1), IMAGE_TOKEN_INDEX), text], 1)
    labels = ids.clone()
    labels[:, : T // 2] = IGNORE_INDEX
    pixels = torch.randn(B, 3, 336, 336, generator=gen)
    ours = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, pixel_values=pixels)
    hf_ids = torch.cat([ids[:, :1], torch.full((B, PATCHES), image_token_id), text], 1)
    hf_labels = torch.cat([labels[:, :1], torch.full((B, PATCHES), IGNORE_INDEX), labels[:, 2:]], 1)
    theirs = dict(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), labels=hf_labels, pixel_values=pixels)
    return ours, theirs


def step_ours(model, batch) -> float:
    """One forward + backward; returns the mean token loss (for the equality check)."""
    loss_sum, n = model(**batch)
    (loss_sum / n).backward()
    return float(loss_sum.detach() / n)


def step_hf(model, batch) -> float:
    loss = model(**batch).loss
    loss.backward()
    return float(loss.detach())


def timed(fn, model, batch) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss = fn(model, batch)
    return time.perf_counter() - start, loss


def profile_ours(model, batch, repeats: int) -> None:
    """Median time of each stage of our forward (no backward): CLIP, projector, splice, LLM, loss."""
    from vlmtune.model.llava import splice_image_features
    import torch.nn.functional as F

    stages: dict[str, list[float]] = {}

    def clock(name, fn):
        start = time.perf_counter()
        out = fn()
        stages.setdefault(name, []).append(time.perf_counter() - start)
        return out

    with torch.no_grad():
        for _ in range(repeats):
            px = batch["pixel_values"]
            hidden = clock("clip (all layers, hidden states)", lambda: model.visual_encoder(px, output_hidden_states=True))
            feats = clock("projector", lambda: model.projector(hidden.hidden_states[model.visual_select_layer][:, 1:]))
            embeds = clock("embed + splice", lambda: splice_image_features(
                model.llm.get_input_embeddings()(batch["input_ids"].clamp(min=0)), batch["input_ids"],
                batch["attention_mask"], batch["labels"], feats))
            logits = clock("llm", lambda: model.llm(inputs_embeds=embeds["inputs_embeds"], attention_mask=embeds["attention_mask"]).logits)
            clock("loss (fp32 cross-entropy)", lambda: F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), embeds["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"))
    total = sum(statistics.median(v) for v in stages.values())
    print("\nour forward, by stage (median, no grad):")
    for name, values in stages.items():
        print(f"  {name:34s} {statistics.median(values) * 1e3:8.2f} ms  {statistics.median(values) / total:6.1%}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=40, help="timed steps per model, alternating")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared machine)")
    parser.add_argument("--profile", action="store_true", help="also print a per-stage breakdown of our forward")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    print("machine:", machine())

    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny(tmp)
        tokenizer = load_tokenizer(str(tiny.llm))
        torch.manual_seed(0)
        cfg = ModelConfig(llm_name_or_path=str(tiny.llm), visual_encoder_name_or_path=str(tiny.clip),
                          torch_dtype="float32", freeze_llm=False, use_gradient_checkpointing=False)
        ours = build_model(cfg, for_training=False).train()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    hf = to_hf(ours, image_token_id)
    print(f"attention: ours {ours.llm.config._attn_implementation}, transformers {hf.config.text_config._attn_implementation}")
    batch, hf_batch = make_batch(args.batch_size, args.text_tokens, len(tokenizer), image_token_id, torch.Generator().manual_seed(0))
    print(f"batch: {args.batch_size} x ({args.text_tokens} text + {PATCHES} image tokens), fp32, LLM + projector trained")

    times = {"vlmtune": [], "transformers": []}
    losses = {}
    for i in range(args.warmup + args.repeats):
        for name, fn, model, b in (("vlmtune", step_ours, ours, batch), ("transformers", step_hf, hf, hf_batch)):
            seconds, losses[name] = timed(fn, model, b)
            if i >= args.warmup:
                times[name].append(seconds)
    grads_match = all(
        torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6)
        for p, q in ((ours.llm.lm_head.weight, hf.lm_head.weight),
                     (ours.projector.model[0].weight, hf.model.multi_modal_projector.linear_1.weight))
    )
    print(f"loss ours {losses['vlmtune']:.6f}, transformers {losses['transformers']:.6f}; gradients match: {grads_match}")
    for name, values in times.items():
        print(f"{name:13s} min {min(values) * 1e3:8.2f} ms/step, median {statistics.median(values) * 1e3:8.2f}, max {max(values) * 1e3:8.2f}")
    # On a shared machine other processes only add time: the minimum is the step's own cost, and the median
    # of the ratios of adjacent steps (run back to back) cancels slow drifts in load.
    ratio = min(times["vlmtune"]) / min(times["transformers"])
    paired = statistics.median(a / b for a, b in zip(times["vlmtune"], times["transformers"]))
    print(f"ratio vlmtune / transformers = {ratio:.3f} (min / min), {paired:.3f} (median of adjacent pairs)  "
          f"(target <= 1.05: {'met' if max(ratio, paired) <= 1.05 else 'NOT met'})")
    if args.profile:
        profile_ours(ours, batch, args.repeats)
    print("load average after:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0 if abs(losses["vlmtune"] - losses["transformers"]) < 1e-4 and grads_match else 1


if __name__ == "__main__":
    sys.exit(main())
