"""GPU throughput and MFU of a real-sized LLaVA, packing off vs on, through `vlmtune train` itself.

    python scripts/bench/bench_gpu_mfu.py [--steps 30] [--batch-size 8] [--deepspeed deepspeed_zero2] [--attn-implementation flash_attention_2]
    python scripts/bench/bench_gpu_mfu.py --tiny --steps 6      # the same plumbing on CPU with the tiny models

Builds, with random weights and offline: CLIP-L/336 (24 layers, 1024 wide, 577 tokens per image) and a
Qwen2-1.5B-shaped LLM (28 layers, 1536 wide, vocab 151,936), saved in bf16 and loaded back by the users' path.
Writes a synthetic LLaVA finetune set (real photos padded to 640x480 JPEGs, 1-3 turns, ~250-900 text tokens)
and a config training the projector + the whole LLM (CLIP frozen; bf16; gradient checkpointing; ZeRO-2),
then runs `vlmtune train` twice: padded, length-grouped batches and `pack_to_max_length`. Throughput is read
from the run's own train_log.jsonl (real, non-pad tokens incl. image tokens, after the first third of steps).

MFU = achieved model FLOP/s / peak dense bf16 FLOP/s of the GPU (H100/H200 SXM: 989.4 TFLOP/s).
Model FLOPs per step (recomputation by checkpointing not counted, as usual):
    LLM, trained:          6 * N_llm * T + 6 * L * d * T * s_eff   (causal attention; s_eff = sum(s_i^2) / T
                           over the samples' expanded lengths s_i: packing keeps attention within a sample)
    projector, trained:    6 * N_proj * T_img
    CLIP, frozen forward:  2 * N_clip * T_clip + 4 * L_v * d_v * T_clip * 577
with T = real LLM tokens, T_img = image tokens (576 per image), T_clip = 577 per image. N_llm counts every
LLM weight but the input embedding (a lookup, no FLOPs). Never part of CI.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
LOREM = ("The photo shows a scene with several objects arranged on a table near a window while people walk by "
         "outside and the light changes through the afternoon ").split()


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.platform()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}")


def build_models(root: Path, tiny: bool) -> tuple[Path, Path]:
    """(llm folder, clip folder): real-sized random models in bf16, or the tiny ones."""
    from vlmtune.tiny import make_clip, make_tiny, make_tokenizer

    if tiny:
        paths = make_tiny(root / "tiny")
        return paths.llm, paths.clip
    from transformers import AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, Qwen2Config

    tokenizer = make_tokenizer()
    llm_cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                          num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    llm = AutoModelForCausalLM.from_config(llm_cfg, dtype=torch.bfloat16)
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    _, processor = make_clip()
    clip = CLIPVisionModel(CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                            num_hidden_layers=24, num_attention_heads=16, projection_dim=768)).to(torch.bfloat16)
    clip.save_pretrained(root / "clip")
    processor.save_pretrained(root / "clip")
    return root / "llm", root / "clip"


def write_data(root: Path, records: int, seed: int = 0) -> Path:
    """Synthetic finetune JSON over a few real photos saved as 640x480 JPEGs."""
    import skimage.data as skd
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        image = Image.fromarray(getattr(skd, name)()).convert("RGB").resize((640, 480))
        image.save(root / "images" / f"{name}.jpg", quality=90)
        names.append(f"images/{name}.jpg")
    out = []
    for i in range(records):
        turns = []
        for t in range(int(rng.integers(1, 4))):
            question = " ".join(rng.choice(LOREM, int(rng.integers(10, 40))))
            answer = " ".join(rng.choice(LOREM, int(rng.integers(60, 250))))
            turns += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + question}, {"from": "gpt", "value": answer}]
        out.append({"id": str(i), "image": names[i % len(names)], "conversations": turns})
    path = root / "data.json"
    path.write_text(json.dumps(out))
    return path


def write_config(root: Path, llm: Path, clip: Path, data: Path, args, packing: bool) -> Path:
    values = dict(
        llm_name_or_path=str(llm), visual_encoder_name_or_path=str(clip), data_path=str(data), image_folder=str(data.parent),
        prompt_template="qwen_chat", max_length=2048, freeze_llm=False, freeze_visual_encoder=True,
        torch_dtype="float32" if args.tiny else "bfloat16", use_gradient_checkpointing=not args.tiny,
        pad_image_to_square=True, group_by_length=True, pack_to_max_length=packing,
        max_packed_length=args.batch_size * 2048 if packing else None, batch_size=args.batch_size,
        max_steps=args.steps, lr=2e-5, save_steps=10**9, logging_interval=1, evaluation_freq=10**9,
        dataloader_num_workers=args.workers, cache_dir=str(root / "cache"), attn_implementation=args.attn_implementation,
    )
    path = root / f"bench_{'packed' if packing else 'padded'}.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in values.items()))
    return path


def param_counts(llm: Path, clip: Path) -> dict:
    """Parameter counts and shapes for the FLOP formula (read from the saved configs)."""
    from transformers import AutoConfig

    lc, vc = AutoConfig.from_pretrained(llm), AutoConfig.from_pretrained(clip)
    d, L, ff, V = lc.hidden_size, lc.num_hidden_layers, lc.intermediate_size, lc.vocab_size
    kv = d // lc.num_attention_heads * lc.num_key_value_heads
    n_llm = L * (d * d * 2 + 2 * d * kv + 3 * d * ff) + d * V  # attention + MLP + LM head
    dv, Lv, ffv = vc.hidden_size, vc.num_hidden_layers, vc.intermediate_size
    return dict(n_llm=n_llm, L=L, d=d, n_clip=Lv * (4 * dv * dv + 2 * dv * ffv), Lv=Lv, dv=dv,
                n_proj=dv * d + d * d)


def measure(cfg: Path, work: Path, args) -> dict:
    """Run `vlmtune train` and return mean tokens/s, samples/s and step time after the first third."""
    cmd = [sys.executable, "-m", "vlmtune", "train", str(cfg), "--deepspeed", args.deepspeed, "--work-dir", str(work)]
    print("  $", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    rows = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
    rows = rows[len(rows) // 3:]
    return {k: float(np.mean([r[k] for r in rows])) for k in ("tokens_per_s", "samples_per_s", "peak_mem_gb")}


def mfu(result: dict, counts: dict, seq_eff: float, image_frac: float, peak_tflops: float | None) -> float | None:
    """Model FLOP/s over peak, per the formula in the module docstring (T = tokens_per_s of one second)."""
    T = result["tokens_per_s"] / max(1, torch.cuda.device_count() if torch.cuda.is_available() else 1)
    t_img = T * image_frac
    t_clip = t_img / 576 * 577
    flops = (6 * counts["n_llm"] * T + 6 * counts["L"] * counts["d"] * T * seq_eff + 6 * counts["n_proj"] * t_img
             + 2 * counts["n_clip"] * t_clip + 4 * counts["Lv"] * counts["dv"] * t_clip * 577)
    return None if peak_tflops is None else flops / (peak_tflops * 1e12)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--deepspeed", default="deepspeed_zero2")
    p.add_argument("--attn-implementation", help="the LLM's attention (config key attn_implementation); packing wants "
                   "flash_attention_2 or flex_attention on a GPU (default: transformers' sdpa)")
    p.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s (default: from the GPU's name)")
    p.add_argument("--tiny", action="store_true", help="tiny models on CPU: checks the plumbing, no MFU")
    p.add_argument("--work", help="keep everything here (default: a temporary folder)")
    args = p.parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print("machine:", machine())
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if torch.cuda.is_available()
                                     and k in torch.cuda.get_device_name(0)), None)
    root = Path(args.work or tempfile.mkdtemp(prefix="vlmtune_mfu_"))
    llm, clip = build_models(root, args.tiny)
    data = write_data(root / "data", args.records)
    counts = param_counts(llm, clip)
    results = {}
    for packing in (False, True):
        name = "packed" if packing else "padded"
        results[name] = measure(write_config(root, llm, clip, data, args, packing), root / f"run_{name}", args)
    lengths = _lengths(root / "cache")
    seq_eff = float((lengths.astype(np.float64) ** 2).sum() / lengths.sum())
    image_frac = 576 * 1.0 / float(lengths.mean())  # one image per record
    print(f"LLM {counts['n_llm'] / 1e9:.2f}B (no embedding), CLIP {counts['n_clip'] / 1e6:.0f}M, projector "
          f"{counts['n_proj'] / 1e6:.1f}M; mean sequence {lengths.mean():.0f} tokens, s_eff {seq_eff:.0f}; peak {peak} TFLOP/s")
    for name, r in results.items():
        m = mfu(r, counts, seq_eff, image_frac, peak)
        print(f"{name:7s} tokens/s/GPU {r['tokens_per_s']:10.1f}  samples/s {r['samples_per_s']:7.2f}  "
              f"peak mem {r['peak_mem_gb']:.1f} GB  MFU {'n/a' if m is None else f'{100 * m:.1f}%'}")
    print(f"packed / padded tokens/s: {results['packed']['tokens_per_s'] / results['padded']['tokens_per_s']:.2f}x")


def _lengths(cache: Path) -> np.ndarray:
    """Exact expanded lengths of the records, from the token table the packed run built (the padded run's
    lazy table holds estimates)."""
    import pyarrow as pa

    for path in cache.rglob("table.arrow"):  # vlmtune/data/table.py writes Arrow IPC streams
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
        if "input_ids" in table.column_names:
            return table.column("length").to_numpy()
    raise SystemExit(f"no token table under {cache}")


if __name__ == "__main__":
    main()
