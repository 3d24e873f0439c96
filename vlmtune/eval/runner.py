"""The evaluation runner: a benchmark's prompts -> the model's answers, resumable, on one process or several.

A client (eval/mmbench.py) reads its data, makes one `Item` per row (its prompt ids in the model's template,
`Generator.prompt_ids`, the tokenization path of training) and brings a `finish` function that scores and
writes reports. The runner does the rest:

    open_run  rank 0 continues the newest unfinished run in the work dir made with the same generation
              arguments (`find_resumable`), or makes work_dir/YYYYmmdd_HHMMSS with args.json; every rank gets it
    run       this rank's image groups (`shard`) not yet in any log -> `predict`: groups packed whole into
              batches, longest first (`image_groups`, `batches`), each answer flushed at once to this rank's
              JSONL log (`PredictionStore`) -> barrier -> rank 0 reads every log (`gather_predictions`) and
              returns finish(predictions)

Re-running a killed run generates only the rows missing from its logs. Under torchrun (launched by
vlmtune.cli) rank r answers image groups r, r+N, ... into predictions.rank{r}.jsonl; the ranks wait for each
other at the barriers of vlmtune/distributed.py (join with `init_gloo(BARRIER_TIMEOUT)`).

`lockstep` is for a model whose weights are partitioned over the ranks (ZeRO-3 during training,
eval/in_training.py): there every module's forward gathers its weights in a collective, so every rank must run
the same forward passes. Each rank then runs as many batches as the rank with the most (a rank out of rows
repeats the first item and drops the answer), each batch through `generate_ids` (one image encoding, one
embedding; not `generate_shared`, whose prefills per group differ between ranks) with transformers'
`synced_gpus`, which keeps decoding until every rank's batch is done.
"""
from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image
from tqdm import tqdm

from vlmtune.distributed import all_reduce_sum, barrier, broadcast_from_main, rank_and_world
from vlmtune.errors import UserError

# a rank done with its share waits at the last barrier for the slowest: a long evaluation must not time it out
BARRIER_TIMEOUT = datetime.timedelta(hours=12)
LOG_GLOB = "predictions*.jsonl"
T = TypeVar("T")


@dataclass(frozen=True)
class Item:
    """One prompt to answer.

    Items with the same `group` share their images (a question and its rotations): they stay on one rank, and in
    a batch their images are loaded and encoded, and their common prompt prefix prefilled, once
    (`Generator.generate_shared`). `images` loads them when the batch runs, not up front: a benchmark's
    decoded images need not all fit in memory.
    """

    id: int | str  # the key of its prediction in the logs and in finish(): the row's index in its TSV
    group: str
    prompt_ids: list[int]  # the whole prompt, template applied, IMAGE_TOKEN_INDEX where each image goes
    max_new_tokens: int
    images: Callable[[], list[Image.Image]]


def run(generator, items: list[Item], run_dir: Path, batch_size: int, finish: Callable[[dict[int | str, str]], T],
        desc: str = "eval", lockstep: bool = False) -> T | None:
    """Answer this rank's items not yet in run_dir's logs, then (rank 0) return finish(every prediction by id).

    None on the other ranks. `desc` names the progress bar (shown on rank 0); `lockstep`: every rank runs the
    same forward passes (a partitioned model, see the module's docstring).
    """
    rank, world = rank_and_world()
    log = run_dir / ("predictions.jsonl" if world == 1 else f"predictions.rank{rank}.jsonl")
    with PredictionStore(log) as store:  # opening repairs a line cut by a crash
        barrier()  # every rank has repaired its own log before any rank reads the others
        done = gather_predictions(run_dir)
        todo = [item for item in shard(items, rank, world) if item.id not in done]
        if rank == 0 and done:
            print(f"resuming {run_dir}: {len(done)} of {len(items)} rows already predicted")
        predict(generator, todo, store, batch_size, progress=rank == 0, desc=desc,
                filler=items[0] if lockstep and items else None)
    barrier()
    if rank != 0:
        return None
    return finish(gather_predictions(run_dir))


def predict(generator, items: list[Item], store: PredictionStore, batch_size: int, progress: bool = True,
            desc: str = "eval", filler: Item | None = None) -> None:
    """Greedy answers for `items`, at most `batch_size` at a time, each logged as soon as it exists.

    Groups run longest first: the first batch holds the longest rows, so its KV cache (rows x length, the bulk
    of the memory; prefixes are prefilled one group at a time) is about the largest, and a batch too large for
    memory fails at once rather than at the end. A batch generates up to its largest `max_new_tokens`; each
    answer is cut to its own item's (greedy: the same first tokens).

    With a `filler` item (lockstep, see the module's docstring) every rank runs as many batches as the rank with
    the most, the missing ones made of the filler, whose answers are dropped.
    """
    planned = list(batches(image_groups(items), batch_size))
    rounds = len(planned)
    if filler is not None:
        rank, world = rank_and_world()
        counts = torch.zeros(world, dtype=torch.long)
        counts[rank] = rounds
        rounds = int(all_reduce_sum(counts).max())
    with tqdm(total=len(items), desc=desc, unit="row", disable=not progress) as bar:
        for i in range(rounds):
            batch = planned[i] if i < len(planned) else [[filler]]
            out = _generate(generator, batch, lockstep=filler is not None)
            if i >= len(planned):
                continue
            for group, answers in zip(batch, out):
                for item, ids in zip(group, answers):
                    store.add(item.id, generator.decode(ids[: item.max_new_tokens]))
            bar.update(sum(len(g) for g in batch))


