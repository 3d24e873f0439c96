"""`vlmtune mmbench`: answer an MMBench / CCBench TSV with a trained model, then score it (VLMEvalKit-compatible).

    main(args) -> load_mmbench -> load the Generator -> open_run (new or resumed folder) -> run_mmbench
        run_mmbench: this rank's questions not yet in the prediction logs -> predict (batched, greedy)
                     -> barrier -> rank 0 gathers every log -> finish_run (sheet, scores, report)

Each prompt is `build_prompt(question)` wrapped by the model's template through `Generator.prompt_ids`, the
tokenization path of training; the image is padded to square as the model was trained (LLaVA-1.5 / XTuner
finetunes pad) unless --[no-]pad-image-to-square says otherwise. With `--predictions FILE` nothing is
generated: the file is re-scored.

Batches keep a question's circular rotations together: they differ only in the options, after the image, hint
and question, so the image is encoded and that prompt prefix prefilled once for all of them in a batch
(`Generator.generate_shared`). Greedy answers match one row at a time (the logits agree to float rounding).

Resuming: every finished prediction is flushed to a JSONL log in the run folder at once. Re-running the same
command continues the newest unfinished run in --work-dir whose generation arguments match (batch size,
device and matcher may change), so only the missing rows are generated.

Several processes: with NPROC_PER_NODE=N (and NNODES, NODE_RANK, ADDR, PORT for several nodes) the command
re-launches itself through torchrun, as `vlmtune train` does (engine/launch.py). Rank r answers image groups
r, r+N, ... (a question with its circular rotations; `shard`) into its own log; rank 0 waits at a barrier,
reads every log and writes the outputs.
"""
from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from vlmtune.data.image import ImagePreprocessor
from vlmtune.engine.launch import relaunch
from vlmtune.errors import UserError
from vlmtune.eval.mmbench_data import MMBenchData, Question, decode_image, load_mmbench
from vlmtune.eval.prompt import build_prompt
from vlmtune.eval.results import (PredictionStore, finish_run, make_run_dir, read_prediction_log, rescore,
                                  write_args)
from vlmtune.eval.scoring import Report

# VLMEvalKit's LLaVA_XTuner (vlmeval/vlm/llava/llava_xtuner.py, build_gen_config) generates at most 5 tokens,
# greedy, for MCQ datasets. XTuner's own tools/mmbench.py uses 100 and VLMEvalKit's LLaVA class 512.
DEFAULT_MAX_NEW_TOKENS = 5
# Arguments that change what the model answers: a run is resumed only when all of them match.
GENERATION_ARGS = (
    "data_path", "model_name_or_path", "adapter", "llava", "visual_encoder", "visual_select_layer",
    "prompt_template", "system", "bits", "torch_dtype", "trust_remote_code", "max_new_tokens",
    "pad_image_to_square",
)
LOG_GLOB = "predictions*.jsonl"


def main(args) -> int:
    """The `vlmtune mmbench` command: re-score `--predictions`, or generate, then score."""
    if args.predictions:
        rescore(args.predictions, args.data_path, args.matcher, args.work_dir)
        return 0
    if args.model_name_or_path is None:
        raise UserError("give the model to evaluate (MODEL_NAME_OR_PATH), or --predictions FILE to re-score")
    code = relaunch(args.argv)  # NPROC_PER_NODE / NNODES set: run this command again under torchrun
    if code is not None:
        return code
    if args.max_new_tokens is None:
        args.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--batch-size and --max-new-tokens must be at least 1")
    torch.manual_seed(args.seed)
    _, world = init_process_group()
    try:
        data = load_mmbench(args.data_path)  # before the model, so a bad file fails in seconds
        generator = load_for_eval(args, world)
        run_dir = open_run(args, world)
        run_mmbench(generator, data, run_dir, args.batch_size, args.max_new_tokens, args.matcher)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def run_mmbench(generator, data: MMBenchData, run_dir: Path, batch_size: int = 8,
                max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, matcher: str = "vlmevalkit") -> Report | None:
    """Predict this rank's unanswered rows into its log, then (rank 0) gather all logs and write the outputs.

    Returns the report on rank 0 for a dev file, None on test files and on other ranks.
    """
    rank, world = rank_and_world()
    log = run_dir / ("predictions.jsonl" if world == 1 else f"predictions.rank{rank}.jsonl")
    with PredictionStore(log) as store:  # opening repairs a line cut by a crash
        barrier()  # every rank has repaired its own log before any rank reads the others
        done = gather_predictions(run_dir)
        todo = [q for q in shard(data.questions, rank, world) if q.index not in done]
        if rank == 0 and done:
            print(f"resuming {run_dir}: {len(done)} of {len(data.questions)} rows already predicted")
        predict(generator, todo, store, batch_size, max_new_tokens, progress=rank == 0)
    barrier()
    if rank != 0:
        return None
    return finish_run(data, gather_predictions(run_dir), matcher, run_dir)


