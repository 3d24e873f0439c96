"""Static batching of concurrent requests through Generator.generate_ids (the path chat --batch uses).

One worker thread owns the model. It takes the oldest waiting job, then collects for WINDOW_S more jobs with
the same sampling settings (temperature, top_p, seed) up to max_batch_size; other jobs wait for a later
batch, oldest first. A job therefore waits at most WINDOW_S plus the batches queued ahead of it.

Per-row streaming, stop strings, max_tokens, cancellation and the timeout all run in one StoppingCriteria that
generate calls after every step with the new ids [B, t]: it decodes each row, hands the new text to the job's
asyncio queue, and marks rows finished (generate pads them from then on). A seed is exact only at batch size
1: it seeds the batch, and other rows change the sampling draws.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from vlmtune.chat import fit_context
from vlmtune.errors import UserError
from vlmtune.inference import Generator

WINDOW_S = 0.015  # collection window after the first job of a batch


@dataclass
class Job:
    """One request's inputs, its settings, and the queue its events go to (("delta", text) / ("done", ...))."""

    ids: list[int]
    images: list[Image.Image]
    max_tokens: int
    key: tuple  # (temperature, top_p, seed): jobs share a batch only when equal
    stop: tuple[str, ...]
    deadline: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    sent: str = ""
    finish: str | None = None  # set when the criterion ends the row

    def emit(self, *event) -> None:
        """Hand an event to the request's coroutine (thread-safe)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one occurred."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class RowCriterion(StoppingCriteria):
    """Called by generate after each step: streams each row's new text and ends rows that are done."""

    def __init__(self, generator: Generator, jobs: list[Job], batcher: "Batcher"):
        self.generator, self.jobs, self.batcher = generator, jobs, batcher

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = [self._step(job, row.tolist()) for job, row in zip(self.jobs, input_ids)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _step(self, job: Job, ids: list[int]) -> bool:
        """Stream the row's new text; True when the row must end (stop string, max_tokens, cancel, timeout)."""
        if job.finish is not None:
            return True
        text, stopped = cut_at_stop(self.generator.decode(ids), job.stop)
        hold = 0 if stopped else max((len(s) for s in job.stop), default=1) - 1  # a stop string may be starting
        visible = text[: len(text) - hold] if hold else text
        if visible.startswith(job.sent) and len(visible) > len(job.sent) and not visible.endswith("\ufffd"):
            job.emit("delta", visible[len(job.sent):])
            job.sent = visible
        if stopped:
            job.finish = "stop"
        elif len(ids) >= job.max_tokens:
            job.finish = "length"
        elif job.cancelled or time.monotonic() > job.deadline:
            job.finish = "cancelled"
            self.batcher.cancelled += job.cancelled
        return job.finish is not None


class Batcher:
    """The worker thread and its queue: submit() from the event loop, results come back on each job's queue."""

    def __init__(self, generator: Generator, max_batch_size: int):
        self.generator, self.max_batch_size = generator, max_batch_size
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.waiting: list[Job] = []  # taken from the queue but not batched yet (other settings), oldest first
        self.thread = threading.Thread(target=self._run, name="vlmtune-batcher", daemon=True)
        self.batch_sizes: list[int] = []  # one entry per generate call (/health reports them)
        self.cancelled = 0  # jobs whose client went away: skipped while queued, or their row ended early

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """End the worker after the jobs already queued."""
        self.queue.put(None)
        self.thread.join(timeout=60)

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def stats(self) -> dict:
        """What /health reports: generate calls, the largest batch, rows cancelled by a disconnect."""
        return {"batches": len(self.batch_sizes), "largest_batch": max(self.batch_sizes, default=0),
                "cancelled": self.cancelled}

    def _run(self) -> None:
        while (batch := self._collect()) is not None:
            self._generate(batch)

    def _collect(self) -> list[Job] | None:
        """The next batch: the oldest job and, within WINDOW_S, others with its settings; None at stop()."""
        first = self.waiting.pop(0) if self.waiting else self.queue.get()
        if first is None:
            return None
        batch = [first] + [j for j in self.waiting if j.key == first.key][: self.max_batch_size - 1]
        self.waiting = [j for j in self.waiting if j not in batch]
        end = time.monotonic() + WINDOW_S
        while len(batch) < self.max_batch_size and (left := end - time.monotonic()) > 0:
            try:
                job = self.queue.get(timeout=left)
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)  # stop after this batch
                break
            (batch if job.key == first.key else self.waiting).append(job)
        return batch

    def _generate(self, jobs: list[Job]) -> None:
        """One generate_ids call for the batch; every job gets ("done", text, finish, usage) or ("error", msg)."""
        self.cancelled += sum(j.cancelled for j in jobs)  # gone while queued: never generated
        jobs = [j for j in jobs if not j.cancelled]
        if not jobs:
            return
        self.batch_sizes.append(len(jobs))
        temperature, top_p, seed = jobs[0].key
        kwargs = dict(do_sample=False, temperature=None, top_k=None, top_p=None) if not temperature else \
            dict(do_sample=True, temperature=temperature, top_k=None, top_p=top_p)
        kwargs["max_new_tokens"] = max(j.max_tokens for j in jobs)
        try:
            kwargs = fit_context(self.generator, [j.ids for j in jobs], kwargs, "the prompt")
            if seed is not None:
                torch.manual_seed(seed)
            out = self.generator.generate_ids([j.ids for j in jobs], [j.images for j in jobs],
                                              stopping_criteria=StoppingCriteriaList([RowCriterion(self.generator, jobs, self)]),
                                              **kwargs)
        except UserError as e:  # a prompt over the context: the request's fault (wire.parse catches most first)
            for job in jobs:
                job.emit("error", str(e))
            return
        except Exception as e:  # a bug or out of memory: the batch gets a 500, the worker keeps serving
            for job in jobs:
                job.emit("error", f"generation failed: {type(e).__name__}: {e}")
            return
        for job, ids in zip(jobs, out):
            self._finish(job, ids, kwargs["max_new_tokens"])

    def _finish(self, job: Job, ids: list[int], max_new: int) -> None:
        """The job's final text (stop strings cut), finish_reason and usage; a timeout is an error event."""
        if job.finish == "cancelled":
            if not job.cancelled:  # the deadline, not a disconnect (nobody is listening then)
                job.emit("error", "timeout")
            return
        text, stopped = cut_at_stop(self.generator.decode(ids), job.stop)
        reason = job.finish or ("length" if len(ids) >= min(job.max_tokens, max_new) and not stopped else "stop")
        prompt = self.generator.expanded_length(job.ids, [self.generator.image_length] * len(job.images))
        usage = {"prompt_tokens": prompt, "completion_tokens": len(ids), "total_tokens": prompt + len(ids)}
        job.emit("done", text, reason, usage)
