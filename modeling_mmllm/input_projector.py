"""Input Projector: maps modality-encoder features to soft tokens of the LLM's width.

`PROJECTORS` is the one registry of projector types; a new type is a class with `__init__(config)`,
`forward(features) -> tokens` and `output_length(config)`, added to the dict.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN

from .modality_encoder import num_vision_tokens


class MLPProjector(nn.Module):
    """Token-wise projector: `depth` linear layers with an activation between them.

    `linear` is depth 1; LLaVA-1.5's projector is depth 2 with GELU (same parameter names: `linear_1`, `linear_2`).
    """

    def __init__(self, config, depth: int | None = None):
        super().__init__()
        depth = config.projector_depth if depth is None else depth
        if depth < 1:
            raise ValueError(f"projector_depth={depth}: an MLP projector needs at least one layer.")
        in_size = config.vision_config.hidden_size * len(config.feature_layers)
        out_size = config.text_config.hidden_size
        self.depth = depth
        for index in range(1, depth + 1):
            layer = nn.Linear(in_size if index == 1 else out_size, out_size, bias=config.multimodal_projector_bias)
            self.add_module(f"linear_{index}", layer)
        self.act = ACT2FN[config.projector_hidden_act]

    @staticmethod
    def output_length(config) -> int:
        return num_vision_tokens(config)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden_states = self.linear_1(features)
        for index in range(2, self.depth + 1):
            hidden_states = getattr(self, f"linear_{index}")(self.act(hidden_states))
        return hidden_states


class LinearProjector(MLPProjector):
    """A single linear map (LLaVA-1.0)."""

    def __init__(self, config):
        super().__init__(config, depth=1)


PROJECTORS: dict[str, type[nn.Module]] = {
    "linear": LinearProjector,
    "mlp": MLPProjector,
}


def _projector_class(config) -> type[nn.Module]:
    try:
        return PROJECTORS[config.projector_type]
    except KeyError:
        raise ValueError(
            f"Unknown projector_type {config.projector_type!r}: choose one of {sorted(PROJECTORS)}."
        ) from None


def build_input_projector(config) -> nn.Module:
    """Instantiate the input projector named by `config.projector_type`."""
    return _projector_class(config)(config)


def projector_output_length(config) -> int:
    """Soft tokens per image that `config`'s projector emits."""
    return _projector_class(config).output_length(config)


__all__ = ["PROJECTORS", "MLPProjector", "LinearProjector", "build_input_projector", "projector_output_length"]
