"""Flamingo's fusion (IDEFICS): gated cross-attention blocks between the decoder layers of a Llama-family LLM.

With `fusion="cross_attention"` the projected image latents never enter the LLM's input: a block before every
`cross_layer_interval`-th decoder layer lets the text hidden states attend to them (optional RMS norms on queries
and keys), then runs a gated MLP; each half is added to the residual scaled by `tanh(alpha)`, with `alpha` starting
at 0, so a fresh model is exactly its LLM. The block is `gated_cross_attn` inside its decoder layer
(`layers.{i}.gated_cross_attn.cross_attn.q_proj`, ...), built from the backbone's own MLP and norm classes.

The inputs travel as the `image_cross_attention` keyword argument (a `CrossAttentionInputs`) into each decoder
layer's `forward`, which transformers' decoder models pass through; the layer's class is extended with a `forward`
that runs the block first. So gradient checkpointing and the backbone's KV cache work unchanged (the cross-attention
keys and values are projected from the latents, which are computed once per prompt). Without images the argument is
absent and every layer is the backbone's own: text-only input is bit-identical to the plain LLM.
"""

from typing import NamedTuple

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .modality_adaptive import decoder_layers, keep_layers_together


class CrossAttentionInputs(NamedTuple):
    """What the blocks of one forward pass read.

    states: image latents `[batch, images * latents, width]` (zeros where a row has fewer images).
    allowed: `[batch, 1, seq, images * latents]`, True where a token may attend (the additive mask is built in the
        attention's own dtype, so reduced precision never turns it into -inf).
    gate: `[batch, seq]`, True for tokens that attend to at least one image (others get no cross-attention output).
    rows: `[batch]`, True for rows with an image. As in IDEFICS, such a row runs the blocks on all its tokens (the
        dense half also before its first image); a row without images skips them, exactly as it would alone.
    """

    states: torch.Tensor
    allowed: torch.Tensor
    gate: torch.Tensor
    rows: torch.Tensor


def cross_attention_inputs(latents: torch.Tensor, image_attention_mask: torch.Tensor) -> CrossAttentionInputs:
    """`latents` `[batch, images, latents, width]` and IDEFICS's `image_attention_mask` `[batch, seq, images]`
    (1: the token attends to that image) -> the blocks' inputs."""
    batch, images, num_latents, width = latents.shape
    allowed = image_attention_mask.bool().to(latents.device)
    gate = allowed.any(-1)
    # Tokens that attend to no image see every latent (their output is zeroed): no all-masked softmax row.
    allowed = (allowed | ~gate[..., None]).repeat_interleave(num_latents, dim=-1)[:, None]
    return CrossAttentionInputs(latents.reshape(batch, images * num_latents, width), allowed, gate, gate.any(-1))


def latest_image_mask(input_ids: torch.LongTensor, image_token_id: int, num_images: int) -> torch.LongTensor:
    """IDEFICS's default `image_attention_mask` `[batch, seq, num_images]`: each token attends to the latest image
    whose `<image>` token is at or before it; tokens before any image attend to none."""
    latest = (input_ids == image_token_id).long().cumsum(-1) - 1
    return (latest[..., None] == torch.arange(num_images, device=input_ids.device)).long()


