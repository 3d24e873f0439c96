"""`vlmtune train` end to end through the CLI: the acceptance tests of issue #3, on CPU with gloo.

Every run is a real `python -m vlmtune train` subprocess over the tiny models and the bundled example data;
multi-rank runs go through NPROC_PER_NODE (-> torchrun) with ZeRO-2. The runs share one folder, so the
tokenization cache is built once, and the expensive runs are module fixtures that several tests read:

    pretrain_2ranks   2 ranks x batch 1 x accumulation 1, 8 steps       artefacts, loss, changed/frozen, kill ref.
    pretrain_1rank    1 rank  x batch 1 x accumulation 2, same options  split equivalence
    qlora_2ranks      2 ranks, QLoRA finetune from pretrain_2ranks' iter_8.pth, 10 steps, LoRA dropout 0.05
    lora_2ranks/1rank LoRA finetune without dropout, 5 steps: split equivalence with text-only samples

Options that make the checks sharp: `warmup_ratio` gives exactly one warmup step, whose learning rate is
lr * 1e-5, so iter_1.pth holds the starting weights to within ~lr * 1e-5 (Adam moves each weight by about
the learning rate per step); `save_steps=1` keeps every step; `group_by_length=False` with batch 1 makes
the global batch of step s the same two samples whatever the split (see `test_split_equivalence`).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlmtune.weights import load_trained_weights

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 300  # seconds; a hung collective fails the test instead of hanging CI
COMMON = dict(batch_size=1, group_by_length=False, save_steps=1, save_total_limit=0, evaluation_freq=1000,
              logging_interval=1)
PRETRAIN = dict(COMMON, max_steps=8, warmup_ratio=0.125, lr=0.01)  # 8 samples, 2 per step: 2 epochs
QLORA = dict(COMMON, max_steps=10, warmup_ratio=0.1, lr=0.01)  # 10 samples (2 text-only), 2 per step: 2 epochs
# steps 4 and 5 pair an image sample with a text-only one (seed 42 order: [4, 9], [1, 8]; 8 and 9 are text-only)
LORA_NO_DROPOUT = dict(COMMON, max_steps=5, warmup_ratio=0.2, lr=0.01, **{"llm_lora.lora_dropout": 0,
                                                                       "visual_encoder_lora.lora_dropout": 0})
LOG_KEYS = {"step", "total_steps", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "eta_s",
            "peak_mem_gb"}
WEIGHT_RTOL = 1e-5  # relative to each tensor's largest |value|; every comparison below measured 0.0 exactly


# ---------------------------------------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_env(**launch) -> dict:
    """The test process's environment (it holds VLMTUNE_TINY_DIR) without launcher variables, plus `launch`."""
    env = {k: v for k, v in os.environ.items() if k not in
           ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE",
            "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun sets for its ranks; more threads than free cores stall
    env.update({k: str(v) for k, v in launch.items()})
    return env


def train_cmd(config: str, work_dir: Path, options: dict, *extra: str) -> list[str]:
    opts = [f"{k}={v}" for k, v in options.items()]
    return [sys.executable, "-m", "vlmtune", "train", config, "--work-dir", str(work_dir), *extra, "--cfg-options", *opts]


def two_ranks() -> dict:
    return dict(NPROC_PER_NODE=2)  # a single-node torchrun takes a free port by itself


def run_train(config: str, work_dir: Path, options: dict, *extra: str, **launch) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(config, work_dir, options, *extra), env=train_env(**launch),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"


def records(work_dir: Path) -> dict[int, dict]:
    """train_log.jsonl by step (a resumed run appends; the latest record of a step wins)."""
    lines = (work_dir / "train_log.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def weights(work_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_trained_weights(work_dir / f"iter_{step}.pth")[0]


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| of a tensor relative to that tensor's largest |b| (same keys required)."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in a)


def epoch_mean_losses(work_dir: Path) -> list[float]:
    """Mean logged loss of each epoch: over the same samples every epoch, unlike single steps."""
    by_epoch: dict[int, list[float]] = {}
    for r in records(work_dir).values():
        by_epoch.setdefault(r["epoch"], []).append(r["loss"])
    return [sum(v) / len(v) for _, v in sorted(by_epoch.items())]


def start_killable(config: str, work_dir: Path, options: dict, **launch) -> subprocess.Popen:
    """A training run in its own process group (CLI, torchrun, ranks), so the test can SIGKILL all of it."""
    return subprocess.Popen(train_cmd(config, work_dir, options), env=train_env(**launch), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"run ended (exit {proc.returncode}) before {path.name} appeared:\n{proc.stderr.read()[-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{path.name} did not appear in {timeout} s")
        time.sleep(0.02)


def run_pids(work_dir: Path) -> dict[int, dict[str, str]]:
    """pid -> environment of every live process whose command line names `work_dir` (CLI, torchrun, ranks)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if str(work_dir) not in (entry / "cmdline").read_bytes().decode(errors="replace"):
                continue
            environ = (entry / "environ").read_bytes().decode(errors="replace").split("\0")
            if (entry / "stat").read_text().split(")")[-1].split()[0] == "Z":
                continue  # a zombie waiting for its parent is not running
        except OSError:  # ended meanwhile
            continue
        found[int(entry.name)] = dict(kv.split("=", 1) for kv in environ if "=" in kv)
    return found


def assert_none_left(work_dir: Path, timeout: float = 30) -> None:
    """Every process of the run is gone (torchrun starts ranks in sessions of their own: no orphan may train on)."""
    deadline = time.monotonic() + timeout
    while (left := run_pids(work_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running after the kill: {sorted(left)}"


def resumed_step(work_dir: Path) -> int:
    found = re.findall(r"resumed from \S+iter_(\d+)\.pth at step (\d+)", (work_dir / "train.log").read_text())
    assert found, "the resumed run did not log a resume"
    assert found[-1][0] == found[-1][1]
    return int(found[-1][1])


def leave_crashed_save(work_dir: Path, step: int) -> None:
    """What a crash during checkpoint `step` leaves: the temporary ZeRO folder and a half-written .pth.tmp."""
    (work_dir / f".iter_{step}.ds.tmp" / "ckpt").mkdir(parents=True)
    (work_dir / f"iter_{step}.pth.tmp").write_bytes(b"PK\x03\x04 half a zip")


# ---------------------------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_runs")


@pytest.fixture(scope="module")
def pretrain_2ranks(tiny, runs) -> Path:
    work_dir = runs / "pretrain_2ranks"
    assert_ok(run_train("tiny_llava_pretrain", work_dir, PRETRAIN, **two_ranks()))
    return work_dir


@pytest.fixture(scope="module")
def pretrain_1rank(tiny, runs) -> Path:
    work_dir = runs / "pretrain_1rank"
    assert_ok(run_train("tiny_llava_pretrain", work_dir, dict(PRETRAIN, accumulative_counts=2)))
    return work_dir


def qlora_options(pretrain_dir: Path) -> dict:
    return dict(QLORA, pretrained_pth=pretrain_dir / "iter_8.pth")


@pytest.fixture(scope="module")
def qlora_2ranks(pretrain_2ranks, runs) -> Path:
    work_dir = runs / "qlora_2ranks"
    assert_ok(run_train("tiny_llava_finetune_qlora", work_dir, qlora_options(pretrain_2ranks), **two_ranks()))
    return work_dir


@pytest.fixture(scope="module")
def lora_2ranks(tiny, runs) -> Path:
    work_dir = runs / "lora_2ranks"
    assert_ok(run_train("tiny_llava_finetune_lora", work_dir, LORA_NO_DROPOUT, **two_ranks()))
    return work_dir


@pytest.fixture(scope="module")
def lora_1rank(tiny, runs) -> Path:
    work_dir = runs / "lora_1rank"
    assert_ok(run_train("tiny_llava_finetune_lora", work_dir, dict(LORA_NO_DROPOUT, accumulative_counts=2)))
    return work_dir


# ---------------------------------------------------------------------------------------------- tests

def test_pretrain_writes_every_artefact(pretrain_2ranks):
    w = pretrain_2ranks
    for step in range(1, 9):
        assert (w / f"iter_{step}.pth").is_file() and (w / f"iter_{step}.ds" / "ckpt").is_dir()
    assert not list(w.glob("*.tmp")) and not list(w.glob(".*.tmp"))
    logged = records(w)
    assert sorted(logged) == list(range(1, 9))
    for r in logged.values():
        assert LOG_KEYS <= r.keys()
        assert r["total_steps"] == 8 and r["tokens_per_s"] > 0 and r["samples_per_s"] > 0 and r["peak_mem_gb"] > 0
    assert [logged[s]["epoch"] for s in range(1, 9)] == [0] * 4 + [1] * 4
    assert logged[8]["eta_s"] == 0
    assert (w / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config_text = (w / "tiny_llava_pretrain.py").read_text()
    assert "max_steps = 8" in config_text and "group_by_length = False" in config_text
    log = (w / "train.log").read_text()
    assert "2 process(es) on cpu" in log and f"saved {w / 'iter_8.pth'}" in log


def test_pretrain_schedule_and_loss(pretrain_2ranks):
    logged = records(pretrain_2ranks)
    lrs = [logged[s]["lr"] for s in range(1, 9)]
    assert lrs[0] == pytest.approx(0.01 * 1e-5) and lrs[1] == pytest.approx(0.01)  # one warmup step, then the peak
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 0.01 * 0.05  # cosine towards 0
    first, last = epoch_mean_losses(pretrain_2ranks)
    assert last < first - 0.03, (first, last)  # measured 6.390 -> 6.297 nats on the same 8 samples


def test_pretrain_trains_only_the_projector(pretrain_2ranks):
    start, end = weights(pretrain_2ranks, 1), weights(pretrain_2ranks, 8)
    assert sorted(end) == ["projector.model.0.bias", "projector.model.0.weight", "projector.model.2.bias",
                           "projector.model.2.weight"]
    log = (pretrain_2ranks / "train.log").read_text()
    n_trainable = int(re.search(r"trainable parameters: ([\d,]+) of", log).group(1).replace(",", ""))
    assert sum(t.numel() for t in end.values()) == n_trainable  # nothing else trained (LLM, CLIP frozen)
    for key in end:  # step 1 ran at lr 1e-7: iter_1 is the initial projector to ~1e-7; training moved it
        assert (end[key] - start[key]).abs().max() > 1e-3, key


def test_zero_folder_and_pth_hold_the_same_weights(pretrain_2ranks, qlora_2ranks):
    for work_dir, step in ((pretrain_2ranks, 8), (qlora_2ranks, 10)):
        from_pth, cfg_pth = load_trained_weights(work_dir / f"iter_{step}.pth")
        from_ds, cfg_ds = load_trained_weights(work_dir / f"iter_{step}.ds")
        assert from_ds.keys() == from_pth.keys()  # the ZeRO folder holds no frozen weights either
        for key in from_pth:
            assert torch.equal(from_ds[key], from_pth[key]), key
        assert cfg_pth.text == cfg_ds.text and cfg_pth.train.max_steps == step


def test_checkpoint_names_trained_weights_as_xtuner_does(qlora_2ranks):
    """iter_N.pth's state_dict uses XTuner's LLaVAModel names (CLIP LoRA under transformers 4.x's
    `vision_model.` level, adapter name kept), so XTuner's pth_to_hf reads it; vlmtune reads it back to the
    module's own names."""
    raw = torch.load(qlora_2ranks / "iter_10.pth", weights_only=True)["state_dict"]
    clip = [k for k in raw if k.startswith("visual_encoder.")]
    assert clip and all(k.startswith("visual_encoder.base_model.model.vision_model.encoder.") for k in clip)
    assert all(".lora_A.default." in k or ".lora_B.default." in k for k in raw if not k.startswith("projector."))
    ours = load_trained_weights(qlora_2ranks / "iter_10.pth")[0]
    assert len(ours) == len(raw) and not any("vision_model" in k for k in ours)


@pytest.mark.parametrize("stage", ["pretrain", "lora"])
def test_split_equivalence(stage, request):
    """1 rank x accumulation 2 == 2 ranks x accumulation 1 (batch 1 each, seed 42, no length grouping).

    Same global batches: with grouping off, every rank draws the same permutation from (seed, epoch); one
    rank takes micro-batches perm[2s], perm[2s+1] for step s, two ranks take perm[2s:2s+2][rank]. Identical
    losses, gradient norms and weights then show the step's gradient is sum(token losses) / N_global either
    way, and that DeepSpeed did not also divide by the accumulation count (grad_norm would halve; Adam's
    update alone would hide such a scale). The LoRA finetune (no dropout: ranks draw different masks) puts a
    text-only sample on one rank beside an image sample on the other at steps 4 and 5, where ZeRO-2 needs
    both ranks to ready the same gradients in the same order.
    """
    one, two = request.getfixturevalue(f"{stage}_1rank"), request.getfixturevalue(f"{stage}_2ranks")
    logged_one, logged_two = records(one), records(two)
    steps = sorted(logged_two)
    assert sorted(logged_one) == steps and len(steps) in (5, 8)
    for step in steps:
        for key in ("loss", "grad_norm", "lr"):
            assert logged_one[step][key] == pytest.approx(logged_two[step][key], rel=1e-6), (step, key)
    for step in steps:
        assert max_rel_diff(weights(one, step), weights(two, step)) <= WEIGHT_RTOL, step


def test_qlora_finetune_from_pretrain(qlora_2ranks, pretrain_2ranks):
    start, end = weights(qlora_2ranks, 1), weights(qlora_2ranks, 10)
    projector = {k for k in end if k.startswith("projector.")}
    llm_lora = {k for k in end if k.startswith("llm.") and ".lora_" in k}
    clip_lora = {k for k in end if k.startswith("visual_encoder.") and ".lora_" in k}
    assert len(projector) == 4 and llm_lora and clip_lora
    assert set(end) == projector | llm_lora | clip_lora  # no base LLM / CLIP weight is saved (QLoRA: frozen 4-bit)

    # The pretrain projector was loaded: step 1 ran at lr 1e-7, so iter_1 holds it to ~1e-7, while the
    # pretrain moved its projector by more than 1e-3 from a fresh one (test_pretrain_trains_only_the_projector).
    pretrained = weights(pretrain_2ranks, 8)
    for key in projector:
        assert (start[key] - pretrained[key]).abs().max() < 1e-5, key
    assert f"pretrained_pth {pretrain_2ranks / 'iter_8.pth'}: loaded 4 tensors" in (qlora_2ranks / "train.log").read_text()

    # Changed: every LoRA tensor and the projector, except CLIP's last layer. visual_select_layer=-2 reads the
    # output of the tiny CLIP's layer 0, so layer 1 gets no gradient and (weight decay 0) must not move.
    unused = {k for k in clip_lora if ".layers.1." in k}
    assert unused and len(unused) < len(clip_lora)
    for key in end:
        moved = float((end[key] - start[key]).abs().max())
        assert (moved == 0) if key in unused else (moved > 1e-4), (key, moved)

    first, last = epoch_mean_losses(qlora_2ranks)
    assert last < first - 0.03, (first, last)  # measured 6.306 -> 6.182


def test_pretrain_killed_with_sigkill_resumes_exactly(pretrain_2ranks, runs):
    """SIGKILL the whole process group (CLI + torchrun; the ranks must die with torchrun) after step 2 of 8,
    resume with --resume auto: the weights and losses of the uninterrupted run (pretrain_2ranks, same
    options). A crashed save of step 99 left behind is ignored."""
    work_dir = runs / "pretrain_killed"
    proc = start_killable("tiny_llava_pretrain", work_dir, PRETRAIN, **two_ranks())
    wait_for(work_dir / "iter_2.pth", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert_none_left(work_dir)
    assert not (work_dir / "iter_8.pth").exists()
    leave_crashed_save(work_dir, 99)

    assert_ok(run_train("tiny_llava_pretrain", work_dir, PRETRAIN, "--resume", "auto", **two_ranks()))
    k = resumed_step(work_dir)
    assert 2 <= k < 8
    assert max_rel_diff(weights(work_dir, 8), weights(pretrain_2ranks, 8)) <= WEIGHT_RTOL
    resumed, reference = records(work_dir), records(pretrain_2ranks)
    for step in range(k + 1, 9):
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-6), step


def test_qlora_rank_killed_with_sigkill_fails_the_run_then_resumes_exactly(qlora_2ranks, pretrain_2ranks, runs):
    """2-rank QLoRA (LoRA dropout 0.05, so per-rank RNG matters): SIGKILL rank 1 after step 2 of 10. The
    launcher must exit non-zero (not hang with rank 0 stuck in a collective); `--resume auto` then ends with
    the weights of the uninterrupted qlora_2ranks run."""
    work_dir = runs / "qlora_killed"
    options = qlora_options(pretrain_2ranks)
    proc = start_killable("tiny_llava_finetune_qlora", work_dir, options, **two_ranks())
    wait_for(work_dir / "iter_2.pth", proc)
    rank1 = [pid for pid, env in run_pids(work_dir).items() if env.get("RANK") == "1" and "LOCAL_RANK" in env]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGKILL)
    try:
        code = proc.wait(timeout=120)
    finally:
        assert_none_left(work_dir)
    assert code != 0
    assert not (work_dir / "iter_10.pth").exists()
    leave_crashed_save(work_dir, 99)

    assert_ok(run_train("tiny_llava_finetune_qlora", work_dir, options, "--resume", "auto", **two_ranks()))
    k = resumed_step(work_dir)
    assert 2 <= k < 10
    assert max_rel_diff(weights(work_dir, 10), weights(qlora_2ranks, 10)) <= WEIGHT_RTOL
    resumed, reference = records(work_dir), records(qlora_2ranks)
    for step in range(k + 1, 11):
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-6), step


