"""ZeRO-3 and the other DeepSpeed stages for real: 2 CPU ranks (gloo), through the CLI (issue 17), and resuming
on another number of ranks.

ZeRO-3 partitions every parameter, the frozen LLM and CLIP included, so what it must get right differs from
ZeRO-2: gathering the frozen weights for each forward on every rank, the blank-image term of text-only
batches (the mixed multi-image recipe has text-only records), saving gathered iter_N.pth files, and a
`.ds` folder whose weights are split across the ranks' files (read by DeepSpeed's zero_to_fp32 through the
weights-only loader: vlmtune/weights.py).
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from test_train import (RUN_TIMEOUT, assert_none_left, assert_ok, max_rel_diff, records, resumed_step, run_train,
                        train_cmd, train_env, two_ranks, wait_for, weights)

from vlmtune.cli import main as cli
from vlmtune.weights import load_trained_weights

pytestmark = pytest.mark.e2e
OPTIONS = dict(max_steps=4, save_steps=1, save_total_limit=0, warmup_ratio=0.25, logging_interval=1,
               evaluation_freq=1000, group_by_length=False, record_sample_ids=True)
RECIPES = {"lora": "tiny_llava_multi_image_task_finetune_lora", "full": "tiny_llava_task_finetune_full"}
# ZeRO-3 reduce-scatters gradients where ZeRO-2 all-reduces them, summing in another order: the gradients agree
# to fp32 rounding, not bit for bit, and Adam (m / sqrt(v)) magnifies that where a gradient is near zero. Largest
# relative difference of a tensor after 4 steps, measured: 5.9e-4 (LoRA: a k_proj lora_A); losses agree to 1e-6.
ZERO3_RTOL = 2e-3
LOSS_RTOL = 1e-5
# An attention key bias adds the same q . b to every score of a query, which softmax ignores: its gradient is 0
# up to rounding (~1e-10), and Adam turns that noise into steps of ~lr in either direction. Those tensors are
# compared for staying noise (tiny), not for equality.
ZERO_GRADIENT = ".self_attn.k_proj.bias"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    """run(stage, recipe) -> work dir of a 4-step 2-rank run under deepspeed_<stage>, each run once."""
    root, done = tmp_path_factory.mktemp("stages"), {}

    def run(stage: str, recipe: str, ranks: int = 2):
        """`ranks` 1 accumulates 2 micro-batches: the same global batch as 2 ranks."""
        if (stage, recipe, ranks) not in done:
            work_dir = root / f"{recipe}-{stage}-{ranks}"
            options, launch = (OPTIONS, two_ranks()) if ranks == 2 else (dict(OPTIONS, accumulative_counts=2), {})
            assert_ok(run_train(RECIPES[recipe], work_dir, options, "--deepspeed", f"deepspeed_{stage}", **launch))
            done[stage, recipe, ranks] = work_dir
        return done[stage, recipe, ranks]

    return run


# the full finetune's comparison runs with --slow (CI keeps LoRA's, and the full finetune's ZeRO-3 folder test below)
@pytest.mark.parametrize("recipe", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_zero3_trains_the_weights_zero2_trains(trained, recipe):
    """Same seed and data: after 4 steps every trained tensor under ZeRO-3 equals ZeRO-2's within fp32 rounding
    (LoRA over a frozen, partitioned LLM and CLIP with text-only batches; the whole LLM and CLIP)."""
    zero2, zero3 = weights(trained("zero2", recipe), 4), weights(trained("zero3", recipe), 4)
    losses = [records(trained(stage, recipe)) for stage in ("zero2", "zero3")]
    for step in range(1, 5):
        assert losses[1][step]["loss"] == pytest.approx(losses[0][step]["loss"], rel=LOSS_RTOL), step
    first = weights(trained("zero2", recipe), 1)
    assert max_rel_diff(zero2, first) > 1e-3  # the comparison is over weights that moved
    noise = [k for k in zero2 if k.endswith(ZERO_GRADIENT)]
    assert all(max(zero2[k].abs().max(), zero3[k].abs().max()) < 1e-3 for k in noise)
    zero2, zero3 = ({k: v for k, v in w.items() if k not in noise} for w in (zero2, zero3))
    diff = max_rel_diff(zero3, zero2)
    print(f"\nZeRO-3 vs ZeRO-2, {recipe}: max relative difference {diff:.2e} over {len(zero2)} tensors")
    assert diff <= ZERO3_RTOL


def test_a_zero3_folder_reads_as_its_pth_and_converts(trained, tmp_path, capsys):
    """The iter_N.ds folder of a ZeRO-3 run (a shard per rank) gives the trained weights of iter_N.pth (gathered
    at save), and `convert pth_to_hf` takes either."""
    work_dir = trained("zero3", "full")
    from_folder, config = load_trained_weights(work_dir / "iter_4.ds")
    from_pth, _ = load_trained_weights(work_dir / "iter_4.pth")
    assert config is not None and from_folder.keys() == from_pth.keys() and len(from_pth) > 20
    assert all(torch.equal(from_folder[k].to(from_pth[k].dtype), from_pth[k]) for k in from_pth)
    for source in ("iter_4.ds", "iter_4.pth"):
        assert cli(["convert", "pth_to_hf", str(work_dir / source), str(tmp_path / source)]) == 0
    assert "saved xtuner layout" in capsys.readouterr().out


def test_zero3_killed_with_sigkill_resumes_exactly(trained, tmp_path):
    reference = trained("zero3", "lora")
    work_dir = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(RECIPES["lora"], work_dir, OPTIONS, "--deepspeed", "deepspeed_zero3"),
                            env=train_env(**two_ranks()), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for(work_dir / "iter_2.pth", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert_none_left(work_dir)
    assert_ok(run_train(RECIPES["lora"], work_dir, OPTIONS, "--deepspeed", "deepspeed_zero3", "--resume", "auto",
                        **two_ranks()))
    assert 2 <= resumed_step(work_dir) < 4
    assert max_rel_diff(weights(work_dir, 4), weights(reference, 4)) <= 1e-5


def test_qlora_under_zero3_is_refused_before_launch(tiny, tmp_path):
    """bitsandbytes cannot use 4-bit weights ZeRO-3 has partitioned: one line naming the stages that work,
    before torchrun starts (no rank ever runs)."""
    work_dir = tmp_path / "qlora3"
    for stage in ("deepspeed_zero3", "deepspeed_zero3_offload"):
        proc = subprocess.run(train_cmd("tiny_llava_task_finetune_qlora", work_dir, {"max_steps": 1}, "--deepspeed", stage),
                              env=train_env(**two_ranks()), capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert proc.returncode == 2
        (line,) = proc.stderr.strip().splitlines()
        assert "quantization='4bit'" in line and "deepspeed_zero2" in line and stage in line
        assert not work_dir.exists()


STAGES = ["zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"]
MATRIX = {"pretrain": "tiny_llava_task_pretrain", "lora": "tiny_llava_task_finetune_lora",
          "full": "tiny_llava_task_finetune_full"}


@pytest.mark.slow  # 15 runs of ~12 s: `bash scripts/test.sh --slow` (zero2 and zero3 run in CI above)
@pytest.mark.parametrize("recipe", list(MATRIX))
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_trains_every_recipe(stage, recipe, tiny, tmp_path):
    """Each shipped DeepSpeed stage (the offload ones build DeepSpeed's cpu_adam and run with pin_memory off on
    CPU) trains the pretrain, the LoRA and the full finetune for 2 steps on 2 ranks: finite losses, and an
    iter_2.pth holding every trained parameter of the model, moved from step 1."""
    from vlmtune.config import load_config
    from vlmtune.model.build import build_model

    options = dict(OPTIONS, max_steps=2)
    assert_ok(run_train(MATRIX[recipe], tmp_path, options, "--deepspeed", f"deepspeed_{stage}", **two_ranks()))
    log = records(tmp_path)
    assert sorted(log) == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in log.values())
    model = build_model(load_config(MATRIX[recipe]).model, for_training=True)
    trained = {k for k, p in model.named_parameters() if p.requires_grad}
    first, last = weights(tmp_path, 1), weights(tmp_path, 2)
    assert trained == set(last) and max_rel_diff(last, first) > 0


# ---- resume on another number of ranks: the checkpoint of step 2 moves to a fresh work dir (a preempted job's
# checkpoints on a new allocation) and the run ends there on the other number of ranks -------------------------
# The gradients are the same sums in another order (accumulated on one rank vs reduced over two), so the weights
# agree to fp32 rounding as Adam magnifies it (see ZERO3_RTOL). Largest relative difference of a trained tensor at
# step 4 from the uninterrupted run (ZERO_GRADIENT noise aside), measured: multi-image LoRA 2.2e-5 (ZeRO-2 2->1, a
# k_proj lora_A; the other tensors <= 6.3e-6); on the single-image LoRA recipe 5.6e-7 to 3.1e-6 across ZeRO-1/2/3,
# offload, 2->1 and 1->2; full finetune 2.2e-7.
WORLD_RTOL = 1e-4
WORLD_CHANGES = [
    ("zero2", "lora", 2, 1), ("zero3", "lora", 1, 2),
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [
        ("zero3", "lora", 2, 1), ("zero2", "lora", 1, 2), ("zero1", "lora", 2, 1), ("zero2_offload", "lora", 2, 1),
        ("zero3_offload", "lora", 1, 2), ("zero2", "full", 2, 1), ("zero3", "full", 1, 2)]),
]


def step_samples(work_dir) -> dict[int, collections.Counter]:
    """sample_ids.jsonl by step: the samples of the whole global batch (the latest line of a step wins)."""
    lines = map(json.loads, (work_dir / "sample_ids.jsonl").read_text().splitlines())
    return {r["step"]: collections.Counter(r["ids"]) for r in lines}


def moved(reference, work_dir, step: int = 2):
    """`reference`'s checkpoint of `step`, and its sample log up to it, copied into a fresh work dir."""
    work_dir.mkdir()
    shutil.copy(reference / f"iter_{step}.pth", work_dir)
    shutil.copytree(reference / f"iter_{step}.ds", work_dir / f"iter_{step}.ds")
    log = (reference / "sample_ids.jsonl").read_text().splitlines()
    (work_dir / "sample_ids.jsonl").write_text("".join(line + "\n" for line in log[:step]))
    return work_dir


