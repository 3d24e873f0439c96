"""Token ids and labels for one conversation: THE masking rule, in one place.

Training, in-training evaluation, chat and MMBench all build their ids here, so a prompt at inference is
byte-for-byte the prefix the model saw in training. The rule is XTuner's `encode_fn` + `template_map_fn`:

- BOS (no loss) before the first turn, and again before a turn that follows an EOS;
- the rendered instruction (system text on turn 1) has no loss; each `<image>` in it becomes one
  IMAGE_TOKEN_INDEX id;
- the answer plus the template suffix has loss; EOS (with loss) follows unless the suffix is the EOS;
- the separator after an answer has no loss.

`max_length` counts every image as the `image_length` tokens it expands to, and truncation never cuts
through an image slot.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmtune.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vlmtune.data.templates import Template


@dataclass
class Tokenized:
    """ids/labels of one sample. `length` is the sequence length after image expansion."""

    input_ids: list[int]
    labels: list[int]
    length: int
    num_images: int
    truncated: bool

    @property
    def trainable(self) -> bool:
        """Whether any label is left for the loss (a fully truncated answer trains nothing)."""
        return any(label != IGNORE_INDEX for label in self.labels)


def encode_text(text: str, tokenizer) -> list[int]:
    """Ids of `text` with each `<image>` replaced by IMAGE_TOKEN_INDEX; no special tokens added.

    Chunks between images are encoded separately, as XTuner and LLaVA do, so ids match theirs.
    """
    chunks = text.split(DEFAULT_IMAGE_TOKEN)
    ids: list[int] = []
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        if chunk:
            ids.extend(tokenizer.encode(chunk, add_special_tokens=False))
    return ids


def special_ids(tokenizer) -> tuple[list[int], list[int]]:
    """(bos, eos) id lists; a tokenizer without a BOS (Qwen2) gets none, as in XTuner."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return bos, eos


def tokenize_conversation(
    turns: list[tuple[str, str | None]],
    tokenizer,
    template: Template,
    max_length: int,
    image_length: int,
    system: str = "",
) -> Tokenized:
    """ids + labels for `turns` = [(user, assistant), ...].

    A last turn whose assistant text is None yields the generation prompt (instruction only), which is
    exactly the prefix the same turn has in training.
    """
    bos, eos = special_ids(tokenizer)
    sep_ids = tokenizer.encode(template.sep, add_special_tokens=False) if template.sep else []
    ids: list[int] = []
    labels: list[int] = []
    needs_bos = True
    for round_idx, (user, answer) in enumerate(turns, start=1):
        if needs_bos:
            ids += bos
            labels += [IGNORE_INDEX] * len(bos)
        prompt = encode_text(template.render_input(user, round_idx, system), tokenizer)
        ids += prompt
        labels += [IGNORE_INDEX] * len(prompt)
        if answer is None:
            break
        out = tokenizer.encode(template.render_output(answer), add_special_tokens=False)
        ids += out
        labels += out
        needs_bos = not template.suffix_as_eos
        if needs_bos:
            ids += eos
            labels += eos
        ids += sep_ids
        labels += [IGNORE_INDEX] * len(sep_ids)
    return truncate(ids, labels, max_length, image_length)


def truncate(ids: list[int], labels: list[int], max_length: int, image_length: int) -> Tokenized:
    """Cut ids/labels so the image-expanded length fits `max_length`; an image is kept whole or dropped."""
    widths = np.where(np.asarray(ids, dtype=np.int64) == IMAGE_TOKEN_INDEX, image_length, 1)
    ends = np.cumsum(widths)  # expanded length after each token
    keep = int(np.searchsorted(ends, max_length, side="right"))
    truncated = keep < len(ids)
    ids, labels = ids[:keep], labels[:keep]
    return Tokenized(
        input_ids=ids,
        labels=labels,
        length=int(ends[keep - 1]) if keep else 0,
        num_images=ids.count(IMAGE_TOKEN_INDEX),
        truncated=truncated,
    )
