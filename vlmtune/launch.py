"""Launching: one process by default, torchrun when NPROC_PER_NODE/NNODES are set, or slurm's variables.

The environment variables are XTuner's: NPROC_PER_NODE, NNODES, NODE_RANK, ADDR, PORT. `vlmtune.cli.main` is the
one place that decides, for every command that can run as several processes (train, mmbench): it re-runs the
same command under torchrun and waits, returning torchrun's exit code, so a crash in any rank fails the command.
Only the standard library here: the parent decides before torch or the training stack is imported. The ranks
then join the process group in vlmtune/distributed.py.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from vlmtune.errors import UserError


def torchrun_command(argv: list[str]) -> list[str] | None:
    """The torchrun command line to re-launch `vlmtune <argv>`, or None when this process should just run."""
    if "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        return None  # already a torchrun child
    nproc, nnodes = os.environ.get("NPROC_PER_NODE"), os.environ.get("NNODES")
    if not nproc and not nnodes:
        return None
    # several nodes must agree on a port (XTuner's default 29500); a single node takes a free one, so two
    # jobs on one machine do not collide
    port = os.environ.get("PORT") or (29500 if int(nnodes or 1) > 1 else free_port())
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc or 1}", f"--nnodes={nnodes or 1}", f"--node_rank={os.environ.get('NODE_RANK', 0)}",
        f"--master_addr={os.environ.get('ADDR', '127.0.0.1')}", f"--master_port={port}",
        "-m", "vlmtune", *argv,
    ]


def launch_world_size() -> int:
    """How many ranks the launch will start: NPROC_PER_NODE x NNODES for torchrun, SLURM_NTASKS under srun, else 1."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        return int(env["SLURM_NTASKS"])
    return int(env.get("NPROC_PER_NODE") or 1) * int(env.get("NNODES") or 1)


def free_port() -> int:
    """An unused local TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relaunch(argv: list[str]) -> int | None:
    """Run torchrun when the environment asks for several processes; its exit code, or None."""
    cmd = torchrun_command(argv)
    if cmd is None:
        if "TORCHELASTIC_RUN_ID" in os.environ:
            die_with_parent()  # a torchrun worker: stop when torchrun stops
        return None
    print("vlmtune: launching " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    env = dict(os.environ)
    if int(os.environ.get("NPROC_PER_NODE") or 1) > 1:  # torchrun's own default, without its banner about it
        env.setdefault("OMP_NUM_THREADS", "1")
    try:
        return subprocess.call(cmd, env=env, preexec_fn=die_with_parent)
    except KeyboardInterrupt:
        return 130


def die_with_parent() -> None:
    """Have Linux SIGKILL this process when the process that started it exits (no-op elsewhere).

    torchrun starts each worker in a session of its own, so killing `vlmtune train` (or mmbench) and torchrun
    (kill -9 of the process group, an out-of-memory kill, or Ctrl-C, after which subprocess.call SIGKILLs
    torchrun) would leave the ranks running on, unsupervised, still writing into the work dir. Set for torchrun
    (by `relaunch`, before exec) and in each worker."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def setup_slurm() -> None:
    """Map SLURM_* variables (one task per GPU, started by srun) to torch's RANK/WORLD_SIZE/... ."""
    try:
        env = os.environ
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = env["SLURM_PROCID"], env["SLURM_NTASKS"], env["SLURM_LOCALID"]
    except KeyError as e:
        raise UserError(f"--launcher slurm needs {e.args[0]}; start vlmtune with srun inside a slurm allocation") from None
    if "ADDR" in env:
        env["MASTER_ADDR"] = env["ADDR"]
    elif "MASTER_ADDR" not in env:
        hosts = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True, text=True, check=True)
        env["MASTER_ADDR"] = hosts.stdout.split()[0]
    env.setdefault("MASTER_PORT", env.get("PORT", "29500"))