def test_two_nodes_train_together(tiny, runs):
    """NNODES=2 with NODE_RANK 0 and 1, one process each, meeting at 127.0.0.1:PORT: one 2-rank job, one
    set of checkpoints (the work dir plays a shared file system); save_total_limit=2 keeps the newest two."""
    work_dir = runs / "two_nodes"
    options = dict(PRETRAIN, max_steps=4, save_total_limit=2)
    launch = dict(NNODES=2, NPROC_PER_NODE=1, ADDR="127.0.0.1", PORT=free_port())
    nodes = [subprocess.Popen(train_cmd("tiny_llava_pretrain", work_dir, options), env=train_env(**launch, NODE_RANK=n),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    try:
        errors = [node.communicate(timeout=RUN_TIMEOUT)[1] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(e[-3000:] for e in errors)
    assert sorted(p.name for p in work_dir.glob("iter_*")) == ["iter_3.ds", "iter_3.pth", "iter_4.ds", "iter_4.pth"]
    assert "2 process(es) on cpu" in (work_dir / "train.log").read_text()
    assert sorted(records(work_dir)) == [1, 2, 3, 4]
    assert len(list((work_dir / "iter_4.ds" / "ckpt").glob("*optim_states.pt"))) == 2  # one ZeRO shard per node
    before, after = weights(work_dir, 3), weights(work_dir, 4)
    assert len(after) == 4 and all(k.startswith("projector.") for k in after)
    assert all((after[k] - before[k]).abs().max() > 0 for k in after)  # step 4 trained on both nodes' data


def test_missing_data_file_exits_2_with_one_line(tiny, tmp_path):
    """Caught before torchrun or DeepSpeed start (vlmtune/paths.py), so one line even with several ranks."""
    missing = tmp_path / "nowhere.json"
    proc = run_train("tiny_llava_pretrain", tmp_path / "w", dict(data_path=missing, max_steps=2))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vlmtune: error:")]
    assert errors == [f"vlmtune: error: {missing}: data file not found; check `data_path` in the config"]
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "w").glob("iter_*"))


def test_failing_ranks_fail_the_launch(tiny, tmp_path):
    """NPROC_PER_NODE=2: each rank meets a data file with nothing to train on (found only once the ranks build
    the dataset; a missing file is caught before launching), prints its one-line error and exits 2; torchrun
    fails, and so does our CLI."""
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    proc = run_train("tiny_llava_pretrain", tmp_path / "w", dict(data_path=str(empty)), **two_ranks())
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vlmtune: error:")]
    assert len(errors) == 2 and all(f"{empty}: no trainable record" in e for e in errors)


def test_a_bad_config_fails_once_before_launching(tiny, tmp_path):
    """A config error is caught in the parent, before torchrun starts: one line, exit 2, no launcher traceback."""
    proc = run_train("tiny_llava_pretrain", tmp_path / "w", dict(max_step=2), **two_ranks())
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vlmtune: error:")]
    assert len(errors) == 1 and "unknown config key 'max_step' (did you mean 'max_steps'?)" in errors[0]
    assert "torch.distributed.run" not in proc.stderr and "Traceback" not in proc.stderr
