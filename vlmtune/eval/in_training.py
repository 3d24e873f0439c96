"""Benchmarks scored during `vlmtune train`: the `evaluation_benchmarks` subsets, through `vlmtune eval`'s own code.

    eval/benchmarks.py load_benchmarks(cfg): each entry read and checked by `vlmtune eval`'s loader (the kind
                          from the file name or the entry's `dataset`), cut to its first `max_rows` rows
                          (`Loaded.head`). Run before torchrun (paths.check_config_paths: a malformed file is one
                          line, not a failure at step 500) and again on every rank before the model is built.
    BenchmarkEval         at a step: each benchmark through `evaluate.evaluate_one` (eval/runner.py on every
                          rank, rows sharded by image group; rank 0 scores with `evaluate.finish`) into
                          work_dir/eval/iter_<step>/<file name>/, with summary.csv/.json/.png as `vlmtune eval`
                          writes them; the headline numbers go back to the trainer, which logs and plots them.

The step's folder is emptied first: a run killed during an evaluation and resumed from an earlier checkpoint
evaluates that step again from scratch. Under ZeRO-3 the model is partitioned over the ranks and every forward
pass gathers weights in a collective, so the ranks generate in lockstep (eval/runner.py `lockstep`).
"""
from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from vlmtune.distributed import barrier, rank_and_world
from vlmtune.eval.benchmarks import Loaded
from vlmtune.eval.evaluate import evaluate_one
from vlmtune.eval.summary import format_summary, write_summary

BATCH_SIZE = 8  # rows generated together, `vlmtune eval`'s default --batch-size


@dataclass
class BenchmarkEval:
    """Scores the benchmarks at a training step; called on every rank (see the module's docstring)."""

    benchmarks: list[Loaded]
    work_dir: Path
    lockstep: bool  # the model is partitioned over several ranks (ZeRO-3)

    def __call__(self, generator, step: int) -> list[dict]:
        """Every benchmark's headline numbers at `step` (eval/summary.py rows) on rank 0, [] on the others.

        The tables `vlmtune eval` prints go to work_dir/eval/iter_<step>/scores.txt, not between the training
        log lines."""
        run_dir = self.work_dir / "eval" / f"iter_{step}"
        is_main = rank_and_world()[0] == 0
        if is_main:
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
        barrier()
        rows = []
        with contextlib.ExitStack() as stack:
            if is_main:
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context((run_dir / "scores.txt").open("w"))))
            for one in self.benchmarks:
                rows += evaluate_one(generator, one, run_dir, BATCH_SIZE, lockstep=self.lockstep) or []
            if is_main:
                print(format_summary(rows))
        if is_main:
            write_summary(rows, run_dir)
        return rows
