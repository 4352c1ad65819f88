"""Input Projector: maps modality-encoder features to soft tokens of the LLM's width.

Token-wise (`linear`, `mlp`: one token per patch, LLaVA; `pixel_shuffle`: one per block of patches, Idefics3 /
SmolVLM) or query-based (`abstractor`: mPLUG-Owl2, `qformer`: BLIP-2, `resampler`: Flamingo/IDEFICS), which emit a
fixed number of tokens whatever the image resolution.

`PROJECTORS` is the registry of projector types: a new type is a class with `__init__(config)` and
`forward(features) -> tokens`, added to the dict, with its settings and token count in `component_settings.py`
(which the config checks without torch).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, IdeficsConfig
from transformers.activations import ACT2FN
from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

from .component_settings import INPUT_PROJECTOR_DEFAULTS, feature_width, input_projector_settings


class MLPProjector(nn.Module):
    """Token-wise projector: `depth` linear layers with an activation between them.

    `linear` is depth 1; LLaVA-1.5's projector is depth 2 with GELU (same parameter names: `linear_1`, `linear_2`).
    """

    def __init__(self, config, depth: int | None = None, in_size: int | None = None):
        super().__init__()
        depth = config.projector_depth if depth is None else depth
        if depth < 1:
            raise ValueError(f"projector_depth={depth}: an MLP projector needs at least one layer.")
        in_size = in_size or feature_width(config)
        out_size = config.text_config.hidden_size
        self.depth = depth
        for index in range(1, depth + 1):
            layer = nn.Linear(in_size if index == 1 else out_size, out_size, bias=config.multimodal_projector_bias)
            self.add_module(f"linear_{index}", layer)
        self.act = ACT2FN[config.projector_hidden_act]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden_states = self.linear_1(features)
        for index in range(2, self.depth + 1):
            hidden_states = getattr(self, f"linear_{index}")(self.act(hidden_states))
        return hidden_states


class LinearProjector(MLPProjector):
    """A single linear map (LLaVA-1.0)."""

    def __init__(self, config):
        super().__init__(config, depth=1)


def pixel_shuffle(features: torch.Tensor, scale: int) -> torch.Tensor:
    """Space-to-depth on a square patch grid: `[batch, side², width]` -> `[batch, (side/scale)², width·scale²]`.

    Each `scale` x `scale` block of patches becomes one token, its patches concatenated row by row (Idefics3's
    channel order, so its connector weights apply unchanged).
    """
    batch, tokens, width = features.shape
    blocks = math.isqrt(tokens) // scale
    grid = features.reshape(batch, blocks, scale, blocks, scale, width)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(batch, blocks * blocks, scale * scale * width)


class PixelShuffleProjector(MLPProjector):
    """Idefics3 / SmolVLM's connector: pixel shuffle (`projector_config.scale_factor`: scale² times fewer tokens,
    scale² times wider), then the token-wise MLP (`projector_depth` layers; Idefics3's is one linear layer without
    bias: `projector_depth=1, multimodal_projector_bias=False`)."""

    def __init__(self, config):
        scale = input_projector_settings(config)["scale_factor"]
        super().__init__(config, in_size=feature_width(config) * scale**2)
        self.scale_factor = scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(pixel_shuffle(features, self.scale_factor))


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Fixed sin-cos embedding of 1-D positions, `[len(positions), dim]` (MAE / mPLUG-Owl2 tables)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32) / (dim / 2.0))
    angles = positions.float().reshape(-1, 1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, num_tokens: int) -> torch.Tensor:
    """Sin-cos table of a square patch grid, with a zero row first when the tokens include a CLS token."""
    has_cls = int(round(num_tokens**0.5)) ** 2 != num_tokens
    grid = int(round((num_tokens - has_cls) ** 0.5))
    if grid * grid + has_cls != num_tokens:
        raise ValueError(f"The abstractor needs a square patch grid (plus an optional CLS), got {num_tokens} tokens.")
    coords = torch.arange(grid, dtype=torch.float32)
    grid_x, grid_y = torch.meshgrid(coords, coords, indexing="xy")
    table = torch.cat([sincos_1d(dim // 2, grid_x), sincos_1d(dim // 2, grid_y)], dim=1)
    return torch.cat([table.new_zeros((int(has_cls), dim)), table])


class SwiGLU(nn.Module):
    """mPLUG-Owl2's abstractor feed-forward: `w2(ln(silu(w1 x) * w3 x))`."""

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size)
        self.w2 = nn.Linear(intermediate_size, hidden_size)
        self.w3 = nn.Linear(hidden_size, intermediate_size)
        self.ffn_ln = nn.LayerNorm(intermediate_size, eps=eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.w2(self.ffn_ln(F.silu(self.w1(hidden_states)) * self.w3(hidden_states)))


class AbstractorLayer(nn.Module):
    """One visual-abstractor layer: queries attend to [queries; image features], then a SwiGLU block.

    As in mPLUG-Owl2: keys get the fixed position tables, values do not; the residual adds the *normalised*
    queries; `norm1`, `normk` and `norm2` use torch's default epsilon, only `ffn_ln` the configured one.
    """

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size)
        self.normk = nn.LayerNorm(hidden_size)
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = SwiGLU(hidden_size, intermediate_size, eps)

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        return states.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, queries, features, query_positions, key_positions) -> torch.Tensor:
        queries = self.norm1(queries)
        context = torch.cat([queries, self.normk(features)], dim=1)
        positions = torch.cat([query_positions, key_positions]).to(context.dtype)
        attended = F.scaled_dot_product_attention(
            self._heads(self.query(queries + query_positions.to(queries.dtype))),
            self._heads(self.key(context + positions)),
            self._heads(self.value(context)),
        )
        hidden_states = queries + self.out_proj(attended.transpose(1, 2).flatten(2))
        return hidden_states + self.mlp(self.norm2(hidden_states))


