"""The LLaVA projector as a transformers model: Linear -> (act -> Linear) x (depth - 1), weights in `self.model`."""
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from .configuration_projector import ProjectorConfig


class ProjectorModel(PreTrainedModel):
    """CLIP patch features [N, P, visual_hidden_size] -> LLM embeddings [N, P, llm_hidden_size]."""

    _auto_class = "AutoModel"
    config_class = ProjectorConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False

    def __init__(self, config: ProjectorConfig):
        super().__init__(config)
        layers = [nn.Linear(config.visual_hidden_size, config.llm_hidden_size, bias=config.bias)]
        for _ in range(config.depth - 1):
            layers += [ACT2FN[config.hidden_act], nn.Linear(config.llm_hidden_size, config.llm_hidden_size, bias=config.bias)]
        self.model = nn.Sequential(*layers)
        self.post_init()

    def forward(self, x):
        return self.model(x)
