"""Output Projector: maps the LLM's hidden states at the signal tokens `<gen_img_0..k-1>` to the conditioning space
of a modality generator (NExT-GPT): `[batch, k, llm width]` -> `[batch, condition_length, condition_width]`.

`OUTPUT_PROJECTORS` is the registry of types; a new type is a class with `__init__(config)` and
`forward(signal_states) -> conditioning`, added to the dict.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN

from .component_settings import OUTPUT_PROJECTOR_DEFAULTS, output_projector_settings


def _condition_shape(config) -> tuple[int, int]:
    generator = config.modality_generator
    return generator["condition_length"], generator["condition_width"]


class MLPOutputProjector(nn.Module):
    """A two-layer MLP per signal token (LLM width -> condition width), then a linear map over the token axis
    (k signal tokens -> condition_length positions)."""

    DEFAULTS = OUTPUT_PROJECTOR_DEFAULTS["mlp"]

    def __init__(self, config):
        super().__init__()
        settings = output_projector_settings(config)
        length, width = _condition_shape(config)
        self.linear_1 = nn.Linear(config.text_config.hidden_size, width)
        self.act = ACT2FN[settings["hidden_act"]]
        self.linear_2 = nn.Linear(width, width)
        self.token_map = nn.Linear(len(config.signal_token_ids), length)

    def forward(self, signal_states: torch.Tensor) -> torch.Tensor:
        tokens = self.linear_2(self.act(self.linear_1(signal_states)))  # [batch, k, width]
        return self.token_map(tokens.transpose(1, 2)).transpose(1, 2)  # [batch, length, width]


class TransformerOutputProjector(nn.Module):
    """NExT-GPT's output projector: `condition_length` learnable queries attend to the (projected) signal-token
    states through a small transformer decoder; the result is the generator's conditioning sequence."""

    DEFAULTS = OUTPUT_PROJECTOR_DEFAULTS["transformer"]

    def __init__(self, config):
        super().__init__()
        settings = output_projector_settings(config)
        length, width = _condition_shape(config)
        if width % settings["num_heads"]:
            raise ValueError(
                f"condition_width={width} is not divisible by output_projector_config.num_heads="
                f"{settings['num_heads']}."
            )
        self.in_proj = nn.Linear(config.text_config.hidden_size, width)
        self.queries = nn.Parameter(torch.randn(1, length, width) * 0.02)
        layer = nn.TransformerDecoderLayer(
            width,
            settings["num_heads"],
            settings["intermediate_size"] or 4 * width,
            settings["dropout"],
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(layer, settings["num_layers"])
        self.norm = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, signal_states: torch.Tensor) -> torch.Tensor:
        memory = self.in_proj(signal_states)
        queries = self.queries.expand(signal_states.shape[0], -1, -1).to(memory.dtype)
        return self.out_proj(self.norm(self.decoder(queries, memory)))


OUTPUT_PROJECTORS: dict[str, type[nn.Module]] = {
    "mlp": MLPOutputProjector,
    "transformer": TransformerOutputProjector,
}


def output_projector_class(config) -> type[nn.Module]:
    """The class of `config.output_projector_type` (its settings are checked by `output_projector_settings`)."""
    output_projector_settings(config)
    return OUTPUT_PROJECTORS[config.output_projector_type]


def build_output_projector(config) -> nn.Module | None:
    """The output projector named by `config.output_projector_type` (None for text-only output)."""
    if config.output_projector_type is None:
        return None
    return output_projector_class(config)(config)


__all__ = [
    "OUTPUT_PROJECTORS",
    "MLPOutputProjector",
    "TransformerOutputProjector",
    "build_output_projector",
    "output_projector_class",
]