@pytest.mark.parametrize("stage,recipe,before,after", WORLD_CHANGES)
def test_a_run_resumed_on_another_number_of_ranks_ends_where_the_uninterrupted_one_does(trained, tmp_path, stage,
                                                                                          recipe, before, after):
    """Saved on `before` ranks, resumed on `after`: accumulative_counts rescales to keep the global batch, the
    optimizer state is re-sharded through DeepSpeed's universal checkpoint, and every step trains the same samples
    as the uninterrupted run; the weights agree to WORLD_RTOL, the losses of steps 3 and 4 to LOSS_RTOL."""
    reference = trained(stage, recipe, before)
    work_dir = moved(reference, tmp_path / "moved")
    accumulation = 3 - before  # the reference's own config: 1 on 2 ranks, 2 on 1
    assert_ok(run_train(RECIPES[recipe], work_dir, dict(OPTIONS, accumulative_counts=accumulation), "--deepspeed",
                        f"deepspeed_{stage}", "--resume", "auto", **(two_ranks() if after == 2 else {})))
    log = (work_dir / "train.log").read_text()
    assert f"accumulative_counts {accumulation} -> {3 - after} keeps its global batch" in log
    assert "at step 2 (iter_2.universal)" in log and (work_dir / "iter_2.universal" / "ckpt" / "zero").is_dir()
    assert sorted(step_samples(work_dir)) == [1, 2, 3, 4] and step_samples(work_dir) == step_samples(reference)
    for step in (3, 4):
        assert records(work_dir)[step]["loss"] == pytest.approx(records(reference)[step]["loss"], rel=LOSS_RTOL)
    ours, theirs = weights(work_dir, 4), weights(reference, 4)
    noise = [k for k in theirs if k.endswith(ZERO_GRADIENT)]
    assert all(max(ours[k].abs().max(), theirs[k].abs().max()) < 1e-3 for k in noise)
    ours, theirs, saved = ({k: v for k, v in w.items() if k not in noise} for w in (ours, theirs, weights(reference, 2)))
    assert max_rel_diff(theirs, saved) > 1e-3  # steps 3 and 4 moved the weights
    diff = max_rel_diff(ours, theirs)
    print(f"\n{stage} {recipe} {before} -> {after} ranks: max relative difference {diff:.2e}")
    assert diff <= WORLD_RTOL


