"""The LLaVA model: CLIP encoder + projector + causal LM, and the splice that joins them.

Data flow for a batch (B samples, T text ids, N images in the whole batch, P patches per image):

    pixel_values [N, 3, H, W] --encoder--> hidden_states[select_layer], CLS dropped  [N, P, Dv]  (model/vision.py)
                              --projector--> image features [N, P, D]
    input_ids [B, T] (IMAGE_TOKEN_INDEX marks each image) --embed--> [B, T, D]
    splice: every image id is replaced by its P feature rows -> inputs_embeds [B, L, D], labels [B, L]

With AnyRes (LLaVA-NeXT, `image_grid_pinpoints`; model/anyres.py) an image is several encoder tiles:
pixel_values holds every image's tiles in order [sum T_i, 3, H, W], `image_sizes` [N, 2] the images'
(height, width), and each image becomes its own number of rows L_i (base tile, unpadded grid, newlines): the
features are a list of [L_i, D], spliced the same way.

Images are consumed in batch order: sample 0's images first, each sample's in the order of its image ids.

Packed batches (`segment_ids` [B, T]: which sample of the row each token belongs to) hold several samples per
row. The splice then also returns position ids that restart at 0 for every sample after image expansion, and
the LLM gets no 2D attention mask: transformers (masking_utils) reads the restarts as packed sequences and
keeps attention within each sample (a block-causal mask for sdpa/eager/flex, varlen flash-attention for
`flash_attention_*` with B = 1). Labels are unchanged; the collate masks each sample's first label, so no
sample's first token is predicted from the previous sample's last one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmtune.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vlmtune.model import vision
from vlmtune.model.anyres import image_layout, image_positions
from vlmtune.model.projector import Projector

# projected image features: [N, P, D] (a fixed-size encoder) or one [L_i, D] per image (AnyRes)
Features = torch.Tensor | list[torch.Tensor]


def is_transformers_class(llm: nn.Module) -> bool:
    """The LLM's class is transformers' own (even when it was loaded with trust_remote_code), not a model
    folder's code: only then does it take `logits_to_keep` and `cache=`."""
    base = llm.get_base_model() if hasattr(llm, "peft_config") else llm  # under a peft wrapper
    return type(base).__module__.startswith("transformers.")


