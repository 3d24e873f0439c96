"""Launching: XTuner's NPROC_PER_NODE/NNODES/NODE_RANK/ADDR/PORT -> torchrun, slurm's variables, exit codes."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmtune.errors import UserError
from vlmtune.launch import relaunch, setup_slurm, torchrun_command

LAUNCH_VARS = ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "RANK",
               "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
               "SLURM_JOB_NODELIST")


@pytest.fixture
def env(monkeypatch):
    """A clean launch environment; set variables with monkeypatch.setenv through the returned object."""
    for name in LAUNCH_VARS:
        # setenv first so monkeypatch records the original state: code under test (setup_slurm) writes
        # os.environ directly, and those writes must not leak into later tests
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def test_one_process_by_default(env):
    assert torchrun_command(["train", "cfg"]) is None


def test_nproc_per_node_relaunches_through_torchrun_on_a_free_port(env):
    env.setenv("NPROC_PER_NODE", "8")
    cmd = torchrun_command(["train", "cfg", "--deepspeed", "deepspeed_zero2"])
    port = next(a for a in cmd if a.startswith("--master_port=")).split("=")[1]
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=8", "--nnodes=1", "--node_rank=0",
                   "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "vlmtune",
                   "train", "cfg", "--deepspeed", "deepspeed_zero2"]
    assert 0 < int(port) < 65536
    env.setenv("PORT", "29611")
    assert "--master_port=29611" in torchrun_command(["train", "cfg"])


def test_several_nodes_meet_at_addr_and_port(env):
    env.setenv("NNODES", "4")
    env.setenv("NODE_RANK", "2")
    env.setenv("ADDR", "10.1.2.3")
    cmd = torchrun_command(["train", "cfg"])
    assert cmd[3:8] == ["--nproc_per_node=1", "--nnodes=4", "--node_rank=2", "--master_addr=10.1.2.3",
                        "--master_port=29500"]  # every node must agree on the port: XTuner's default
    env.setenv("NPROC_PER_NODE", "8")
    env.setenv("PORT", "1234")
    assert torchrun_command(["train", "cfg"])[3:8] == ["--nproc_per_node=8", "--nnodes=4", "--node_rank=2",
                                                       "--master_addr=10.1.2.3", "--master_port=1234"]


@pytest.mark.parametrize("marker", ["LOCAL_RANK", "TORCHELASTIC_RUN_ID"])
def test_a_torchrun_child_does_not_relaunch(env, marker):
    env.setenv("NPROC_PER_NODE", "8")
    env.setenv(marker, "0")
    assert torchrun_command(["train", "cfg"]) is None


def test_relaunch_returns_the_exit_code_of_the_ranks(env):
    """Real torchrun, one rank running a cheap vlmtune command: success is 0, a failing rank fails the launch."""
    env.setenv("NPROC_PER_NODE", "1")
    assert relaunch(["list-cfg", "-p", "tiny_llava_pretrain"]) == 0
    assert relaunch(["list-cfg", "--no-such-flag"]) != 0  # argparse exits 2 in the rank; torchrun reports 1


def test_slurm_variables_become_torch_ones(env, tmp_path):
    env.setenv("SLURM_PROCID", "11")
    env.setenv("SLURM_NTASKS", "16")
    env.setenv("SLURM_LOCALID", "3")
    env.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    fake_bin = tmp_path / "bin"  # scontrol expands the node list; the first node hosts rank 0
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text('#!/bin/sh\n[ "$*" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n')
    (fake_bin / "scontrol").chmod(0o755)
    env.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    setup_slurm()
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")] == \
        ["11", "16", "3", "gpu07", "29500"]


def test_slurm_addr_and_port_win(env):
    for name, value in dict(SLURM_PROCID="0", SLURM_NTASKS="8", SLURM_LOCALID="0", ADDR="head", PORT="4321").items():
        env.setenv(name, value)
    setup_slurm()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("head", "4321")


def test_slurm_outside_an_allocation_is_a_user_error(env):
    with pytest.raises(UserError, match="--launcher slurm needs SLURM_PROCID; start vlmtune with srun"):
        setup_slurm()


def test_die_with_parent_ends_a_child_when_its_parent_is_killed(tmp_path):
    """What keeps torchrun's workers (each in a session of its own) from training on after a kill -9."""
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from vlmtune.launch import die_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
        " preexec_fn=die_with_parent, start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)\n")])
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.05)
        child = Path("/proc") / pid_file.read_text()
        assert child.exists()
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while child.exists() and _state(child) != "Z" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not child.exists() or _state(child) == "Z"
    finally:
        parent.kill()
        if pid_file.exists() and pid_file.read_text() and _state(Path("/proc") / pid_file.read_text()) not in ("Z", "gone"):
            os.kill(int(pid_file.read_text()), 9)  # the check failed: do not leave the sleeper behind


def _state(proc_dir: Path) -> str:
    try:
        return (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


# ---- the CLI decides, once, before torchrun ---------------------------------------------------------------------


def _vlmtune(*args: str) -> subprocess.CompletedProcess:
    """`python -m vlmtune ...` with this test's environment (the `env` fixture's variables)."""
    return subprocess.run([sys.executable, "-m", "vlmtune", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_mmbench_flags_are_checked_once_before_torchrun_starts(env, tmp_path):
    env.setenv("NPROC_PER_NODE", "2")
    out = _vlmtune("mmbench", "some/model", "--data-path", str(tmp_path / "x.tsv"), "--batch-size", "0")
    assert out.returncode == 2 and out.stderr == "vlmtune: error: --batch-size and --max-new-tokens must be at least 1\n"
    out = _vlmtune("mmbench", "--data-path", str(tmp_path / "x.tsv"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "give the model to evaluate" in out.stderr


def test_rescoring_predictions_runs_in_one_process(env, tmp_path):
    """`mmbench --predictions` reads a file and scores it: NPROC_PER_NODE does not start ranks for it."""
    env.setenv("NPROC_PER_NODE", "2")
    out = _vlmtune("mmbench", "--predictions", str(tmp_path / "p.xlsx"), "--data-path", str(tmp_path / "x.tsv"),
                   "--work-dir", str(tmp_path / "w"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "launching" not in out.stderr


def test_launcher_choices_are_none_and_slurm(env, tmp_path):
    """torchrun is not a --launcher: NPROC_PER_NODE/NNODES start it (as `xtuner train`), whatever the flag."""
    out = _vlmtune("train", "tiny_llava_pretrain", "--launcher", "torchrun")
    assert out.returncode == 2 and "invalid choice: 'torchrun' (choose from 'none', 'slurm')" in out.stderr
