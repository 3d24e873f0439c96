"""The benchmarks `vlmtune eval` knows: a table from VLMEvalKit's dataset name to how it is loaded, asked, scored.

A `Kind` is plain data: the functions of its module (eval/mcq.py, yorn.py, vqa.py; MMBench's eval/mmbench_data.py
and results.py), VLMEvalKit's generation budget for it and a sentence saying what happens to an answer before it
is scored (recorded with each row's prompt). The name comes from the file name (`MME.tsv` is MME), as VLMEvalKit
names its files; `--dataset NAME` overrides it. Names containing 'MMBench', 'CCBench', 'circular' or 'MMCR' are VLMEvalKit's circular
sets; an unknown file with multiple-choice columns is plain multiple choice.

`load_all` reads data files into `Loaded` benchmarks (kind, rows, prompts) for `vlmtune eval`; `load_benchmarks`
does it for a training config's `evaluation_benchmarks` (eval/in_training.py scores them during training).

max_new_tokens: VLMEvalKit's LLaVA_XTuner (vlmeval/vlm/llava/llava_xtuner.py build_gen_config) generates 5 tokens
for multiple-choice and yes/no sets and 512 otherwise; decoding here is always greedy (that wrapper samples with
5 beams for the others, which is not copied).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from vlmtune.config import Config
from vlmtune.constants import DEFAULT_IMAGE_TOKEN
from vlmtune.distributed import rank_and_world
from vlmtune.errors import UserError
from vlmtune.eval import mcq, vqa, yorn
from vlmtune.eval.bench_data import Benchmark, Row, Scored
from vlmtune.eval.mmbench_data import MMBenchData, decode_image, load_mmbench
from vlmtune.eval.prompt import build_prompt
from vlmtune.eval.tsv import read_tsv

SHORT, LONG = 5, 512  # new tokens: multiple choice and yes/no; everything else
NA_NOTE = " An answer pandas reads as missing ('', 'None', 'NA', 'null'...) is scored as the text 'nan'."


@dataclass(frozen=True)
class Prompt:
    """One row to ask: its key in the logs, the rows sharing its images, the text before the chat template."""

    index: int | str
    group: str
    text: str
    n_images: int
    images: Callable[[], list[Image.Image]]  # decoded when its batch runs


@dataclass(frozen=True)
class Kind:
    """How one benchmark is run. `score` is None for MMBench, which writes its own outputs (eval/results.py)."""

    name: str
    load: Callable[[Path, str], Benchmark | MMBenchData]
    prompt: Callable[[Row], str] | None  # None for MMBench (eval/prompt.py build_prompt on its Questions)
    score: Callable[[Benchmark, dict], Scored | None] | None
    max_new_tokens: int
    postprocess: str
    metric: str  # what the headline number is, for the docs and the summary
    table_suffix: str  # VLMEvalKit's name for the score table: _acc (MCQ, VQA) or _score (yes/no, OCRBench)


MCQ_POST = ("can_infer (VLMEvalKit matching_util): the option letter the answer gives, else the one option whose "
            "text it contains; 'Z' when none; right when equal to the answer letter." + NA_NOTE)
MMMU_POST = MCQ_POST + " An open question is scored as A = its answer text vs B = 'Other Answers'."
YORN_POST = ("YOrN_Extraction: punctuation removed, lowercased; the word 'yes' without 'no' is Yes, 'no' without "
             "'yes' is No, else Unknown; right when equal to the answer." + NA_NOTE)


def _mcq(name: str, post: str = MCQ_POST) -> Kind:
    return Kind(name, mcq.load_mcq, mcq.mcq_row_prompt, mcq.score_mcq, SHORT, post, "accuracy (fraction)", "_acc")


def _yorn(name: str, score, metric: str) -> Kind:
    return Kind(name, yorn.load_yorn, yorn.yorn_prompt, score, SHORT, YORN_POST, metric, "_score")


def _vqa(name: str, post: str, metric: str) -> Kind:
    return Kind(name, vqa.load_vqa, vqa.vqa_prompt, vqa.score_vqa, LONG, post + NA_NOTE, metric, "_acc")


MMBENCH = Kind("MMBench", lambda path, name: load_mmbench(path), None, None, SHORT,
               "can_infer (VLMEvalKit matching_util), CircularEval over each question's rotations (eval/scoring.py).",
               "CircularEval accuracy (fraction)", "_acc")
KINDS = {k.name: k for k in [
    *(_mcq(n) for n in ("SEEDBench_IMG", "MMStar", "ScienceQA_VAL", "ScienceQA_TEST", "AI2D_TEST")),
    _mcq(mcq.MMMU, MMMU_POST),
    _yorn("MME", yorn.score_mme, "perception and reasoning: sums of acc + acc+ per subtask"),
    _yorn("POPE", yorn.score_pope, "F1 (%), with accuracy, precision, recall"),
    _yorn("HallusionBench", yorn.score_hallusion, "aAcc, fAcc, qAcc (%)"),
    _vqa("TextVQA_VAL", "VQA normalisation (punctuation, lowercase, number words, articles, contractions); "
         "min(#other answers equal / 3, 1) averaged over the 10 answers.", "VQA accuracy (%)"),
    _vqa("GQA_TestDev_Balanced", "strip() and lower(); exact match.", "exact match (%)"),
    _vqa("ChartQA_TEST", "strip(); within 5% of a number answer, else equal ignoring case.", "relaxed accuracy (%)"),
    _vqa("DocVQA_VAL", "ANLS: 1 - edit distance / length on lowercased text, 0 below 0.5.", "ANLS (%)"),
    Kind("OCRBench", vqa.load_vqa, vqa.plain_prompt, vqa.score_ocrbench, LONG,
         "Lowercased (formulas: spaces removed); right when an answer is contained in the answer." + NA_NOTE,
         "Final Score (hits of 1000)", "_score"),
]}
PLAIN_MCQ_COLUMNS = ("index", "image", "question", "A", "B")


CIRCULAR_MARKS = ("mmbench", "ccbench", "circular", "mmcr")  # image_mcq.py:270 (ImageMCQDataset.evaluate_heuristic)


def is_mmbench(name: str) -> bool:
    """VLMEvalKit's circular sets: the lowercased name holds 'mmbench', 'ccbench', 'circular' or 'mmcr'."""
    return any(mark in name.lower() for mark in CIRCULAR_MARKS)