def _generate(generator, batch: list[list[Item]], lockstep: bool) -> list[list[list[int]]]:
    """New ids per item, per group of `batch`: `generate_shared`, or in lockstep one `generate_ids` call (the same
    forward passes on every rank: one image encoding, one embedding, decoding synced over ranks)."""
    groups = [(group[0].images(), [item.prompt_ids for item in group]) for group in batch]
    max_new = max(item.max_new_tokens for group in batch for item in group)
    if not lockstep:
        return generator.generate_shared(groups, max_new_tokens=max_new, do_sample=False, num_beams=1)
    flat = generator.generate_ids([p for _, prompts in groups for p in prompts],
                                  [images for images, prompts in groups for _ in prompts],
                                  max_new_tokens=max_new, do_sample=False, num_beams=1, synced_gpus=True)
    out, start = [], 0
    for _, prompts in groups:
        out.append(flat[start : start + len(prompts)])
        start += len(prompts)
    return out


def shard(items: list[Item], rank: int, world: int) -> list[Item]:
    """This rank's items: every `world`-th group, counted in order of first appearance, so a group stays on
    one rank and shares its image encoding and prefix."""
    order: dict[str, int] = {}
    for item in items:
        order.setdefault(item.group, len(order))
    return [item for item in items if order[item.group] % world == rank]


def image_groups(items: list[Item]) -> list[list[Item]]:
    """Items grouped by `group`, longest prompt first within a group; groups by their longest row, longest first.

    Ties keep the given order (stable sorts), so without shared images this is the plain longest-first order.
    """
    groups: dict[str, list[Item]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    ranked = sorted(groups.values(), key=lambda g: -max(len(item.prompt_ids) for item in g))
    return [sorted(g, key=lambda item: -len(item.prompt_ids)) for g in ranked]


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


# ---- the run folder ----------------------------------------------------------------------------------------


def open_run(work_dir: str | Path, generation: dict, record: dict, finished: str, name: str) -> Path:
    """Rank 0 continues the newest unfinished run in work_dir with these `generation` arguments, or makes one
    whose args.json holds `record`, the world size and `generation`; every rank gets its path.

    `finished`: a glob for the file a finished run holds (the client's results); `name` titles the message.
    """
    run_dir = None
    rank, world = rank_and_world()
    if rank == 0:
        run_dir = find_resumable(Path(work_dir), generation, finished)
        if run_dir is None:
            run_dir = make_run_dir(work_dir)
            write_args(run_dir, {**record, "world_size": world, "generation": generation})
            print(f"{name} run folder: {run_dir}")
    return Path(broadcast_from_main(str(run_dir) if run_dir else None))


def find_resumable(work_dir: Path, wanted: dict, finished: str) -> Path | None:
    """The newest run folder in work_dir with these generation arguments and no `finished` file yet."""
    for args_file in sorted(work_dir.glob("*/args.json"), key=lambda p: p.parent.name, reverse=True):
        try:
            saved = json.loads(args_file.read_text(encoding="utf-8")).get("generation")
        except (OSError, ValueError):
            continue
        if saved == wanted and not any(args_file.parent.glob(finished)):
            return args_file.parent
    return None


def make_run_dir(work_dir: str | Path) -> Path:
    """A new work_dir/YYYYmmdd_HHMMSS folder (XTuner's layout); '_2', '_3'... if that second is taken."""
    stamp = time.strftime("%Y%m%d_%H%M%S")
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        run_dir = Path(work_dir) / (stamp if k == 1 else f"{stamp}_{k}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise UserError(f"{work_dir}: too many runs started at {stamp}")


def write_args(run_dir: Path, args: dict) -> Path:
    """Save the run's arguments as args.json (values that are not JSON are written as strings)."""
    path = run_dir / "args.json"
    path.write_text(json.dumps(args, indent=2, default=str, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# ---- the prediction logs -----------------------------------------------------------------------------------


class PredictionStore:
    """Append-only JSONL of {"index", "prediction"} lines; reopening the file resumes where it stopped.

    An index is an int or, for benchmarks whose TSV indices are text (HallusionBench), a string; it is written
    and read back as it is. `done` maps index -> prediction for every complete line. A partial last line (a crash mid-write) is cut
    off on open, so new lines never glue onto it. Each line is flushed as soon as it is written.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.done: dict[int | str, str] = read_prediction_log(self.path, repair=True)
        self._file = self.path.open("a", encoding="utf-8")

    def add(self, index: int | str, prediction: str) -> None:
        """Record one prediction and flush it to disk."""
        index = _key(index)
        line = json.dumps({"index": index, "prediction": prediction}, ensure_ascii=False)
        self._file.write(line + "\n")
        self._file.flush()
        self.done[index] = prediction

    def close(self) -> None:
        """Close the file (further `add`s fail)."""
        self._file.close()

    def __enter__(self) -> PredictionStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_prediction_log(path: Path, repair: bool = False) -> dict[int | str, str]:
    """Index -> prediction from a PredictionStore file; a partial last line is ignored (cut off if repair)."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]  # b"" when no line is complete
    if repair and len(complete) < len(raw):
        with path.open("r+b") as f:
            f.truncate(len(complete))
    done = {}
    for number, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line)
            prediction = record["prediction"]
            done[_key(record["index"])] = "" if prediction is None else str(prediction)  # null: no answer
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: line {number} is not an {{index, prediction}} record ({e})") from None
    return done


def gather_predictions(run_dir: Path) -> dict[int | str, str]:
    """Index -> prediction over every rank's log in run_dir (a cut-off last line is ignored)."""
    predictions: dict[int | str, str] = {}
    for log in sorted(run_dir.glob(LOG_GLOB)):
        predictions.update(read_prediction_log(log))
    return predictions


def _key(index) -> int | str:
    """A log key: text stays text, anything else (an int, numpy's int64) becomes an int."""
    return index if isinstance(index, str) else int(index)
