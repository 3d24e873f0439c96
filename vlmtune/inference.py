"""Generation with a LlavaModel: the one path used by chat, MMBench and in-training evaluation.

A prompt is tokenized by the same function as training data (data/tokenize.py), so the model sees at
inference exactly the prefix it was trained on. Batches are left-padded after the image splice, then
handed to the LLM's `generate` as `inputs_embeds`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from vlmtune.data.image import ImagePreprocessor
from vlmtune.data.templates import Template
from vlmtune.data.tokenize import tokenize_conversation
from vlmtune.model.llava import LlavaModel, splice_image_features

NO_LIMIT = 1 << 30  # prompts are never truncated at inference


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
    def device(self) -> torch.device:
        return self.model.projector.model[0].weight.device

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor | None:
        """[N, 3, H, W] on the model's device, or None without images."""
        if not images:
            return None
        return torch.stack([self.preprocess(im) for im in images]).to(self.device)

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor | None:
        """Projected image features [N, P, D] (CLIP + projector run here, once per image), None without images."""
        pixels = self.pixel_values(images)
        return None if pixels is None else self.model.encode_images(pixels)

    @torch.inference_mode()
    def embed(self, prompts: list[list[int]], features: torch.Tensor | None) -> dict[str, torch.Tensor]:
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

        Chat passes `cache=` (a DynamicCache holding a prefix of these embeddings) and `streamer=`; generate
        then runs only the positions the cache lacks.
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
        from vlmtune.constants import DEFAULT_IMAGE_TOKEN

        if image is not None and DEFAULT_IMAGE_TOKEN not in question:
            question = f"{DEFAULT_IMAGE_TOKEN}\n{question}"
        ids = self.prompt_ids([(question, None)])
        gen_kwargs.setdefault("do_sample", False)
        out = self.generate_ids([ids], [[image] if image is not None else []], max_new_tokens=max_new_tokens, **gen_kwargs)
        return self.decode(out[0])