def test_a_global_batch_the_new_ranks_cannot_keep_is_one_line_before_torchrun(trained, tmp_path):
    """8 samples per step saved on 2 ranks of batch 4 cannot be made by 3 ranks: exit 2, one line naming the
    checkpoint and the numbers of ranks that work, and no rank started."""
    work_dir = moved(trained("zero2", "lora"), tmp_path / "moved")
    proc = subprocess.run(train_cmd(RECIPES["lora"], work_dir, OPTIONS, "--deepspeed", "deepspeed_zero2", "--resume",
                                    "auto"), env=train_env(NPROC_PER_NODE=3), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert str(work_dir / "iter_2.pth") in line and "global batch is 8 samples" in line and "resume on 1 or 2 rank(s)" in line
    assert not (work_dir / "train.log").exists()


@pytest.mark.parametrize("options,expected", [
    ({"visual_encoder_lora": None}, "24 in it but not trained here (e.g. visual_encoder.base_model.model.encoder."),
    ({"llm_lora.r": 4}, "of other shapes (e.g. llm.base_model.model.model.layers.0."),
])
def test_a_checkpoint_of_other_trained_parameters_is_one_line_before_torchrun(trained, tmp_path, options, expected):
    """DeepSpeed's module load is not strict (frozen weights are not saved): a checkpoint missing a parameter the
    config trains would leave it fresh without a word, and one of other shapes failed in a traceback per rank."""
    work_dir = moved(trained("zero2", "lora"), tmp_path / "moved")
    proc = subprocess.run(train_cmd(RECIPES["lora"], work_dir, {**OPTIONS, **options}, "--deepspeed", "deepspeed_zero2",
                                    "--resume", "auto"), env=train_env(**two_ranks()), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert "it trained other parameters than this config does" in line and expected in line
    assert not (work_dir / "train.log").exists()


@pytest.mark.parametrize("stage", ["zero2", pytest.param("zero3", marks=pytest.mark.slow)])
def test_the_universal_conversion_reads_every_file_weights_only(trained, tmp_path, stage):
    """2 -> 1 ranks: every DeepSpeed file the resume reads (the ZeRO shards by ds_to_universal, the universal
    checkpoint by DeepSpeed's loader) is read with weights_only=True; a shard carrying code is refused in one
    line and runs nothing; a file naming a parameter the model does not have ('../../escaped') is refused
    before the converter makes a folder of it."""
    from test_resume_security import SPY, _WritesMarker

    reference = trained(stage, "lora")
    work_dir, calls = moved(reference, tmp_path / "moved"), tmp_path / "calls.json"
    cmd = [sys.executable, "-c", SPY, str(calls), *train_cmd(RECIPES["lora"], work_dir, OPTIONS, "--deepspeed",
                                                             f"deepspeed_{stage}", "--resume", "auto")[3:]]
    assert_ok(subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT))
    read = {path: weights_only for path, weights_only in json.loads(calls.read_text())}
    # not read on 1 rank: the old rank 1's RNG, and (ZeRO-3) its model-states file copied into the universal folder
    files = {str(p) for folder in ("iter_2.ds", "iter_2.universal") for p in (work_dir / folder).rglob("*.pt")
             if p.name != "rng_rank1.pt" and not (folder == "iter_2.universal" and "zero_pp_rank_1_" in p.name)}
    assert len(files) > 20 and files <= set(read), sorted(files - set(read))[:5]
    assert all(read[f] is True for f in files)

    hostile, marker = moved(reference, tmp_path / "hostile"), tmp_path / "pwned"
    shard = hostile / "iter_2.ds" / "ckpt" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    state = torch.load(shard, weights_only=False)  # the test's own file
    state["optimizer_state_dict"]["hostile"] = _WritesMarker(marker)
    torch.save(state, shard)
    proc = run_train(RECIPES["lora"], hostile, OPTIONS, "--deepspeed", f"deepspeed_{stage}", "--resume", "auto")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vlmtune: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "refused to load" in errors[0] and shard.name in errors[0]
    assert not marker.exists() and not (hostile / "iter_2.universal").exists()

    # a parameter named '../../escaped' would become a folder outside the conversion's own (one per name)
    escape = moved(reference, tmp_path / "escape")
    states = next((escape / "iter_2.ds" / "ckpt").glob("*model_states.pt"))
    state = torch.load(states, weights_only=False)
    shapes = state["param_shapes"][0]
    state["param_shapes"][0] = {"../../escaped": shapes[next(iter(shapes))], **shapes}
    torch.save(state, states)
    proc = run_train(RECIPES["lora"], escape, OPTIONS, "--deepspeed", f"deepspeed_{stage}", "--resume", "auto")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vlmtune: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "names parameters this model does not have" in errors[0]
    assert "'../../escaped'" in errors[0] and not list(tmp_path.rglob("escaped"))


@pytest.mark.slow  # two 6-step runs (~30 s); tests/model/test_llava.py checks the module order in CI
def test_zero3_with_text_only_micro_batches_beside_image_ones_trains_as_zero2(tiny, tmp_path):
    """Batch 1 without length grouping puts a text-only sample on one rank beside an image on the other (LoRA on
    CLIP and the LLM, dropout on). Under ZeRO-3 this hung at the first such step while the blank image ran after
    the embeddings; now every step's loss equals ZeRO-2's."""
    options = dict(OPTIONS, max_steps=6, batch_size=1, save_steps=6, record_sample_ids=False)
    for stage in ("zero2", "zero3"):
        assert_ok(run_train("tiny_llava_finetune_lora", tmp_path / stage, options, "--deepspeed", f"deepspeed_{stage}",
                            **two_ranks()))
    zero2, zero3 = records(tmp_path / "zero2"), records(tmp_path / "zero3")
    assert sorted(zero3) == list(range(1, 7))
    for step in zero2:
        assert zero3[step]["loss"] == pytest.approx(zero2[step]["loss"], rel=LOSS_RTOL), step
