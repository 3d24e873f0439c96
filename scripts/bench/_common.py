"""What every benchmark in scripts/bench prints around its figures, and interleaved timing.

A ratio is only worth printing when both sides ran under the same conditions. On a shared machine the load
drifts during a run, so timing all of A and then all of B lets the drift fall on one side. `interleave` runs
every variant once per round, back to back, rotating the order each round (A B C, B C A, C A B, ...) so that
neither a drift nor a place in the round favours one side; `ratios` divides within each round and `spread`
gives the median of those per-round ratios with its min-max and interquartile range.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vlmtune import quiet

quiet.install(False)  # the libraries' known start-up notices off, as in the CLI (VLMTUNE_VERBOSE=1 shows them)


def load() -> str:
    """The 1, 5 and 15 minute load averages, as the figure's context (a load above the core count means the
    benchmark did not have the cores to itself)."""
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_model() -> str:
    """The processor's name from /proc/cpuinfo (platform.processor() is empty on most Linux systems)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.machine()


def machine(packages: tuple[str, ...], extra: str = "") -> str:
    """One line: platform, CPU, cores usable by this process, Python and the given packages' versions."""
    versions = []
    for name in packages:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    cores = f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable)"
    return " | ".join(x for x in (platform.platform(), cpu_model(), cores, extra,
                                  f"python {platform.python_version()}, " + ", ".join(versions)) if x)


def header(packages: tuple[str, ...], extra: str = "") -> None:
    """Print the command (as typed from the repository root), the date and time, the machine and the load
    average before the run: what a reader needs to rerun a figure and to judge it."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]))
    print("command: python " + shlex.join([script, *sys.argv[1:]]))
    print("date:", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"))
    print("machine:", machine(packages, extra))
    print(f"before: {load()}", flush=True)


def footer() -> None:
    """The load average after the run (a rise shows the run competed with something, or with itself)."""
    print(f"after: {load()}")


def interleave(variants: dict[str, Callable[[], float]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each variant once per round, the order rotated every round; `warmup` untimed rounds first.

    Each variant returns the seconds it measured (so it can leave set-up such as zeroing gradients out).
    Returns {name: [seconds of round 0, round 1, ...]}."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = variants[name]()
            if r >= warmup:
                times[name].append(seconds)
    return times


def ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    """Per-round ratios: both sides of each one ran in the same round, seconds apart."""
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def spread(values: list[float], fmt: str = ".3f") -> str:
    """'median M (min a - max b, IQR q1-q3, n rounds)': the median figure and how far single rounds strayed."""
    ordered = sorted(values)
    if len(ordered) > 1:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    median = statistics.median(ordered)
    return (f"median {median:{fmt}} (min {ordered[0]:{fmt}} - max {ordered[-1]:{fmt}}, "
            f"IQR {q1:{fmt}}-{q3:{fmt}}, {len(ordered)} round{'s' if len(ordered) > 1 else ''})")


def clock(fn: Callable[[], object]) -> float:
    """Seconds `fn()` takes (perf_counter)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rss(pid: int | str = "self") -> dict:
    """RssAnon and Pss_Anon (MiB) of a process: its anonymous memory (heap, Python objects), not the
    file-backed pages (memory-mapped tables, the page cache) that processes share."""
    out = {}
    for name in ("status", "smaps_rollup"):
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "Pss_Anon"):
                out[key] = int(value.split()[0]) / 1024
    return out


def child_pids() -> list[int]:
    """Processes whose parent is this one (the dataloader workers)."""
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if int(fields["PPid"]) == os.getpid():
            pids.append(int(status.parent.name))
    return pids
