"""Modality Encoders: a transformers vision model that runs only up to the feature layer the projector reads (images
and video frames), and an audio encoder (Whisper's encoder half, or any transformers audio model).

LLaVA-style models read an intermediate layer (e.g. the second to last). transformers' LLaVA runs every
encoder layer anyway; here the layers above the deepest selected one stay in the weights (checkpoints load
unchanged) but are skipped, which saves their compute and the memory of their activations.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, Blip2VisionModel
from transformers.modeling_outputs import ModelOutput
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from .component_settings import num_vision_tokens


class ActiveLayers(nn.ModuleList):
    """A `ModuleList` of encoder layers of which only the first `num_active` run when iterated.

    Every layer stays registered (same parameter names, same state dict); encoders that loop
    `for layer in self.layers` simply stop early.
    """

    def __init__(self, layers: nn.ModuleList, num_active: int):
        super().__init__(layers)
        self.num_active = num_active

    def __iter__(self):
        return (self[index] for index in range(self.num_active))


def _encoder_layers(model: nn.Module, num_layers: int) -> tuple[nn.Module, str] | None:
    """The (parent, attribute name) of the encoder's list of `num_layers` transformer layers, if there is one."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.ModuleList and len(child) == num_layers:
                return parent, name
    return None


# Vision models that transformers' AutoModel does not build from their config (BLIP-2's ViT).
VISION_MODELS_OUTSIDE_AUTO = {"blip_2_vision_model": Blip2VisionModel}


def build_vision_tower(config) -> nn.Module:
    """The vision encoder of `config.vision_config`, set to stop after the deepest selected feature layer."""
    model_class = VISION_MODELS_OUTSIDE_AUTO.get(config.vision_config.model_type)
    vision_tower = model_class(config.vision_config) if model_class else AutoModel.from_config(config.vision_config)
    num_layers = config.vision_config.num_hidden_layers
    deepest = max(config.feature_layers)
    found = _encoder_layers(vision_tower, num_layers)
    if found is not None and deepest < num_layers:
        parent, name = found
        # Layer 0 (the embeddings) is captured as the first layer's input, so at least one layer runs.
        setattr(parent, name, ActiveLayers(getattr(parent, name), max(deepest, 1)))
    return vision_tower


def select_vision_features(
    vision_tower: nn.Module, pixel_values: torch.Tensor, config, output_hidden_states: bool | None = None, **kwargs
) -> tuple[ModelOutput, torch.Tensor]:
    """The encoder's outputs, and the features that feed the projector: `[num_images, tokens, hidden * layers]`.

    Only the selected hidden states are captured (transformers' `output_hidden_states=<indices>`) unless the
    caller asks for all of them. Images of another size than the encoder's are accepted where it can interpolate
    its position embeddings.
    """
    layers = config.feature_layers
    if tuple(pixel_values.shape[-2:]) != (config.vision_config.image_size,) * 2:
        kwargs["interpolate_pos_encoding"] = True  # another resolution: interpolate the position embeddings
    outputs = vision_tower(
        pixel_values, output_hidden_states=True if output_hidden_states else layers, return_dict=True, **kwargs
    )
    features = [outputs.hidden_states[layer] for layer in layers]
    if not output_hidden_states:
        outputs.hidden_states = None
    if config.vision_feature_layernorm:
        features = [vision_tower.post_layernorm(feature) for feature in features]
    if config.vision_feature_select_strategy == "default":
        features = [feature[:, 1:] for feature in features]
    return outputs, torch.cat(features, dim=-1)


# Encoder-decoder audio models whose encoder half is the modality encoder.
AUDIO_ENCODERS_OUTSIDE_AUTO = {"whisper": WhisperEncoder}


def build_audio_tower(config) -> nn.Module | None:
    """The audio encoder of `config.audio_config` (None without one)."""
    if config.audio_config is None:
        return None
    model_class = AUDIO_ENCODERS_OUTSIDE_AUTO.get(config.audio_config.model_type)
    return model_class(config.audio_config) if model_class else AutoModel.from_config(config.audio_config)


def num_encoder_frames(num_mel_frames: int) -> int:
    """Encoder frames for `num_mel_frames` feature frames (Whisper's stride-2 convolution)."""
    return (num_mel_frames + 1) // 2


def num_audio_tokens(num_mel_frames: int, pool_stride: int) -> int:
    """Soft tokens for `num_mel_frames` real feature frames: the encoder frames, then pooling."""
    return (num_encoder_frames(num_mel_frames) + pool_stride - 1) // pool_stride


def encode_audio(
    audio_tower: nn.Module, input_features: torch.Tensor, input_features_mask: torch.Tensor, pool_stride: int, **kwargs
) -> tuple[ModelOutput, torch.Tensor]:
    """Audio windows `[windows, mel_bins, frames]` -> the encoder's outputs, and `[tokens, hidden]`: the windows'
    real tokens in order.

    Whisper encodes a fixed window (padded with silence); only the frames of real audio are kept, then every
    `pool_stride` of them are averaged into one token (the last group may be shorter).
    """
    outputs = audio_tower(input_features.to(audio_tower.dtype), return_dict=True, **kwargs)
    hidden_states = outputs.last_hidden_state
    tokens = []
    for window, num_frames in zip(hidden_states, input_features_mask.sum(-1).tolist()):
        real = window[: num_encoder_frames(int(num_frames))].T.unsqueeze(0)  # [1, hidden, encoder frames]
        tokens.append(F.avg_pool1d(real, pool_stride, pool_stride, ceil_mode=True)[0].T)
    return outputs, torch.cat(tokens)


__all__ = [
    "ActiveLayers",
    "build_audio_tower",
    "build_vision_tower",
    "encode_audio",
    "num_audio_tokens",
    "num_vision_tokens",
    "select_vision_features",
]
