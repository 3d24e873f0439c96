"""Token ids and labels for conversations: THE masking rule, in one place.

Training, in-training evaluation, chat and MMBench all build their ids here, so a prompt at inference is
byte-for-byte the prefix the model saw in training. The rule is XTuner's `encode_fn` + `template_map_fn`:

- BOS (no loss) before the first turn, and again before a turn that follows an EOS;
- the rendered instruction (system text on turn 1) has no loss; each `<image>` in it becomes one
  IMAGE_TOKEN_INDEX id;
- the answer plus the template suffix has loss; EOS (with loss) follows unless the suffix is the EOS;
- the separator after an answer has no loss.

`max_length` counts every image as the tokens it expands to (`image_length`: one count for every image, or
with AnyRes each image's own, from its size), and truncation never cuts through an image slot.

Three steps, shared by one conversation (chat, eval) and 665K of them (the dataset cache):
`render_units` lays a conversation out as encoding units (text or a ready id, with its loss flag) - the rule
itself; `encode_texts` encodes the units' texts in one batched call (the Rust tokenizer, as
`tokenizer.encode(text, add_special_tokens=False)` would one by one); `assemble` concatenates and truncates,
vectorised over all conversations.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from vlmtune.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vlmtune.data.templates import Template

Unit = tuple  # (text: str to encode | id: int, supervised: bool)
# positions each image slot expands to: one count for all, or (AnyRes) per conversation, one count per image
ImageLengths = int | list[list[int]]


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


@dataclass
class TokenizedBatch:
    """Many samples' ids/labels, concatenated: sample i is input_ids[offsets[i] : offsets[i + 1]].

    input_ids, labels: [T] int32; offsets: [N + 1] int64; lengths (image-expanded), num_images: [N] int64;
    truncated, trainable: [N] bool.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    num_images: np.ndarray
    truncated: np.ndarray
    trainable: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> Tokenized:
        s, e = self.offsets[i], self.offsets[i + 1]
        return Tokenized(self.input_ids[s:e].tolist(), self.labels[s:e].tolist(), int(self.lengths[i]),
                         int(self.num_images[i]), bool(self.truncated[i]))


def special_ids(tokenizer) -> tuple[list[int], list[int]]:
    """(bos, eos) id lists; a tokenizer without a BOS (Qwen2) gets none, as in XTuner."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return bos, eos


def prompt_units(text: str) -> list[Unit]:
    """`text` cut at each `<image>` (one IMAGE_TOKEN_INDEX id each); chunks are encoded separately, as XTuner
    and LLaVA do, so ids match theirs. No loss."""
    units = []
    for i, chunk in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
        if i:
            units.append((IMAGE_TOKEN_INDEX, False))
        if chunk:
            units.append((chunk, False))
    return units


def render_units(turns, template: Template, system: str, bos: list[int], eos: list[int]) -> list[Unit]:
    """The encoding units of `turns` = [(user, assistant), ...] in order, each with its loss flag.

    A last turn whose assistant text is None ends with its instruction: the generation prompt, exactly the
    prefix the same turn has in training.
    """
    units: list[Unit] = []
    needs_bos = True
    for round_idx, (user, answer) in enumerate(turns, start=1):
        if needs_bos:
            units += [(i, False) for i in bos]
        units += prompt_units(template.render_input(user, round_idx, system))
        if answer is None:
            break
        units.append((template.render_output(answer), True))
        needs_bos = not template.suffix_as_eos
        if needs_bos:
            units += [(i, True) for i in eos]
        if template.sep:
            units.append((template.sep, False))
    return units


def encode_texts(texts: list[str], tokenizer) -> list[list[int]]:
    """`[tokenizer.encode(t, add_special_tokens=False) for t in texts]`, in one batched call.

    A Rust (`tokenizers`) tokenizer whose class encodes the standard way is called through
    `encode_batch_fast` (no offsets), provided its backend is in the state `encode` puts it in (no
    truncation or padding, the same special-token splitting); any other tokenizer through `tokenizer(texts)`.
    """
    if not texts:
        return []
    if _standard_fast(tokenizer):
        backend = tokenizer.backend_tokenizer
        if backend.truncation is None and backend.padding is None and backend.encode_special_tokens == tokenizer.split_special_tokens:
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _standard_fast(tokenizer) -> bool:
    """A `tokenizers`-backed tokenizer that overrides none of transformers' encoding steps (CodeLlama's,
    for one, rewrites the text in Python first)."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    cls = type(tokenizer)
    return (isinstance(tokenizer, TokenizersBackend) and cls._encode_plus is TokenizersBackend._encode_plus
            and cls.encode is PreTrainedTokenizerBase.encode and cls.__call__ is PreTrainedTokenizerBase.__call__)