class CrossAttention(nn.Module):
    """Multi-head attention from text hidden states (queries) to image latents (keys, values), without positions."""

    def __init__(self, text_config, kv_width: int, qk_layer_norms: bool, norm_class: type[nn.Module]):
        super().__init__()
        hidden, self.num_heads = text_config.hidden_size, text_config.num_attention_heads
        self.config, self.head_dim = text_config, hidden // self.num_heads
        self.scaling, self.is_causal, self.num_key_value_groups = self.head_dim**-0.5, False, 1
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(kv_width, self.num_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(kv_width, self.num_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        if qk_layer_norms:
            self.q_layer_norm = norm_class(self.head_dim, eps=text_config.rms_norm_eps)
            self.k_layer_norm = norm_class(self.head_dim, eps=text_config.rms_norm_eps)
        self.qk_layer_norms = qk_layer_norms

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        return states.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, states: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        query = self._heads(self.q_proj(hidden_states))
        key, value = self._heads(self.k_proj(states)), self._heads(self.v_proj(states))
        if self.qk_layer_norms:
            query, key = self.q_layer_norm(query), self.k_layer_norm(key)
        # Eager or SDPA: the mask is a dense additive one (flash kernels take none), as in IDEFICS.
        eager = self.config._attn_implementation == "eager"
        attention = eager_attention_forward if eager else ALL_ATTENTION_FUNCTIONS["sdpa"]
        mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill(~allowed, torch.finfo(query.dtype).min)
        output, _ = attention(self, query, key, value, mask, dropout=0.0, scaling=self.scaling)
        return self.o_proj(output.reshape(*hidden_states.shape[:-1], -1))


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's gated xattn-dense block: `x + tanh(a) * xattn(norm(x))`, then `x + tanh(b) * mlp(norm(x))`."""

    def __init__(self, text_config, kv_width: int, settings: dict, layer: nn.Module):
        super().__init__()
        norm_class = type(layer.input_layernorm)
        hidden = text_config.hidden_size
        self.cross_attn = CrossAttention(text_config, kv_width, settings["qk_layer_norms"], norm_class)
        self.mlp = type(layer.mlp)(text_config)
        self.input_layernorm = norm_class(hidden, eps=text_config.rms_norm_eps)
        self.post_attention_layernorm = norm_class(hidden, eps=text_config.rms_norm_eps)
        shape = (1,) if settings["alpha_type"] == "float" else (1, 1, hidden)
        self.alpha_cross_attn = nn.Parameter(torch.zeros(shape))
        self.alpha_dense = nn.Parameter(torch.zeros(shape))

    def forward(self, hidden_states: torch.Tensor, inputs: CrossAttentionInputs) -> torch.Tensor:
        attended = self.cross_attn(self.input_layernorm(hidden_states), inputs.states, inputs.allowed)
        attended = attended.masked_fill(~inputs.gate[..., None], 0.0)  # tokens that attend to no image
        fused = hidden_states + torch.tanh(self.alpha_cross_attn) * attended
        fused = fused + torch.tanh(self.alpha_dense) * self.mlp(self.post_attention_layernorm(fused))
        return torch.where(inputs.rows[:, None, None], fused, hidden_states)


_FUSED_CLASSES: dict[type, type] = {}


def per_row(items: torch.Tensor, counts: torch.LongTensor) -> torch.Tensor:
    """Items of all rows in order `[num_items, ...]` -> `[batch, max count, ...]`, zeros where a row has fewer."""
    slots = torch.arange(max(int(counts.max()), 1)) < counts[:, None]
    arranged = items.new_zeros(*slots.shape, *items.shape[1:])
    arranged[slots.to(items.device)] = items
    return arranged


def _image_counts(input_ids: torch.LongTensor | None, image_token_id: int, rows: int, slots: int) -> torch.LongTensor:
    """Images of each row: its `<image>` tokens (every slot of `[batch, images, ...]` without input_ids)."""
    if input_ids is None:
        return torch.full((rows,), slots, dtype=torch.long)
    return (input_ids == image_token_id).sum(-1).cpu()


def fusion_images(input_ids, pixel_values: torch.Tensor, image_token_id: int) -> tuple[torch.Tensor, torch.LongTensor]:
    """The real images as `[num_images, 3, H, W]` and the count of each row.

    `pixel_values` come flattened (the processor's form: one per `<image>` token, in order) or as IDEFICS's
    `[batch, images, 3, H, W]`, where a row's first `<image>`-count images are real and the rest padding.
    """
    if pixel_values.dim() == 5:
        counts = _image_counts(input_ids, image_token_id, *pixel_values.shape[:2])
        if len(counts) != len(pixel_values) or bool((counts > pixel_values.shape[1]).any()):
            raise ValueError(
                f"pixel_values [batch, images, 3, H, W] of shape {tuple(pixel_values.shape)} do not fit the "
                f"<image> tokens of each row ({counts.tolist()}): give each row at least as many images as "
                "its <image> tokens, in a batch of the same size."
            )
        real = torch.arange(pixel_values.shape[1]) < counts[:, None]
        return pixel_values[real.to(pixel_values.device)], counts
    if input_ids is None:
        raise ValueError(
            "Flattened pixel_values need input_ids to tell which row each image belongs to; with "
            "inputs_embeds, pass pixel_values as [batch, images, 3, H, W]."
        )
    counts = _image_counts(input_ids, image_token_id, len(input_ids), 0)
    if int(counts.sum()) != len(pixel_values):
        raise ValueError(
            f"Got {len(pixel_values)} image(s) but {int(counts.sum())} <image> token(s) in the text: cross-"
            "attention fusion keeps one <image> token per image. Build inputs with this model's MMLLMProcessor."
        )
    return pixel_values, counts


def images_per_row(input_ids: torch.LongTensor, pixel_values: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Flattened `pixel_values` laid out as IDEFICS's `[batch, images, 3, H, W]` (generation repeats rows so)."""
    return per_row(*fusion_images(input_ids, pixel_values, image_token_id))


def image_attention_mask_for(
    input_ids, shape, num_images: int, image_attention_mask, image_token_id: int
) -> torch.LongTensor:
    """The given mask's rows for this pass's tokens (checked), or the latest-image default from input_ids."""
    batch, length = shape
    if image_attention_mask is None:
        if input_ids is None:
            raise ValueError("With inputs_embeds and images, pass image_attention_mask [batch, seq, images].")
        return latest_image_mask(input_ids, image_token_id, num_images)
    if (
        image_attention_mask.dim() != 3
        or image_attention_mask.shape[0] != batch
        or (image_attention_mask.shape[1] < length or image_attention_mask.shape[2] != num_images)
    ):
        raise ValueError(
            f"image_attention_mask has shape {tuple(image_attention_mask.shape)}; this batch needs "
            f"[{batch}, >= {length} tokens, {num_images} images] (1 where a token attends to an image)."
        )
    return image_attention_mask[:, -length:]


def _fused_class(layer_class: type) -> type:
    """`layer_class` whose `forward` takes `image_cross_attention` and runs the layer's block before the layer."""
    if layer_class not in _FUSED_CLASSES:

        def forward(self, hidden_states, *args, image_cross_attention: CrossAttentionInputs | None = None, **kwargs):
            if image_cross_attention is not None:
                hidden_states = self.gated_cross_attn(hidden_states, image_cross_attention)
            return super(fused, self).forward(hidden_states, *args, **kwargs)

        fused = type(f"CrossAttention{layer_class.__name__}", (layer_class,), {"forward": forward})
        _FUSED_CLASSES[layer_class] = fused
    return _FUSED_CLASSES[layer_class]


def apply_cross_attention_fusion(language_model: nn.Module, kv_width: int, settings: dict) -> None:
    """Give every `cross_layer_interval`-th decoder layer (0, n, 2n, ...) a gated cross-attention block."""
    layers = decoder_layers(language_model, "Cross-attention fusion", "fusion='tokens'")
    for layer in layers[:: settings["cross_layer_interval"]]:
        layer.gated_cross_attn = GatedCrossAttentionBlock(language_model.config, kv_width, settings, layer)
        layer.__class__ = _fused_class(type(layer))
    keep_layers_together(language_model)


def cross_attention_blocks(module: nn.Module) -> list[GatedCrossAttentionBlock]:
    """Every gated cross-attention block under `module`, in layer order."""
    return [submodule for submodule in module.modules() if isinstance(submodule, GatedCrossAttentionBlock)]


__all__ = [
    "CrossAttention",
    "CrossAttentionInputs",
    "GatedCrossAttentionBlock",
    "apply_cross_attention_fusion",
    "cross_attention_blocks",
    "cross_attention_inputs",
    "fusion_images",
    "image_attention_mask_for",
    "images_per_row",
    "latest_image_mask",
    "per_row",
]
