"""The multimodal projector: encoder features -> LLM embedding space (LLaVA's `mlp2x_gelu`).

Its facts live here: the layers, the config it is described by (XTuner's ProjectorConfig keys, which the
xtuner layout writes to projector/config.json and reads back, `config` / `from_config`), whether transformers'
Llava can hold it (`fits_transformers_llava`) and its name in haotian-liu/LLaVA's config (`official_type`).
Another projector type is a change to this file (and its config key in config.py).
"""
from __future__ import annotations

import torch
from torch import nn

from vlmtune.errors import UserError

MODEL_TYPE = "projector"  # XTuner's ProjectorConfig.model_type


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

    def config(self) -> dict:
        """XTuner's ProjectorConfig keys (what projector/config.json holds)."""
        return dict(visual_hidden_size=self.first.in_features, llm_hidden_size=self.first.out_features,
                    depth=self.depth, hidden_act="gelu", bias=self.first.bias is not None)

    @classmethod
    def from_config(cls, config: dict, source: str) -> Projector:
        """The projector a projector/config.json (ours or XTuner's) describes; `source` names it in errors."""
        if config.get("model_type") != MODEL_TYPE or config.get("hidden_act", "gelu") != "gelu":
            raise UserError(f"{source}: not a LLaVA gelu projector (model_type {config.get('model_type')!r})")
        return cls(config["visual_hidden_size"], config["llm_hidden_size"], config["depth"], config.get("bias", True))

    @property
    def fits_transformers_llava(self) -> bool:
        """transformers' LlavaMultiModalProjector is exactly linear_1 -> act -> linear_2 (keymaps.HUGGINGFACE_LLAVA)."""
        return self.depth == 2

    @property
    def official_type(self) -> str:
        """haotian-liu/LLaVA's `mm_projector_type`."""
        return "linear" if self.depth == 1 else f"mlp{self.depth}x_gelu"

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[N, P, visual_hidden] -> [N, P, llm_hidden]."""
        return self.model(features)
