"""Training records: a console/file log line, JSON lines, tensorboard when installed, a loss-curve PNG."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm


def get_logger(work_dir: Path | None, is_main: bool) -> logging.Logger:
    """`vlmtune` logger: rank 0 prints to stderr (through tqdm, so the bar survives) and to work_dir/train.log."""
    logger = logging.getLogger("vlmtune")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s vlmtune %(levelname)s %(message)s", "%m/%d %H:%M:%S")

    class TqdmHandler(logging.Handler):
        def emit(self, record):
            tqdm.write(self.format(record), file=sys.stderr)

    console = TqdmHandler()
    console.setFormatter(fmt)
    logger.addHandler(console)
    if work_dir is not None and is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(work_dir / "train.log")
        file.setFormatter(fmt)
        logger.addHandler(file)
    return logger


class Metrics:
    """Writes one record per logging step to train_log.jsonl (+ tensorboard); plots the loss at the end."""

    def __init__(self, work_dir: Path, is_main: bool):
        self.work_dir, self.is_main = work_dir, is_main
        self.records: list[dict] = []
        self.tb = None
        if is_main:
            self.jsonl = (work_dir / "train_log.jsonl").open("a", encoding="utf-8")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(work_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def log(self, record: dict) -> None:
        """Append a record (must hold `step`)."""
        if not self.is_main:
            return
        record = {"time": time.time(), **record}
        self.records.append(record)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def log_sample_ids(self, step: int, ids: list) -> None:
        """Append {"step", "ids"} to sample_ids.jsonl (`record_sample_ids`): which samples each optimizer step
        trained on, to audit the data order (a resumed run appends; the latest line of a step wins)."""
        if self.is_main:
            with (self.work_dir / "sample_ids.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "ids": ids}) + "\n")

    def log_scores(self, step: int, rows: list[dict]) -> None:
        """Append the benchmarks' headline numbers at `step` (eval/summary.py rows) as one record
        {"step", "scores": {"<benchmark> <metric>": value}, "percent": {... of the metric's full scale}}; tensorboard
        gets eval/<benchmark>/<metric>."""
        if not self.is_main:
            return
        record = {"time": time.time(), "step": step,
                  "scores": {f"{r['benchmark']} {r['metric']}": r["value"] for r in rows},
                  "percent": {f"{r['benchmark']} {r['metric']}": r["percent"] for r in rows}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for r in rows:
                self.tb.add_scalar(f"eval/{r['benchmark']}/{r['metric']}", r["value"], step)

    def close(self) -> Path | None:
        """Flush files and write loss_curve.png from every record of this run and earlier (resumed) ones."""
        if not self.is_main:
            return None
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        return plot_loss(self.work_dir / "train_log.jsonl", self.work_dir / "loss_curve.png")


def plot_loss(jsonl: Path, png: Path) -> Path | None:
    """Loss (and learning rate) against step from a train_log.jsonl; beside it, when the run scored
    evaluation_benchmarks, each headline number (in % of its full scale) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in rows if "loss" in r}  # a resumed run rewrites steps: keep the latest
    if not by_step:
        return None
    scores = {r["step"]: r["percent"] for r in rows if "percent" in r}
    steps = sorted(by_step)
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(13 if scores else 7, 4), squeeze=False)
    ax = axes[0][0]
    if scores:
        _plot_scores(axes[0][1], scores)
    ax.plot(steps, [by_step[s]["loss"] for s in steps], color="tab:blue", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [by_step[s]["lr"] for s in steps], color="tab:orange", alpha=0.6, label="lr")
    lr_ax.set_ylabel("learning rate")
    ax.set_title(f"training loss ({jsonl.parent.name})")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _plot_scores(ax, scores: dict[int, dict[str, float]]) -> None:
    """One line per headline number: its % of full scale at each evaluated step (latest record of a step)."""
    steps = sorted(scores)
    names = sorted({name for s in steps for name in scores[s]})
    for name in names:
        at = [s for s in steps if name in scores[s]]
        ax.plot(at, [scores[s][name] for s in at], marker="o", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("% of the metric's full scale")
    ax.set_title("evaluation_benchmarks")
    ax.legend(fontsize=7)