class AbstractorProjector(nn.Module):
    """mPLUG-Owl2's visual abstractor: learnable queries compress the image to a fixed number of tokens.

    Emits `num_queries` tokens (plus a learnable end token) whatever the resolution: the key position table is
    rebuilt for the patch grid it sees.
    """

    DEFAULTS = INPUT_PROJECTOR_DEFAULTS["abstractor"]

    def __init__(self, config):
        super().__init__()
        settings = input_projector_settings(config)
        width, text_width = feature_width(config), config.text_config.hidden_size
        self.query_embeds = nn.Parameter(torch.randn(1, settings["num_queries"], width))
        self.layers = nn.ModuleList(
            AbstractorLayer(width, settings["num_heads"], settings["intermediate_size"], settings["layer_norm_eps"])
            for _ in range(settings["num_layers"])
        )
        self.visual_fc = nn.Linear(width, text_width)
        self.end_token = nn.Parameter(torch.randn(1, 1, text_width)) if settings["end_token"] else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # The fixed sin-cos tables are computed here, not stored: they follow the patch grid of the input, and a
        # non-persistent buffer would not survive transformers' meta-device loading.
        width, num_queries = features.shape[-1], self.query_embeds.shape[1]
        query_positions = sincos_1d(width, torch.arange(num_queries)).to(features.device)
        key_positions = sincos_2d(width, features.shape[1]).to(features.device)
        hidden_states = self.query_embeds.expand(features.shape[0], -1, -1)
        for layer in self.layers:
            hidden_states = layer(hidden_states, features, query_positions, key_positions)
        tokens = self.visual_fc(hidden_states)
        if self.end_token is None:
            return tokens
        return torch.cat([tokens, self.end_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)], dim=1)


class QFormerProjector(nn.Module):
    """BLIP-2's Q-Former (transformers' `Blip2QFormerModel`): learnable queries, then a language projection."""

    def __init__(self, config):
        super().__init__()
        settings = dict(config.projector_config or {})
        num_query_tokens = settings.pop("num_query_tokens", 32)
        qformer_config = Blip2QFormerConfig(**{**settings, "encoder_hidden_size": feature_width(config)})
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, qformer_config.hidden_size) * 0.02)
        self.qformer = Blip2QFormerModel(qformer_config)
        self.language_projection = nn.Linear(qformer_config.hidden_size, config.text_config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        mask = torch.ones(features.shape[:-1], dtype=torch.long, device=features.device)
        output = self.qformer(query_embeds=queries, encoder_hidden_states=features, encoder_attention_mask=mask)
        return self.language_projection(output.last_hidden_state.to(features.dtype))


class ResamplerProjector(nn.Module):
    """Flamingo / IDEFICS perceiver resampler (transformers' `IdeficsPerceiverResampler`), then a linear map to the
    LLM's width (token fusion only)."""

    DEFAULTS = INPUT_PROJECTOR_DEFAULTS["resampler"]

    def __init__(self, config):
        super().__init__()
        settings = input_projector_settings(config)
        width = feature_width(config)
        idefics_config = IdeficsConfig(
            vision_config={"embed_dim": width},
            perceiver_config={"qk_layer_norms_perceiver": settings["qk_layer_norms"]},
        )
        self.perceiver = IdeficsPerceiverResampler(
            idefics_config,
            width,
            settings["depth"],
            settings["num_heads"],
            settings["head_dim"],
            settings["num_latents"],
        )
        # Cross-attention fusion keeps IDEFICS's latents of the encoder's width (the blocks' K/V map them).
        fusion = config.fusion == "cross_attention"
        self.linear = None if fusion else nn.Linear(width, config.text_config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        latents = self.perceiver(features)
        return latents if self.linear is None else self.linear(latents)


PROJECTORS: dict[str, type[nn.Module]] = {
    "linear": LinearProjector,
    "mlp": MLPProjector,
    "pixel_shuffle": PixelShuffleProjector,
    "abstractor": AbstractorProjector,
    "qformer": QFormerProjector,
    "resampler": ResamplerProjector,
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


def build_audio_projector(config) -> nn.Module | None:
    """The audio encoder's projector: an `mlp` over the pooled encoder frames (None without audio)."""
    if config.audio_config is None:
        return None
    width = getattr(config.audio_config, "d_model", None) or config.audio_config.hidden_size
    return MLPProjector(config, in_size=width)


__all__ = [
    "PROJECTORS",
    "AbstractorProjector",
    "LinearProjector",
    "MLPProjector",
    "PixelShuffleProjector",
    "QFormerProjector",
    "ResamplerProjector",
    "build_audio_projector",
    "build_input_projector",
]