def kind_for(path: str | Path, dataset: str | None = None) -> Kind:
    """The kind of a data file: --dataset NAME if given, else its file name; an unknown name with
    multiple-choice columns is plain multiple choice."""
    name = dataset or Path(path).stem
    if name in KINDS:
        return KINDS[name]
    if is_mmbench(name):
        return replace(MMBENCH, name=name)
    known = ", ".join([*KINDS, "MMBench_*", "CCBench"])
    if dataset is not None:
        raise UserError(f"--dataset {dataset}: not a benchmark vlmtune scores; choose one of {known}")
    if Path(path).is_file() and all(c in read_tsv(Path(path)).columns for c in PLAIN_MCQ_COLUMNS):
        return _mcq(name)
    raise UserError(f"{path}: the file name does not say which benchmark it is and it has no multiple-choice "
                    f"columns ({', '.join(PLAIN_MCQ_COLUMNS)}); rename it or pass --dataset NAME, one of {known}")


def prompts(kind: Kind, data: Benchmark | MMBenchData) -> list[Prompt]:
    """Every row's prompt. Rows with the same images share a group (a question's rotations; MME's two questions
    per image), so they are batched together and their image encoded once."""
    if kind.prompt is None:
        asked = [Prompt(q.index, q.image, build_prompt(q), 1, functools.partial(_mmbench_image, q))
                 for q in data.questions]
    else:
        asked = [Prompt(r.index, r.images[0] if len(r.images) == 1 else "\n".join(r.images), kind.prompt(r),
                        len(r.images), r.decode_images) for r in data.rows]
    for p in asked:
        if p.text.count(DEFAULT_IMAGE_TOKEN) != p.n_images:
            raise UserError(f"{data.file}: index {p.index}: the text writes {DEFAULT_IMAGE_TOKEN}, which would take "
                            "the place of an image; remove it from the question")
    return asked


def _mmbench_image(question) -> list[Image.Image]:
    return [decode_image(question)]


@dataclass(frozen=True)
class Loaded:
    """One --data-path: its kind, its rows and their prompts."""

    kind: Kind
    data: Benchmark | MMBenchData
    prompts: list[Prompt]

    @property
    def stem(self) -> str:
        """The file name without extension: the benchmark's folder and file names in the run folder."""
        return self.data.file.stem

    def max_new_tokens(self, override: int | None) -> int:
        """--max-new-tokens, else the kind's (VLMEvalKit's budget for it)."""
        return override or self.kind.max_new_tokens

    def head(self, n: int | None) -> Loaded:
        """The first `n` rows asked, in file order (all when n is None): the benchmark `vlmtune eval` scores on
        a copy of the file cut after them. MMBench's CircularEval then counts the rotations among those rows."""
        if n is None or n >= len(self.prompts):
            return self
        if isinstance(self.data, MMBenchData):
            data = replace(self.data, questions=self.data.questions[:n], table=self.data.table.iloc[:n])
        else:
            data = replace(self.data, rows=self.data.rows[:n], table=self.data.table.iloc[:n])
        return Loaded(self.kind, data, self.prompts[:n])


def load_all(paths: list[str], datasets: list[str] | None) -> list[Loaded]:
    """Every data file read and checked, with its prompts; rows skipped for having no image are counted aloud."""
    loaded = []
    for path, dataset in zip(paths, datasets or [None] * len(paths)):
        kind = kind_for(path, dataset)
        data = kind.load(Path(path), kind.name)
        if isinstance(data, Benchmark) and data.skipped and rank_and_world()[0] == 0:
            print(f"{path}: {data.skipped} rows without an image skipped, as VLMEvalKit skips them")
        loaded.append(Loaded(kind, data, prompts(kind, data)))
    return loaded


def load_benchmarks(cfg: Config) -> list[Loaded]:
    """The config's `evaluation_benchmarks`, each read, checked and cut to its `max_rows`; a bad file is a
    UserError naming the config and the entry."""
    loaded, stems = [], {}
    for i, entry in enumerate(cfg.train.evaluation_benchmarks):
        where = f"{cfg.path}: evaluation_benchmarks[{i}]"
        stem = Path(entry.data_path).stem
        if stem in stems:
            raise UserError(f"{where}: {entry.data_path} has the file name of evaluation_benchmarks[{stems[stem]}]; "
                            "their outputs would share a folder (rename one)")
        stems[stem] = i
        if not Path(entry.data_path).expanduser().is_file():
            raise UserError(f"{where}: {entry.data_path}: benchmark file not found; fix its data_path")
        try:
            (one,) = load_all([str(Path(entry.data_path).expanduser())], [entry.dataset] if entry.dataset else None)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        loaded.append(one.head(entry.max_rows))
    return loaded