class LlavaModel(nn.Module):
    """Composition of the three parts; `forward` returns the summed token loss and the token count.

    The loss is returned as a sum so the trainer can divide by the number of target tokens of the whole
    global batch: the result then does not depend on how the batch is split into micro-batches and ranks.
    """

    def __init__(self, llm: nn.Module, visual_encoder: nn.Module, projector: Projector, visual_select_layer: int = -2,
                 feature_strategy: str | None = None, image_grid_pinpoints=None):
        super().__init__()
        self.llm = llm
        self.visual_encoder = visual_encoder
        self.projector = projector
        self.visual_select_layer = visual_select_layer
        # 'default' drops the encoder's CLS token, 'full' keeps every token (vision.feature_strategy decides)
        self.feature_strategy = vision.feature_strategy(visual_encoder.config, feature_strategy)
        self._image_length, self.anyres = image_layout(visual_encoder.config, self.feature_strategy, image_grid_pinpoints)
        if self.anyres is not None:  # LLaVA-NeXT: tiles + the learned row separator, trained with the projector
            D = projector.model[-1].out_features
            self.image_newline = nn.Parameter(torch.randn(D, dtype=projector.dtype, device=projector.first.weight.device)
                                              / D**0.5)  # transformers' LlavaNext init
        # the LLM is transformers' own class: it takes `logits_to_keep` (the loss pass runs the LM head only at
        # target positions) and `cache=` (Generator.generate_shared prefills shared prefixes)
        self.transformers_llm = is_transformers_class(llm)

    @property
    def image_length(self) -> int:
        """Sequence positions an image takes after the splice, at most (what `max_length` counts it as):
        the encoder's tokens (model/vision.py), or with AnyRes those of the largest grid (model/anyres.py)."""
        return self._image_length

    def image_lengths(self, image_sizes: torch.Tensor) -> list[int]:
        """Positions each image of (height, width) `image_sizes` [N, 2] takes after the splice."""
        return image_positions(image_sizes.tolist(), self.image_length, self.anyres)

    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> Features:
        """Projected features from `visual_select_layer` (model/vision.py): [N, 3, H, W] -> [N, P, D]; with
        AnyRes, every image's tiles [sum T_i, 3, H, W] and `image_sizes` [N, 2] -> one [L_i, D] per image."""
        dtype = next(self.visual_encoder.parameters()).dtype
        out = self.visual_encoder(pixel_values.to(dtype), output_hidden_states=True)
        features = vision.select_features(out.hidden_states, self.visual_select_layer, self.visual_encoder.config,
                                          self.feature_strategy)
        features = self.projector(features.to(self.projector.dtype))
        if self.anyres is None:
            return features
        if image_sizes is None:
            raise ValueError("AnyRes features need each image's size (image_sizes)")
        sizes = image_sizes.tolist()
        per_image = features.split([self.anyres.tiles(size) for size in sizes])
        return [self.anyres.pack(f, size, self.image_newline) for f, size in zip(per_image, sizes)]

    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        padding_side: str = "right",
        segment_ids: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Embeddings with image features spliced in: inputs_embeds [B, L, D], attention_mask, labels
        (+ position_ids for a packed batch)."""
        has_images = pixel_values is not None and len(pixel_values)
        features = self.encode_images(pixel_values, image_sizes) if has_images else None
        embed = self.llm.get_input_embeddings()
        text_embeds = embed(input_ids.clamp(min=0))  # image ids get a dummy row, overwritten below
        return splice_image_features(text_embeds, input_ids, attention_mask, labels, features, padding_side, segment_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of next-token losses, number of target tokens) for a right-padded batch, or a packed one
        when `segment_ids` is given (see the module docstring). `image_sizes` [N, 2]: the images' (height,
        width), which AnyRes needs (a fixed-size encoder does not)."""
        # a text-only batch's blank image goes through the tower first, as an image batch's images do: under ZeRO-3
        # every module's weights are gathered by all ranks together, so the ranks must run the modules in one order
        blank = self._blank_image_term() if pixel_values is None or not len(pixel_values) else None
        inputs = self.prepare_inputs(input_ids, attention_mask, labels, pixel_values, segment_ids=segment_ids,
                                     image_sizes=image_sizes)
        if blank is not None:
            inputs["inputs_embeds"] = inputs["inputs_embeds"] + blank
        # use_cache=False: no KV cache in a loss pass (transformers also ignores packing when a cache exists)
        llm_inputs = {"inputs_embeds": inputs["inputs_embeds"], "use_cache": False}
        if segment_ids is None:
            llm_inputs["attention_mask"] = inputs["attention_mask"]
        else:  # no 2D mask: the restarting position ids are what marks the samples apart
            llm_inputs["position_ids"] = inputs["position_ids"]
        targets = inputs["labels"][:, 1:]  # [B, L - 1]: position t predicts label t + 1
        if self.transformers_llm:
            # image and prompt rows, most of a LLaVA sequence, predict no target: no logits [B, K, V] for them
            rows = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)  # [K] positions where some sample has one
            logits, targets = self.llm(**llm_inputs, logits_to_keep=rows).logits, targets[:, rows]
        else:
            logits = self.llm(**llm_inputs).logits[:, :-1]
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return loss_sum, (targets != IGNORE_INDEX).sum()

    def _blank_image_term(self) -> torch.Tensor:
        """0 * sum(projected features of one blank image), added to a text-only batch's input embeddings (LLaVA
        runs a zero image through the tower for text-only samples too).

        A text-only batch then backpropagates through the same vision graph, in the same order, as an image
        batch: LLM -> input embeddings -> projector -> CLIP up to `visual_select_layer`. ZeRO-2 reduces gradients
        in buckets filled in the order they become ready, so every rank must produce gradients for the same
        parameters in the same order. Without this, a rank with a text-only micro-batch next to one with images
        sends a different bucket: the all-reduce fails on a size mismatch or, when sizes happen to agree, adds
        one parameter's gradient to another's. ZeRO-3 (parameters partitioned: `ds_id`) needs the forward too,
        even with the vision side frozen: each module's weights are gathered by every rank at once, so a rank that
        skipped the tower would leave the others waiting in their gather. Frozen vision and projector (and AnyRes
        newline) without ZeRO-3: nothing to do."""
        param = self.projector.first.weight
        image_params = [*self.visual_encoder.parameters(), *self.projector.parameters(),
                        *([self.image_newline] if self.anyres is not None else [])]
        if not hasattr(param, "ds_id") and not any(p.requires_grad for p in image_params):
            return torch.zeros((), dtype=param.dtype, device=param.device)
        size = self.visual_encoder.config.image_size
        if self.anyres is None:
            blank = torch.zeros(1, 3, size, size, dtype=param.dtype, device=param.device)
            return self.encode_images(blank).sum() * 0.0
        # AnyRes: a blank square image through the same tiles, grid and newline as a real one
        tiles = self.anyres.tiles((size, size))
        blank = torch.zeros(tiles, 3, size, size, dtype=param.dtype, device=param.device)
        sizes = torch.tensor([[size, size]])
        return self.encode_images(blank, sizes)[0].sum() * 0.0