def tokenize_conversations(conversations, tokenizer, template: Template, max_length: int,
                           image_length: ImageLengths) -> TokenizedBatch:
    """ids + labels of many `(turns, system)` conversations; each distinct text is encoded once."""
    bos, eos = special_ids(tokenizer)
    rendered = [render_units(turns, template, system, bos, eos) for turns, system in conversations]
    texts = list(dict.fromkeys(u for units in rendered for u, _ in units if isinstance(u, str)))
    encoded = dict(zip(texts, encode_texts(texts, tokenizer)))
    return assemble(rendered, encoded, max_length, image_length)


def tokenize_conversation(turns, tokenizer, template: Template, max_length: int, image_length: int | list[int],
                          system: str = "") -> Tokenized:
    """ids + labels for `turns` = [(user, assistant), ...] (see `render_units`); `image_length`: positions
    of every image, or a list with each image's own."""
    lengths = image_length if isinstance(image_length, int) else [list(image_length)]
    return tokenize_conversations([(turns, system)], tokenizer, template, max_length, lengths)[0]


def assemble(rendered: list[list[Unit]], encoded: dict[str, list[int]], max_length: int,
             image_length: ImageLengths) -> TokenizedBatch:
    """Concatenate each conversation's units (texts looked up in `encoded`), then truncate them all."""
    pieces = [encoded[u] if isinstance(u, str) else (u,) for units in rendered for u, _ in units]
    sizes = np.fromiter(map(len, pieces), np.int64, count=len(pieces))
    ids = np.fromiter(itertools.chain.from_iterable(pieces), np.int32, count=int(sizes.sum()))
    supervised = np.fromiter((s for units in rendered for _, s in units), bool, count=len(pieces))
    labels = np.where(np.repeat(supervised, sizes), ids, np.int32(IGNORE_INDEX)).astype(np.int32)
    unit_ends = np.cumsum(np.fromiter(map(len, rendered), np.int64, count=len(rendered)))
    token_ends = np.concatenate([[0], np.cumsum(sizes)])[unit_ends]
    if not isinstance(image_length, int):  # one count per image slot, in order over all conversations
        slots = [sum(1 for u, _ in units if u == IMAGE_TOKEN_INDEX) for units in rendered]
        if slots != [len(x) for x in image_length]:
            raise ValueError(f"image slots per conversation {slots} != image lengths given {image_length}")
        image_length = np.fromiter(itertools.chain.from_iterable(image_length), np.int64, count=sum(slots))
    return truncate_batch(ids, labels, np.concatenate([[0], token_ends]), max_length, image_length)


def truncate_batch(ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, max_length: int,
                   image_length: int | np.ndarray) -> TokenizedBatch:
    """Cut each sample so its image-expanded length fits `max_length`; an image is kept whole or dropped.
    `image_length`: positions of every image slot, or [number of image slots] one per slot, in order."""
    starts, ends = offsets[:-1], offsets[1:]
    is_image = ids == IMAGE_TOKEN_INDEX
    widths = np.ones(len(ids), dtype=np.int64)
    widths[is_image] = image_length
    # expanded[j] = expanded position where token j starts (cumulative over all samples, increasing)
    expanded = np.concatenate([[0], np.cumsum(widths)])
    # a sample keeps the tokens that end within max_length of its start: a prefix, found by one search
    limit = min(max_length, int(expanded[-1]))  # no overflow for max_length = sys.maxsize
    stops = np.minimum(np.searchsorted(expanded[1:], expanded[starts] + limit, side="right"), ends)
    images = np.concatenate([[0], np.cumsum(is_image)])
    targets = np.concatenate([[0], np.cumsum(labels != IGNORE_INDEX)])
    truncated = stops < ends
    keep = np.ones(len(ids), dtype=bool)
    for i in np.flatnonzero(truncated):
        keep[stops[i] : ends[i]] = False
    return TokenizedBatch(
        input_ids=ids[keep], labels=labels[keep], offsets=np.concatenate([[0], np.cumsum(stops - starts)]),
        lengths=expanded[stops] - expanded[starts], num_images=images[stops] - images[starts],
        truncated=truncated, trainable=targets[stops] > targets[starts],
    )


def truncate(ids: list[int], labels: list[int], max_length: int, image_length: int | list[int]) -> Tokenized:
    """One sample's `truncate_batch`: ids/labels cut to fit `max_length` (images counted expanded: every
    one `image_length`, or a list with each image's own)."""
    lengths = image_length if isinstance(image_length, int) else np.asarray(image_length, dtype=np.int64)
    batch = truncate_batch(np.asarray(ids, dtype=np.int32).reshape(-1), np.asarray(labels, dtype=np.int32).reshape(-1),
                           np.array([0, len(ids)]), max_length, lengths)
    return batch[0]
