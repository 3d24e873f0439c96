"""`vlmtune chat`: talk with a trained model about an image, interactively, from --prompt, or over a JSONL file.

    inputs checked (image, template, batch file) -> loading.load_generator -> Conversation.ask per turn
        -> Generator.embed + Generator.generate_embeds (the one generation path, shared with mmbench)

A conversation keeps the LLM's KV cache between turns: turn n+1's ids are the training layout of the whole
history (previous answers re-tokenized as in training data), and only the ids after the longest prefix the
cache already holds are run. The image is encoded once (CLIP + projector) and its features reused.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from vlmtune.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from vlmtune.data.image import load_image
from vlmtune.data.llava_json import RecordError, check_unicode, place_image_tags
from vlmtune.data.templates import get_template
from vlmtune.errors import UserError
from vlmtune.inference import Generator

DEFAULT_MAX_NEW_TOKENS = 2048  # XTuner chat's default
BATCH_SIZE = 8  # --batch prompts per generate call
PROMPT = "\ndouble enter to end input (EXIT: exit chat, RESET: reset history) >>> "


class Conversation:
    """One chat: its turns, the images' features, and the KV cache of the ids already run through the LLM."""

    def __init__(self, generator: Generator, *images: Image.Image):
        self.generator = generator
        self.n_images = len(images)
        self.features = generator.encode_images(list(images)) if images else None  # [N, P, D] or N x [L_i, D], once
        self.image_lengths = [len(f) for f in self.features] if images else []  # positions per image
        self.reset()

    def reset(self) -> None:
        """Forget the history (the image stays)."""
        from transformers import DynamicCache

        self.turns: list[tuple[str, str]] = []
        self.cache = DynamicCache(config=self.generator.model.llm.config)
        self.cached_ids: list[int] = []  # ids whose keys/values the cache holds, in order

    @torch.inference_mode()
    def ask(self, text: str, streamer=None, **gen_kwargs) -> str:
        """The answer to `text` given the history; the turn is added to the history."""
        user = (with_images(text, self.n_images) if not self.turns else text.replace(DEFAULT_IMAGE_TOKEN, "")).strip()
        ids = self.generator.prompt_ids([*self.turns, (user, None)])
        gen_kwargs = fit_context(self.generator, [ids], gen_kwargs, "the conversation; RESET starts over",
                                 self.image_lengths)
        self._reuse_cache(ids)
        inputs = self.generator.embed([ids], self.features if IMAGE_TOKEN_INDEX in ids else None)
        new = self.generator.generate_embeds(inputs, cache=self.cache, streamer=streamer, **gen_kwargs)[0].tolist()
        self.cached_ids = ids + new[:-1]  # generate never runs its last token through the model
        answer = self.generator.decode(new)
        self.turns.append((user, answer))
        return answer

    def _reuse_cache(self, ids: list[int]) -> None:
        """Crop the cache to the longest prefix of `ids` it holds (at least one id is left to run)."""
        keep = 0
        limit = min(len(self.cached_ids), len(ids) - 1)
        while keep < limit and self.cached_ids[keep] == ids[keep]:
            keep += 1
        held = self.cache.get_seq_length()
        if held != self.generator.expanded_length(self.cached_ids, self.image_lengths):  # e.g. a generate that failed midway
            self.cache.reset()
            return
        drop = held - self.generator.expanded_length(ids[:keep], self.image_lengths)
        if drop:
            self.cache.crop(-drop)


def fit_context(generator: Generator, prompts: list[list[int]], gen_kwargs: dict, what: str,
                image_lengths: list[int] | None = None) -> dict:
    """`gen_kwargs` with max_new_tokens cut to the room the longest prompt leaves in the LLM's context; a
    UserError naming `what` when a prompt (images expanded: `image_lengths` each, by default the most an
    image can take) fills the context by itself."""
    length = max(generator.expanded_length(p, image_lengths) for p in prompts)
    limit = generator.context_length
    if length >= limit:
        raise UserError(f"{what}: {length} tokens (images counted), the model's context is {limit}")
    return {**gen_kwargs, "max_new_tokens": min(gen_kwargs.get("max_new_tokens", limit), limit - length)}


