"""The multimodal projector: CLIP features -> LLM embedding space (LLaVA's `mlp2x_gelu`)."""
from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    """Linear -> (GELU -> Linear) x (depth - 1). depth=2 is LLaVA-1.5's `mlp2x_gelu`.

    Parameters live in `self.model` (keys `model.0.weight`, `model.2.weight`, ...), the layout of XTuner's
    ProjectorModel, so its released `projector/` folders load as they are.
    """

    def __init__(self, visual_hidden_size: int, llm_hidden_size: int, depth: int = 2, bias: bool = True):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(visual_hidden_size, llm_hidden_size, bias=bias)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(llm_hidden_size, llm_hidden_size, bias=bias)]
        self.model = nn.Sequential(*layers)
        self.depth = depth

    @property
    def first(self) -> nn.Linear:
        """The input layer: its width is the encoder's, its dtype and device are the projector's."""
        return self.model[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.first.weight.dtype

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[N, P, visual_hidden] -> [N, P, llm_hidden]."""
        return self.model(features)
