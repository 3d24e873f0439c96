"""`vlmtune mmbench`: answer an MMBench / CCBench TSV with a trained model, then score it (VLMEvalKit-compatible).

    main(args) -> load_mmbench -> load the Generator -> open_run (new or resumed folder) -> run_mmbench
        run_mmbench: one eval runner item per row (`mmbench_items`) -> runner.run (this rank's unanswered rows,
                     batched, greedy; rank 0 gathers every log) -> finish_run (sheet, scores, report)

This file is the MMBench client of the eval runner (eval/runner.py: run folder, resume, prediction logs,
sharding, batching, gathering); the TSV is read by eval/mmbench_data.py, prompts built by eval/prompt.py, answers
scored by eval/scoring.py and written out by eval/results.py.

Each prompt is `build_prompt(question)` wrapped by the model's template through `Generator.prompt_ids`, the
tokenization path of training; the image is padded to square as the model was trained (LLaVA-1.5 / XTuner
finetunes pad) unless --[no-]pad-image-to-square says otherwise. With `--predictions FILE` nothing is
generated: the file is re-scored.

A question's circular rotations form one image group: they differ only in the options, after the image, hint
and question, so the image is encoded and that prompt prefix prefilled once for all of them in a batch
(`Generator.generate_shared`). Greedy answers match one row at a time (the logits agree to float rounding).

Resuming: re-running the same command continues the newest unfinished run in --work-dir whose generation
arguments match (GENERATION_ARGS; batch size, device and matcher may change), so only the missing rows are
generated. Several processes: with NPROC_PER_NODE=N (and NNODES, NODE_RANK, ADDR, PORT for several nodes)
vlmtune.cli re-launches the command through torchrun, as for `vlmtune train`; the ranks share the image groups.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from PIL import Image

from vlmtune.data.image import ImagePreprocessor
from vlmtune.distributed import destroy_distributed, init_gloo
from vlmtune.errors import UserError
from vlmtune.eval.mmbench_data import MMBenchData, Question, decode_image, load_mmbench
from vlmtune.eval.prompt import build_prompt
from vlmtune.eval.results import finish_run, rescore
from vlmtune.eval.runner import BARRIER_TIMEOUT, Item, open_run, run
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
RESULT_GLOB = "*_result.xlsx"  # the predictions sheet finish_run writes: its run is finished


def main(args) -> int:
    """The `vlmtune mmbench` command: re-score `--predictions`, or generate, then score."""
    check_args(args)
    if args.predictions:
        rescore(args.predictions, args.data_path, args.matcher, args.work_dir)
        return 0
    if args.max_new_tokens is None:
        args.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    torch.manual_seed(args.seed)
    init_gloo(BARRIER_TIMEOUT)
    try:
        data = load_mmbench(args.data_path)  # before the model, so a bad file fails in seconds
        generator = load_for_eval(args)
        record = {k: v for k, v in vars(args).items() if k != "target"}
        run_dir = open_run(args.work_dir, generation_args(args), record, RESULT_GLOB, "MMBench")
        run_mmbench(generator, data, run_dir, args.batch_size, args.max_new_tokens, args.matcher)
    finally:
        destroy_distributed()
    return 0


def check_args(args) -> None:
    """The flag checks that need no file and no model: run by vlmtune.cli before it starts several processes
    (one error line, not one per rank), and by `main`."""
    if args.predictions:
        return  # re-scoring reads only --predictions, --data-path, --matcher and --work-dir
    if args.model_name_or_path is None:
        raise UserError("give the model to evaluate (MODEL_NAME_OR_PATH), or --predictions FILE to re-score")
    if args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        raise UserError("--batch-size and --max-new-tokens must be at least 1")


def run_mmbench(generator, data: MMBenchData, run_dir: Path, batch_size: int = 8,
                max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, matcher: str = "vlmevalkit") -> Report | None:
    """Predict this rank's unanswered rows into its log, then (rank 0) gather all logs and write the outputs.

    Returns the report on rank 0 for a dev file, None on test files and on other ranks.
    """
    items = mmbench_items(generator, data.questions, max_new_tokens)
    return run(generator, items, run_dir, batch_size,
               lambda predictions: finish_run(data, predictions, matcher, run_dir), desc="mmbench")


def mmbench_items(generator, questions: list[Question], max_new_tokens: int) -> list[Item]:
    """One runner item per row: its prompt in the model's template; its image group is its image, which a
    question's circular copies share (they hold their main row's image string)."""
    return [Item(q.index, q.image, generator.prompt_ids([(build_prompt(q), None)]), max_new_tokens,
                 functools.partial(_images, q)) for q in questions]


def _images(question: Question) -> list[Image.Image]:
    return [decode_image(question)]


def generation_args(args) -> dict:
    """The arguments that decide the predictions (GENERATION_ARGS), as saved in args.json."""
    values = {k: vars(args).get(k) for k in GENERATION_ARGS}
    values["data_path"] = str(Path(args.data_path).resolve())
    return values


def load_for_eval(args):
    """The Generator for the CLI flags (vlmtune.loading); --[no-]pad-image-to-square overrides the padding
    the model was trained with. Under torchrun each rank is on the GPU of its local rank (`init_gloo`)."""
    from vlmtune.loading import load_generator

    generator = load_generator(args)
    if args.pad_image_to_square is not None and generator.model.anyres is not None:
        raise UserError("--pad-image-to-square / --no-pad-image-to-square: this model tiles images with AnyRes "
                        "(image_grid_pinpoints), which takes each image at its own aspect ratio; drop the flag")
    if args.pad_image_to_square is not None:
        old = generator.preprocess
        generator.preprocess = ImagePreprocessor(old.image_processor, args.pad_image_to_square, old.method)
    return generator