def generation_kwargs(args) -> dict:
    """generate() settings from the flags: greedy at temperature 0, else sampling with top-k/top-p."""
    kwargs = dict(max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                  repetition_penalty=args.repetition_penalty)
    if args.temperature > 0:
        kwargs.update(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    return kwargs


def main(args) -> int:
    """CLI entry: check the inputs, load the model, then batch / prompts / interactive."""
    if args.prompt_template:
        get_template(args.prompt_template)  # an unknown name fails before the model loads
    images = [_open_image(path) for path in args.image or []]
    batch = read_batch(Path(args.batch)) if args.batch else None
    from vlmtune.loading import load_generator

    generator = load_generator(args)
    extra = tuple(w for w in args.stop_words if w not in generator.template.stop_words)
    generator.template = dataclasses.replace(generator.template, stop_words=generator.template.stop_words + extra)
    torch.manual_seed(args.seed)
    kwargs = generation_kwargs(args)
    if batch is not None:
        return answer_batch(generator, batch, args.output, kwargs)
    conversation = Conversation(generator, *images)
    if args.prompt:
        for text in args.prompt:
            _answer(conversation, text, args.no_streamer, kwargs)
        return 0
    return interact(conversation, args.no_streamer, kwargs)


def _open_image(path: str, flag: str = "--image") -> Image.Image:
    try:
        return load_image(path)
    except RecordError as e:
        raise UserError(f"{flag} {path}: {e}") from None


def _answer(conversation: Conversation, text: str, no_streamer: bool, kwargs: dict) -> str:
    """Ask, printing the answer as it is generated (or at the end with --no-streamer)."""
    from transformers import TextStreamer

    streamer = None if no_streamer else TextStreamer(conversation.generator.tokenizer, skip_prompt=True, skip_special_tokens=True)
    answer = conversation.ask(text, streamer=streamer, **kwargs)
    if streamer is None:
        print(answer, flush=True)
    return answer


def read_input() -> str | None:
    """Lines up to an empty line (XTuner's double enter); None at the end of input."""
    print(PROMPT, end="", flush=True)
    lines: list[str] = []
    while True:
        line = sys.stdin.readline()
        if not line:  # end of input
            return "\n".join(lines) if lines else None
        line = line.rstrip("\r\n")
        if line:
            lines.append(line)
        elif lines:
            return "\n".join(lines)


def interact(conversation: Conversation, no_streamer: bool, kwargs: dict) -> int:
    """The interactive loop: RESET forgets the history, EXIT (or end of input) quits."""
    while True:
        text = read_input()
        if text is None or text.strip() == "EXIT":
            print("Log: Exit!")
            return 0
        if text.strip() == "RESET":
            conversation.reset()
            print("Log: History responses have been removed!")
            continue
        try:
            _answer(conversation, text, no_streamer, kwargs)
        except UserError as e:  # a full context: say so and keep the session (the turn is not added)
            print(f"Log: {e}", flush=True)


def read_batch(path: Path) -> list[tuple[dict, Path | None]]:
    """(record, image path) of each line of a JSONL file of {"image": optional path, "prompt": text}, any other
    keys kept; image paths are relative to the file's folder. Every line is checked before the model loads."""
    if not path.is_file():
        raise UserError(f"--batch {path}: no such file")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f"{path}:{n}: each line must be an object with a string 'prompt'")
        try:
            check_unicode(record["prompt"], "'prompt'")
        except RecordError as e:
            raise UserError(f"{path}:{n}: {e.detail}") from None
        value = record.get("image")
        names = [] if value is None else value if isinstance(value, list) else [value]
        if not all(isinstance(name, str) for name in names):
            raise UserError(f"{path}:{n}: 'image' must be a path or a list of paths")
        images = [path.parent / name for name in names]
        for name, image in zip(names, images):
            if not image.is_file():
                raise UserError(f"{path}:{n}: image {name!r} not found (paths are relative to the file)")
        try:
            with_images(record["prompt"], len(images))
        except UserError as e:
            raise UserError(f"{path}:{n}: {e}") from None
        items.append((record, images))
    return items


def answer_batch(generator: Generator, items: list[tuple[dict, list[Path]]], output: str | None, kwargs: dict) -> int:
    """Each record + its "answer", as JSONL on `output` (stdout without one), BATCH_SIZE prompts at a time."""
    out = open(output, "w", encoding="utf-8") if output else sys.stdout
    try:
        for start in range(0, len(items), BATCH_SIZE):
            chunk = items[start:start + BATCH_SIZE]
            images = [[_open_image(str(image), "--batch image") for image in paths] for _, paths in chunk]
            prompts = [generator.prompt_ids([(with_images(r["prompt"], len(ims)), None)]) for (r, _), ims in zip(chunk, images)]
            where = f"--batch lines {start + 1}-{start + len(chunk)} (non-empty lines; answers before them are written)"
            fitted = fit_context(generator, prompts, kwargs, where)
            for (record, _), ids in zip(chunk, generator.generate_ids(prompts, images, **fitted)):
                out.write(json.dumps({**record, "answer": generator.decode(ids)}, ensure_ascii=False) + "\n")
            out.flush()
    finally:
        if output:
            out.close()
    return 0


def with_images(prompt: str, n_images: int) -> str:
    """A first turn with the `<image>` tags of `n_images` images, placed as the data format places them
    (llava_json.place_image_tags): none written -> one per image in front; written -> as written (one moves to
    the front, several stay interleaved). A count that does not match the images is a user error."""
    tags = prompt.count(DEFAULT_IMAGE_TOKEN)
    if tags == 0:
        prompt = f"{DEFAULT_IMAGE_TOKEN}\n" * n_images + prompt
    elif tags != n_images:
        raise UserError(f"the prompt has {tags} <image> tag(s) for {n_images} image(s): write one per image, in "
                        "order, or none (they then go in front)")
    return place_image_tags(prompt) if n_images else prompt