def predict(generator, questions: list[Question], store: PredictionStore, batch_size: int,
            max_new_tokens: int, progress: bool = True) -> None:
    """Greedy answers for `questions`, at most `batch_size` at a time, each logged as soon as it exists.

    Rows sharing an image (a question's circular rotations) form a group (`image_groups`), and groups are packed
    whole into batches (`batches`). A batch goes through `Generator.generate_shared`: each group's image is
    decoded, preprocessed and encoded, and its rows' common prompt prefix prefilled, once. Groups run longest
    first: the first batch holds the longest rows, so its KV cache (rows x length, the bulk of the memory;
    prefixes are prefilled one group at a time) is about the largest, and a batch too large for memory fails at
    once rather than at the end. Results stay keyed by row index.
    """
    prompts = {q.index: generator.prompt_ids([(build_prompt(q), None)]) for q in questions}
    with tqdm(total=len(questions), desc="mmbench", unit="row", disable=not progress) as bar:
        for batch in batches(image_groups(questions, prompts), batch_size):
            out = generator.generate_shared(
                [([decode_image(g[0])], [prompts[q.index] for q in g]) for g in batch],  # decoded per batch
                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
            for group, answers in zip(batch, out):
                for q, ids in zip(group, answers):
                    store.add(q.index, generator.decode(ids))
            bar.update(sum(len(g) for g in batch))


def shard(questions: list[Question], rank: int, world: int) -> list[Question]:
    """This rank's rows: every `world`-th image group (a question and its circular rotations), counted in order
    of first appearance, so a question's rotations stay on one rank and share its image encoding and prefix."""
    order: dict[str, int] = {}
    for q in questions:
        order.setdefault(q.image, len(order))
    return [q for q in questions if order[q.image] % world == rank]


def image_groups(questions: list[Question], prompts: dict[int, list[int]]) -> list[list[Question]]:
    """Rows grouped by image, longest prompt first within a group; groups by their longest row, longest first.

    Ties keep file order (stable sorts), so without shared images this is the plain longest-first order.
    """
    groups: dict[str, list[Question]] = {}
    for q in questions:
        groups.setdefault(q.image, []).append(q)  # circular copies hold their main row's image string
    length = {q.index: len(prompts[q.index]) for q in questions}
    ranked = sorted(groups.values(), key=lambda g: -max(length[q.index] for q in g))
    return [sorted(g, key=lambda q: -length[q.index]) for g in ranked]


def batches(groups: list[list], batch_size: int) -> Iterator[list[list]]:
    """Consecutive groups packed into batches of at most `batch_size` rows. A group is split only when it alone is
    larger: a split group would have its image encoded and its prefix prefilled once per batch it lands in."""
    batch, rows = [], 0
    for group in groups:
        for start in range(0, len(group), batch_size):
            part = group[start : start + batch_size]
            if rows + len(part) > batch_size:
                yield batch
                batch, rows = [], 0
            batch.append(part)
            rows += len(part)
    if batch:
        yield batch


def gather_predictions(run_dir: Path) -> dict[int, str]:
    """Index -> prediction over every rank's log in run_dir (a cut-off last line is ignored)."""
    predictions: dict[int, str] = {}
    for log in sorted(run_dir.glob(LOG_GLOB)):
        predictions.update(read_prediction_log(log))
    return predictions


def open_run(args, world: int) -> Path:
    """Rank 0 resumes the newest unfinished matching run in --work-dir or starts one; every rank gets its path."""
    run_dir = None
    if rank_and_world()[0] == 0:
        wanted = generation_args(args)
        run_dir = find_resumable(Path(args.work_dir), wanted)
        if run_dir is None:
            run_dir = make_run_dir(args.work_dir)
            record = {k: v for k, v in vars(args).items() if k != "target"}
            write_args(run_dir, {**record, "world_size": world, "generation": wanted})
            print(f"MMBench run folder: {run_dir}")
    if world > 1:
        box = [str(run_dir) if run_dir else None]
        dist.broadcast_object_list(box, src=0)
        run_dir = Path(box[0])
    return run_dir


def generation_args(args) -> dict:
    """The arguments that decide the predictions (GENERATION_ARGS), as saved in args.json."""
    values = {k: vars(args).get(k) for k in GENERATION_ARGS}
    values["data_path"] = str(Path(args.data_path).resolve())
    return values


def find_resumable(work_dir: Path, wanted: dict) -> Path | None:
    """The newest run folder in work_dir with these generation arguments and no predictions sheet yet."""
    for args_file in sorted(work_dir.glob("*/args.json"), key=lambda p: p.parent.name, reverse=True):
        try:
            saved = json.loads(args_file.read_text(encoding="utf-8")).get("generation")
        except (OSError, ValueError):
            continue
        finished = any(args_file.parent.glob("*_result.xlsx"))
        if saved == wanted and not finished:
            return args_file.parent
    return None


def load_for_eval(args, world: int):
    """The Generator for the CLI flags (vlmtune.loading); --[no-]pad-image-to-square overrides the padding
    the model was trained with. Under torchrun each rank takes the GPU of its local rank."""
    from vlmtune.loading import load_generator

    if world > 1 and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # device 'auto' / 'cuda' then means this GPU
    generator = load_generator(args)
    if args.pad_image_to_square is not None:
        old = generator.preprocess
        generator.preprocess = ImagePreprocessor(old.image_processor, args.pad_image_to_square, old.method)
    return generator


def init_process_group() -> tuple[int, int]:
    """Join the torchrun job (gloo: only a barrier and a path travel between ranks) -> (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        # ranks wait for each other at the end of generation; a long eval must not time the barrier out
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
    return rank_and_world()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if rank_and_world()[1] > 1:
        dist.barrier()
