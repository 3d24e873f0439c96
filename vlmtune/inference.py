"""Generation with a LlavaModel: the one path used by chat, MMBench and in-training evaluation.

A prompt is tokenized by the same function as training data (data/tokenize.py), so the model sees at
inference exactly the prefix it was trained on. Batches are left-padded after the image splice, then
handed to the LLM's `generate` as `inputs_embeds`.

Prompts that share their images and the ids in front of them (MMBench's circular rotations differ only in the
options, after the image, hint and question) can go through `generate_shared`: each group's images are encoded
and its shared prefix prefilled once, and only the differing suffixes run per prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from vlmtune.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from vlmtune.data.image import ImagePreprocessor
from vlmtune.data.templates import Template
from vlmtune.data.tokenize import tokenize_conversation
from vlmtune.model.llava import LlavaModel, splice_image_features

NO_LIMIT = 1 << 30  # prompts are never truncated at inference
Group = tuple[list[Image.Image], list[list[int]]]  # (images, the prompts' ids that share them), generate_shared


@dataclass
class Generator:
    """A model with everything needed to turn (image, text) into an answer."""

    model: LlavaModel
    tokenizer: object
    template: Template
    preprocess: ImagePreprocessor
    image_length: int  # tokens per image (P)
    system: str = ""

    def prompt_ids(self, turns: list[tuple[str, str | None]]) -> list[int]:
        """Ids of a conversation whose last answer is None: the training prefix of that answer."""
        return tokenize_conversation(turns, self.tokenizer, self.template, NO_LIMIT, self.image_length, self.system).input_ids

    @property
    def context_length(self) -> int:
        """Positions the LLM was built for (`max_position_embeddings`): a prompt and its answer must fit."""
        return self.model.llm.config.get_text_config().max_position_embeddings

    def expanded_length(self, ids: list[int], image_lengths: list[int] | None = None) -> int:
        """Sequence positions of `ids` in the LLM: image slot i takes image_lengths[i] positions (by default
        `image_length` each: the most an image can take)."""
        slots = ids.count(IMAGE_TOKEN_INDEX)
        lengths = image_lengths[:slots] if image_lengths is not None else [self.image_length] * slots
        return len(ids) - slots + sum(lengths)

    @property
    def device(self) -> torch.device:
        return self.model.projector.first.weight.device

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor | None:
        """[T, 3, H, W] on the model's device: each image's encoder inputs, one or (AnyRes) several tiles; None
        without images."""
        if not images:
            return None
        return torch.cat([self.preprocess.tiles(im) for im in images]).to(self.device)

    def image_sizes(self, images: list[Image.Image]) -> torch.Tensor:
        """[N, 2]: the images' (height, width), which AnyRes tiles by."""
        return torch.tensor([(im.height, im.width) for im in images], dtype=torch.long).reshape(-1, 2)

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image]):
        """Projected image features, [N, P, D] or (AnyRes) one [L_i, D] per image (CLIP + projector run here, once
        per image), None without images."""
        pixels = self.pixel_values(images)
        return None if pixels is None else self.model.encode_images(pixels, self.image_sizes(images))

    @torch.inference_mode()
    def embed(self, prompts: list[list[int]], features) -> dict[str, torch.Tensor]:
        """Left-padded inputs_embeds [B, L, D] + attention_mask [B, L]: `features` spliced at the image slots."""
        T = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        text_embeds = self.model.llm.get_input_embeddings()(input_ids.clamp(min=0))  # image ids: dummy rows
        return splice_image_features(text_embeds, input_ids, mask, None, features, padding_side="left")

    @torch.inference_mode()
    def generate_embeds(self, inputs: dict[str, torch.Tensor], **gen_kwargs) -> torch.Tensor:
        """The one call into the LLM's `generate`: new ids [B, new] (padded after EOS) for `embed`'s output.

        Chat and `generate_shared` pass `cache=` (a DynamicCache holding a prefix of these embeddings), chat also
        `streamer=`; generate then runs only the positions the cache lacks.
        """
        return self.model.llm.generate(
            inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            stop_strings=list(self.template.stop_words) or None, tokenizer=self.tokenizer, **gen_kwargs,
        )

    def generate_ids(self, prompts: list[list[int]], images: list[list[Image.Image]], **gen_kwargs) -> list[list[int]]:
        """New token ids for each prompt (ids with IMAGE_TOKEN_INDEX slots) and its images, batched."""
        features = self.encode_images([im for ims in images for im in ims])
        out = self.generate_embeds(self.embed(prompts, features), **gen_kwargs)
        return [self._strip(row.tolist()) for row in out]

    def generate_shared(self, groups: list[Group], **gen_kwargs) -> list[list[list[int]]]:
        """New ids per prompt, per group, for groups of prompts that share their images and a prefix of ids.

        A group is (images, prompts): its prompts hold the same image slots, for these images, in the ids they
        share (MMBench's circular rotations: same image, hint and question; the options differ). The ids are
        those of `generate_ids` on all the prompts (greedy; the logits agree to float rounding), but each group's
        images are encoded and its prefix prefilled once instead of once per prompt (`shared_inputs`); decoding
        runs batched over every prompt. Without a group of two or more prompts, or for a remote-code LLM (the
        prefill passes transformers' `cache=` / `logits_to_keep=`: `LlavaModel.transformers_llm`), this is
        `generate_ids`.
        """
        sizes = [len(prompts) for _, prompts in groups]
        if max(sizes) < 2 or not self.model.transformers_llm:
            images = [ims for ims, prompts in groups for _ in prompts]
            out = self.generate_ids([p for _, prompts in groups for p in prompts], images, **gen_kwargs)
        else:
            inputs, cache = self.shared_inputs(groups)
            out = [self._strip(row.tolist()) for row in self.generate_embeds(inputs, cache=cache, **gen_kwargs)]
        return _split(out, sizes)

    @torch.inference_mode()
    def shared_inputs(self, groups: list[Group]):
        """`generate_embeds` inputs and the KV cache that holds every group's shared prefix, for `generate_shared`.

        G groups, B prompts in all, P patches per image, D hidden:
            1. CLIP + projector on every group's images at once: features [N, P, D] (AnyRes: N of [L_i, D])
            2. each group's prefix (the longest common prefix of its prompts' ids, at least one id left to each
               prompt), spliced, alone through the LLM: unpadded, so the causal attention path, no mask
            3. those caches left-padded with zeros to the longest, Lp, each copied to its group's prompts: one
               DynamicCache of [B, heads, Lp, head_dim] per layer (`_shared_cache`)
            4. the suffixes (the ids after the prefix) embedded and left-padded to Ls, behind Lp unused rows:
               inputs_embeds [B, Lp + Ls, D], of which generate runs only the last Ls (the cache holds the rest);
               attention_mask [B, Lp + Ls] is 0 on the prefix padding and the suffix padding, so the positions
               generate takes from its cumsum continue each prefix's as in one unpadded pass.
        """
        cuts = [shared_prefix_length(prompts) for _, prompts in groups]
        features = self.encode_images([im for images, _ in groups for im in images])
        per_group = _split(features, [len(ims) for ims, _ in groups]) if features is not None else [None] * len(groups)
        caches = [self._prefill(prompts[0][:n], f) for (_, prompts), n, f in zip(groups, cuts, per_group)]
        cache, prefix_mask = self._shared_cache(caches, [len(prompts) for _, prompts in groups])
        suffix = self.embed([p[n:] for (_, prompts), n in zip(groups, cuts) for p in prompts], None)
        embeds = suffix["inputs_embeds"]  # [B, Ls, D]
        unused = embeds.new_zeros(len(embeds), prefix_mask.shape[1], embeds.shape[-1])
        inputs = {"inputs_embeds": torch.cat([unused, embeds], 1),
                  "attention_mask": torch.cat([prefix_mask, suffix["attention_mask"]], 1)}
        return inputs, cache

    @torch.inference_mode()
    def _prefill(self, prefix: list[int], features):
        """The DynamicCache of one prompt prefix: keys and values [1, heads, L, head_dim] per layer."""
        from transformers import DynamicCache

        inputs = self.embed([prefix], features)  # no padding: the mask is all ones
        cache = DynamicCache(config=self.model.llm.config)
        self.model.llm(**inputs, cache=cache, use_cache=True, logits_to_keep=1)  # one logits row, not L
        return cache

    def _shared_cache(self, caches: list, sizes: list[int]):
        """One DynamicCache of `sum(sizes)` rows, cache g repeated sizes[g] times, left-padded with zeros to the
        longest: [B, heads, Lp, head_dim] per layer; and the attention_mask [B, Lp] (0 over the padding)."""
        from transformers import DynamicCache

        lengths = [c.get_seq_length() for c in caches]
        Lp = max(lengths)
        shared = DynamicCache(config=self.model.llm.config)
        for i in range(len(caches[0].layers)):
            layers = [c.layers[i] for c in caches]  # [1, heads, L_g, head_dim] keys and values per group
            keys = torch.cat([_repeat_left_padded(layer.keys, Lp, size) for layer, size in zip(layers, sizes)])
            values = torch.cat([_repeat_left_padded(layer.values, Lp, size) for layer, size in zip(layers, sizes)])
            shared.update(keys, values, i)  # an empty cache's update stores them: [B, heads, Lp, head_dim]
        mask = torch.tensor([[0] * (Lp - n) + [1] * n for n, size in zip(lengths, sizes) for _ in range(size)],
                            device=self.device)
        return shared, mask

    def _strip(self, ids: list[int]) -> list[int]:
        """Drop padding after the answer ends."""
        pad = self.tokenizer.pad_token_id
        while ids and ids[-1] == pad:
            ids.pop()
        return ids

    def decode(self, ids: list[int]) -> str:
        """Answer text without special tokens and without a trailing stop word."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for word in self.template.stop_words:
            if word.strip() and text.endswith(word):
                text = text[: -len(word)]
        return text.strip()

    def answer(self, question: str, image: Image.Image | None, max_new_tokens: int = 64, **gen_kwargs) -> str:
        """Greedy (by default) single-turn answer; `question` may contain `<image>`, added in front if missing."""
        if image is not None and DEFAULT_IMAGE_TOKEN not in question:
            question = f"{DEFAULT_IMAGE_TOKEN}\n{question}"
        ids = self.prompt_ids([(question, None)])
        gen_kwargs.setdefault("do_sample", False)
        out = self.generate_ids([ids], [[image] if image is not None else []], max_new_tokens=max_new_tokens, **gen_kwargs)
        return self.decode(out[0])


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """Ids at the start of every prompt, leaving at least one id of each to run; image slots must lie inside."""
    limit = min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    if any(IMAGE_TOKEN_INDEX in p[n:] for p in prompts):
        raise ValueError("prompts sharing images must hold every image slot in their shared prefix")
    return n


def _repeat_left_padded(states: torch.Tensor, length: int, size: int) -> torch.Tensor:
    """[1, heads, L, head_dim] -> [size, heads, length, head_dim], zeros in front (masked out: never attended)."""
    return F.pad(states, (0, 0, length - states.shape[-2], 0)).expand(size, -1, -1, -1)


def _split(items: list, sizes: list[int]) -> list[list]:
    """`items` cut into consecutive runs of `sizes`."""
    out, start = [], 0
    for size in sizes:
        out.append(items[start : start + size])
        start += size
    return out