def splice_image_features(
    text_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    image_features: Features | None,
    padding_side: str = "right",
    segment_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Replace the i-th IMAGE_TOKEN_INDEX of `input_ids` [B, T] (row-major) by the rows of image i:
    `image_features` [N, P, D], or one [L_i, D] per image (AnyRes).

    Vectorised: each kept token gets a width (L_i for image i's id, 1 for text, 0 for padding); a cumulative
    sum gives its start in the output, and text rows and image rows are scattered there in two index
    writes. Output is padded again on `padding_side` (left for batched generation). With `segment_ids`
    [B, T] (packed rows, right padding), `position_ids` [B, L] restart at 0 at each sample's first row.
    """
    is_image = input_ids == IMAGE_TOKEN_INDEX
    n_images = int(is_image.sum())
    if n_images and (image_features is None or len(image_features) != n_images):
        got = 0 if image_features is None else len(image_features)
        raise ValueError(f"batch has {n_images} image tokens but {got} images")
    keep = attention_mask.bool()
    width = keep.long()  # [B, T]
    if n_images:
        if isinstance(image_features, torch.Tensor):  # [N, P, D]: every image P rows
            sizes = torch.full((n_images,), image_features.shape[1], device=input_ids.device)
            flat = image_features.flatten(0, 1)
        else:
            sizes = torch.tensor([len(f) for f in image_features], device=input_ids.device)
            flat = torch.cat(list(image_features))
        width[is_image] = sizes * keep[is_image]
    lengths = width.sum(1)  # [B] real length after expansion
    B, L, D = input_ids.shape[0], int(lengths.max()), text_embeds.shape[-1]
    offset = (L - lengths)[:, None] if padding_side == "left" else 0
    start = width.cumsum(1) - width + offset  # [B, T] output position of each token

    out = text_embeds.new_zeros(B, L, D)
    tb, tt = (keep & ~is_image).nonzero(as_tuple=True)
    out[tb, start[tb, tt]] = text_embeds[tb, tt]
    if n_images:
        ib, it = is_image.nonzero(as_tuple=True)  # row-major: the batch's image order
        total = len(flat)
        first_row = sizes.cumsum(0) - sizes  # [N] where image i's rows start in `flat`
        within = torch.arange(total, device=input_ids.device) - first_row.repeat_interleave(sizes, output_size=total)
        image_b = ib.repeat_interleave(sizes, output_size=total)  # [sum L_i] batch row of each image row
        rows = start[ib, it].repeat_interleave(sizes, output_size=total) + within  # [sum L_i] output position
        out[image_b, rows] = flat.to(out.dtype)

    positions = torch.arange(L, device=input_ids.device)[None]
    first = offset if padding_side == "left" else torch.zeros_like(lengths)[:, None]
    new_mask = (positions >= first) & (positions < first + lengths[:, None])
    result = {"inputs_embeds": out, "attention_mask": new_mask.long()}
    if labels is not None:
        new_labels = torch.full((B, L), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        new_labels[tb, start[tb, tt]] = labels[tb, tt]
        result["labels"] = new_labels
    if segment_ids is not None:
        segments = torch.full((B, L), -1, dtype=torch.long, device=input_ids.device)  # -1: padding
        segments[tb, start[tb, tt]] = segment_ids[tb, tt]
        if n_images:
            segments[image_b, rows] = segment_ids[ib, it].repeat_interleave(sizes, output_size=total)
        result["position_ids"] = restarting_positions(segments)
    return result


def restarting_positions(segments: torch.Tensor) -> torch.Tensor:
    """[B, L] segment numbers (contiguous runs) -> positions counting from 0 within each run."""
    positions = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return positions - torch.where(starts, positions, 0).cummax(1).values
