"""`vlmtune eval`: answer VLMEvalKit benchmark TSVs with one loaded model, score each as VLMEvalKit does (no judge).

    main(args) -> check_args -> load_all: every --data-path read, checked and its prompts built (a bad file is one
                  line before the model loads; vlmtune.cli runs both before torchrun when NPROC_PER_NODE asks)
               -> the Generator, once -> open_run (new or resumed run folder)
               -> per benchmark, in its own folder: runner.run (this rank's unanswered rows, batched, greedy;
                  rank 0 gathers every log) -> finish (sheet, VLMEvalKit's table, headline numbers)
               -> summary.csv/.json/.png over all benchmarks
    --predictions F...: no model; each file is re-scored against its --data-path into a new run folder.

The benchmarks and how each is asked and scored: eval/benchmarks.py. The run folder:
    work_dir/YYYYmmdd_HHMMSS/args.json, summary.{csv,json,png}
    work_dir/YYYYmmdd_HHMMSS/<file name>/prompts.jsonl (each row's prompt, max_new_tokens, post-processing),
        predictions*.jsonl (the runner's logs), <name>_result.xlsx, <name>_acc|_score.{csv,json}
Resuming: the same command continues the newest run in --work-dir without a summary whose generation arguments
match; benchmarks already answered are only re-scored.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmtune.distributed import destroy_distributed, init_gloo, rank_and_world
from vlmtune.errors import UserError
from vlmtune.eval.benchmarks import Loaded, load_all
from vlmtune.eval.mmbench import GENERATION_ARGS, load_for_eval
from vlmtune.eval.mmbench_data import MMBenchData
from vlmtune.eval.results import finish_run
from vlmtune.eval.runner import BARRIER_TIMEOUT, Item, make_run_dir, open_run, run, write_args
from vlmtune.eval.sheets import read_predictions_for, result_sheet, write_xlsx
from vlmtune.eval.summary import format_summary, summary_rows, write_summary

FINISHED = "summary.json"  # a run folder holding it is finished


def main(args) -> int:
    """The `vlmtune eval` command: re-score --predictions, or generate every benchmark, then score."""
    check_args(args)
    loaded = load_all(args.data_path, args.dataset)
    if args.predictions:
        rescore(loaded, args.predictions, args.work_dir)
        return 0
    torch.manual_seed(args.seed)
    init_gloo(BARRIER_TIMEOUT)
    try:
        generator = load_for_eval(args)
        record = {k: v for k, v in vars(args).items() if k != "target"}
        run_dir = open_run(args.work_dir, generation_args(args), record, FINISHED, "eval")
        rows = [r for one in loaded
                for r in evaluate_one(generator, one, run_dir, args.batch_size, args.max_new_tokens) or []]
        if rank_and_world()[0] == 0:
            finish_summary(rows, run_dir)
    finally:
        destroy_distributed()
    return 0


def check_args(args) -> None:
    """Flag checks that need no file and no model (one line, before anything starts)."""
    n = len(args.data_path)
    for flag, values in (("--predictions", args.predictions), ("--dataset", args.dataset)):
        if values and len(values) != n:
            raise UserError(f"{flag} takes one value per --data-path, in the same order: {len(values)} for {n}")
    if len({Path(p).stem for p in args.data_path}) < n:
        raise UserError("two --data-path files have the same file name; their outputs would share a folder")
    if args.predictions:
        return
    if args.model_name_or_path is None:
        raise UserError("give the model to evaluate (MODEL_NAME_OR_PATH), or --predictions FILE... to re-score")
    if args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        raise UserError("--batch-size and --max-new-tokens must be at least 1")


def generation_args(args) -> dict:
    """The arguments that decide the predictions (mmbench's GENERATION_ARGS, every data file and --dataset)."""
    values = {k: vars(args).get(k) for k in GENERATION_ARGS}
    values["data_path"] = [str(Path(p).resolve()) for p in args.data_path]
    values["dataset"] = args.dataset
    return values


def evaluate_one(generator, one: Loaded, run_dir: Path, batch_size: int, max_new_tokens: int | None = None,
                 lockstep: bool = False) -> list[dict] | None:
    """Answer one benchmark's missing rows in run_dir/<stem>/, then (rank 0) score it: its summary lines.

    `max_new_tokens`: --max-new-tokens (None: the kind's); `lockstep`: the runner's, for a partitioned model."""
    out_dir = run_dir / one.stem
    out_dir.mkdir(exist_ok=True)
    max_new = one.max_new_tokens(max_new_tokens)
    if rank_and_world()[0] == 0:
        write_prompts(one, max_new, out_dir / "prompts.jsonl")
    return run(generator, items(generator, one, max_new), out_dir, batch_size,
               lambda predictions: finish(one, predictions, out_dir), desc=one.stem, lockstep=lockstep)


def items(generator, one: Loaded, max_new_tokens: int) -> list[Item]:
    """One runner item per row: its prompt in the model's template (the training tokenization path)."""
    return [Item(p.index, p.group, generator.prompt_ids([(p.text, None)]), max_new_tokens, p.images)
            for p in one.prompts]


def write_prompts(one: Loaded, max_new_tokens: int, path: Path) -> None:
    """prompts.jsonl: per row its index, the prompt text (before the chat template), max_new_tokens and what is
    done to its answer before scoring."""
    with path.open("w", encoding="utf-8") as f:
        for p in one.prompts:
            f.write(json.dumps({"index": p.index, "prompt": p.text, "max_new_tokens": max_new_tokens,
                                "postprocess": one.kind.postprocess}, ensure_ascii=False) + "\n")


def finish(one: Loaded, predictions: dict, out_dir: Path) -> list[dict]:
    """Score one benchmark's predictions into out_dir: result sheet, VLMEvalKit's table; its summary lines."""
    check_predictions(one, predictions)
    if one.kind.score is None:  # MMBench / CCBench: eval/results.py writes the sheet and the circular report
        report = finish_run(one.data, predictions, "vlmevalkit", out_dir)
        if report is None:
            return []
        circular = report.table[report.table["eval"] == "circular"]
        return summary_rows(one.stem, one.kind.name, [("Overall (circular)", float(circular["Overall"].iloc[0]), 1.0)])
    scored = one.kind.score(one.data, predictions)
    sheet = out_dir / f"{one.stem}_result.xlsx"
    write_xlsx(result_sheet(one.data.table, predictions, None if scored is None else scored.per_row), sheet)
    if scored is None:
        print(f"{one.data.file} has no answers (test split): {sheet} holds the predictions to submit")
        return []
    table_path = out_dir / f"{one.stem}{one.kind.table_suffix}.csv"
    scored.table.to_csv(table_path, index=False)
    table_path.with_suffix(".json").write_text(scored.table.to_json(orient="records", indent=2) + "\n")
    for suffix, detail in scored.details.items():
        detail.to_csv(out_dir / f"{one.stem}_{suffix}.csv", index=False)
    print(f"{one.kind.name} ({one.data.file}): {len(predictions)} rows scored, exact matching (no judge)")
    print(scored.table.to_string(index=False))
    for note in scored.notes:
        print(f"note: {note}")
    return summary_rows(one.stem, one.kind.name, scored.headline)


def check_predictions(one: Loaded, predictions: dict) -> None:
    """Every data row predicted (a finished run), or a warning naming how many are scored."""
    missing = len(one.prompts) - sum(p.index in predictions for p in one.prompts)
    if missing:
        print(f"warning: {one.data.file}: {missing} of {len(one.prompts)} rows have no prediction; the scores "
              "cover the predicted rows only, as VLMEvalKit scores the rows of its prediction file")


def finish_summary(rows: list[dict], run_dir: Path) -> None:
    """Write and print the summary of every benchmark."""
    paths = write_summary(rows, run_dir)
    print(format_summary(rows))
    print(f"Summary saved to {paths['csv']} ({paths['json'].name}, {paths['png'].name})")


def rescore(loaded: list[Loaded], predictions: list[str], work_dir: str) -> Path:
    """Score each predictions file against its data file (no model) into a new run folder; return it."""
    read = [read_predictions_for(path, [p.index for p in one.prompts], questions(one), one.data.file)
            for one, path in zip(loaded, predictions)]  # all checked before a folder is made
    run_dir = make_run_dir(work_dir)
    write_args(run_dir, {"predictions": predictions, "data_path": [str(one.data.file) for one in loaded],
                         "work_dir": str(work_dir)})
    rows = []
    for one, found in zip(loaded, read):
        out_dir = run_dir / one.stem
        out_dir.mkdir()
        rows += finish(one, found, out_dir)
    finish_summary(rows, run_dir)
    return run_dir


def questions(one: Loaded) -> dict:
    """Index -> question text of a data file, to check that a predictions file belongs to it."""
    if isinstance(one.data, MMBenchData):
        return {q.index: q.question for q in one.data.questions}
    return {r.index: r.text("question") for r in one.data.rows}
