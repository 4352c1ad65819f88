"""The mmllm model family: Modality Encoder -> Input Projector -> LLM Backbone, as transformers models.

Structured like transformers' LLaVA: `MMLLMModel` returns the backbone's full-sequence hidden states (TRL's fused
LM head calls it directly), `MMLLMForConditionalGeneration` adds the LM head, the loss and generation.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
from transformers import initialization as init
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple
from transformers.utils.import_utils import torch_compilable_check

try:  # transformers >= 5.24: multimodal outputs, which carry each encoder's output
    from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast as _ModelOutput
    from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast as _CausalLMOutput
except ImportError:  # transformers 5.23
    _ModelOutput, _CausalLMOutput = BaseModelOutputWithPast, CausalLMOutputWithPast

from .anyres import num_views, pack_grid_features
from .component_settings import GRID_PROJECTORS, cross_attention_settings, projector_output_width
from .configuration_mmllm import AUDIO, IMAGE, VIDEO, MMLLMConfig, import_library_module
from .gated_cross_attention import (
    apply_cross_attention_fusion,
    cross_attention_blocks,
    cross_attention_inputs,
    fusion_images,
    image_attention_mask_for,
    images_per_row,
    per_row,
)
from .image_generation import ImageGenerationMixin
from .input_checks import (
    MEDIA_ARGUMENTS,
    MODALITY_NAMES,
    check_context,
    check_placeholders_have_media,
    check_token_ids,
    fit_to_context,
)
from .input_projector import build_audio_projector, build_input_projector
from .modality_adaptive import apply_modality_adaptive, modality_adaptive_parameters
from .modality_encoder import build_audio_tower, build_vision_tower, encode_audio, select_vision_features
from .modality_generator import build_modality_generator, resolve_generator_settings
from .model_persistence import SafetensorsLoadingMixin, StagedSavingMixin
from .output_projector import build_output_projector

PROMPT_INPUTS = ("input_ids", "inputs", "inputs_embeds")  # generate()'s names for the prompt


class _ModalityOutputs:
    """Outputs that carry each modality encoder's output (`BaseModelOutputWithPooling`, the projected features in
    `pooler_output`), as transformers' multimodal outputs do; the backbone's cache keeps the field name that the
    installed transformers gives it (`cache` from 5.24 on, `past_key_values` before)."""

    @property
    def image_hidden_states(self) -> torch.Tensor | None:
        """The projected image features `[num_images, image_seq_length, hidden]` (LLaVA's older name)."""
        return None if self.image_outputs is None else self.image_outputs.pooler_output


@dataclass
class MMLLMModelOutputWithPast(_ModalityOutputs, _ModelOutput):
    """Backbone outputs plus each modality encoder's output; with cross-attention fusion also the image latents
    `[batch, images, latents, width]` and the `image_attention_mask` `[batch, seq, images]` this pass used
    (generation carries both to the next steps)."""

    image_outputs: BaseModelOutputWithPooling | None = None
    video_outputs: BaseModelOutputWithPooling | None = None
    audio_outputs: BaseModelOutputWithPooling | None = None
    cross_attention_states: torch.Tensor | None = None
    image_attention_mask: torch.Tensor | None = None


@dataclass
class MMLLMCausalLMOutputWithPast(_ModalityOutputs, _CausalLMOutput):
    """Language-modeling outputs of [`MMLLMForConditionalGeneration`], with each modality encoder's output (and,
    with cross-attention fusion, the image latents and attention mask, as in [`MMLLMModelOutputWithPast`])."""

    image_outputs: BaseModelOutputWithPooling | None = None
    video_outputs: BaseModelOutputWithPooling | None = None
    audio_outputs: BaseModelOutputWithPooling | None = None
    cross_attention_states: torch.Tensor | None = None
    image_attention_mask: torch.Tensor | None = None


def _pooled(encoder_outputs, features: torch.Tensor) -> BaseModelOutputWithPooling:
    """An encoder's outputs with the projected `features` as `pooler_output` (transformers' contract for
    `get_image_features` and its kin; vLLM's Transformers backend reads it too)."""
    return BaseModelOutputWithPooling(
        last_hidden_state=encoder_outputs.last_hidden_state,
        pooler_output=features,
        hidden_states=encoder_outputs.get("hidden_states"),
        attentions=encoder_outputs.get("attentions"),
    )


# What the processor takes and what the model then gets, per modality: named in "placeholders without media" errors.
def past_length(kwargs: dict) -> int | None:
    """Tokens already in the backbone's cache (`cache` from transformers 5.24 on, `past_key_values` before); None
    for a static cache under torch.compile, whose length is a device value: reading it would break the graph."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
    if isinstance(past, torch.Tensor):
        return None if torch.compiler.is_compiling() else int(past)
    return past


class MMLLMPreTrainedModel(SafetensorsLoadingMixin, PreTrainedModel):
    """Shared settings: attention backends, gradient checkpointing, device-map splitting (from the sub-models)."""

    config: MMLLMConfig
    config_class = MMLLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["cache", "past_key_values"]  # the cache's name from transformers 5.24 on, and before
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @property
    def input_modalities(self) -> tuple[str, ...]:
        """The modalities this model's config takes (pipelines read it: any-to-any needs torchvision for images)."""
        modalities = ["image"]
        if self.config.video_token_id is not None:
            modalities.append("video")
        if self.config.audio_config is not None:
            modalities.append("audio")
        return (*modalities, "text")

    @property
    def _can_compile_fullgraph(self) -> bool:
        """`torch.compile(fullgraph=True)` traces token fusion, with the modality-adaptive module or without; the
        per-row image counts of cross-attention fusion are still a graph break."""
        return self.config.fusion != "cross_attention"

    @classmethod
    def is_custom_code(cls) -> bool:
        """Initialise like transformers' own models: our `_init_weights` goes through `transformers.initialization`,
        so weights that `from_pretrained` fills in get each sub-model's own init (CLIP's attention included), not the
        flat init transformers keeps for remote code that writes weights in place."""
        return False

    def _init_weights(self, module: nn.Module) -> None:
        """Input-projector layers start from PyTorch's fan-in init, not transformers' std 0.02.

        The encoder and the LLM are sub-models with their own init; the linear layers left here are the projector's
        (and the LM head, which keeps the LM's init). With std 0.02 a fresh abstractor's output barely depends on
        the image (its residual carries the normalised queries), and learning through the LLM stalls.

        The gated cross-attention blocks sit inside the LLM (whose own init covers their layers); their gates start
        closed here, so a fresh model, or one loaded from a folder without them, is exactly its LLM.
        """
        if isinstance(module, MMLLMModel) and module.image_newline is not None:  # as LLaVA-NeXT initialises it
            init.normal_(module.image_newline, std=1 / math.sqrt(self.config.text_config.hidden_size))
        if isinstance(module, MMLLMModel):
            for block in cross_attention_blocks(module.language_model):
                init.zeros_(block.alpha_cross_attn)
                init.zeros_(block.alpha_dense)
        if isinstance(module, nn.Linear) and module is not getattr(self, "lm_head", None):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)
            return
        super()._init_weights(module)


class MMLLMModel(MMLLMPreTrainedModel):
    """Modality encoders + input projectors + language model, without an LM head.

    Images and video frames share the vision tower and `multi_modal_projector`; audio (when configured) has its own
    `audio_tower` and `audio_projector`. Every modality's soft tokens replace its placeholder tokens the same way,
    unless `fusion="cross_attention"`: then the image latents reach the LLM through gated cross-attention blocks
    (Flamingo, IDEFICS; `gated_cross_attention.py`) and each `<image>` stays one token.
    With image generation configured, `output_projector` maps the hidden states at the signal tokens to the
    conditioning of `modality_generator` (NExT-GPT's output side).
    """

    def __init__(self, config: MMLLMConfig):
        super().__init__(config)
        self.vision_tower = build_vision_tower(config)
        self.multi_modal_projector = build_input_projector(config)
        # AnyRes with a grid projector: LLaVA-NeXT's learned token after each row of tile patches.
        grid = config.image_grid_pinpoints is not None and config.projector_type in GRID_PROJECTORS
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size)) if grid else None
        self.audio_tower = build_audio_tower(config)
        self.audio_projector = build_audio_projector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        if config.modality_adaptive:
            apply_modality_adaptive(
                self.language_model,
                config.modality_adaptive_layers,
                config.modality_adaptive_modalities,
                config.modality_adaptive_parts,
            )
        if config.fusion == "cross_attention":
            apply_cross_attention_fusion(
                self.language_model, projector_output_width(config), cross_attention_settings(config)
            )
        if config.modality_generator:  # attaching the generator fixes its conditioning shape (saved with the config)
            config.modality_generator = resolve_generator_settings(config.modality_generator)
        self.output_projector = build_output_projector(config)
        self.modality_generator = build_modality_generator(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """Encode and project images: the vision tower's outputs, with the projected features in `pooler_output`
        (transformers' contract).

        One view per image: `pixel_values` `[num_images, 3, H, W]` -> `[num_images, image_seq_length, hidden]`.
        AnyRes (`image_grid_pinpoints`): `pixel_values` `[num_images, views, 3, H, W]` (rows zero-padded to the
        largest view count, as LLaVA-NeXT's image processor pads) with `image_sizes` `[num_images, 2]` as
        `(height, width)` -> a tuple of `[tokens_i, hidden]`, one per image (see `anyres.py`).
        """
        tiled = pixel_values.dim() == 5
        if tiled:
            views = self._image_views(image_sizes, len(pixel_values))
            pixel_values = torch.cat([image[:count] for image, count in zip(pixel_values, views)])
        pixel_values = pixel_values.to(self.vision_tower.dtype)
        outputs, features = select_vision_features(self.vision_tower, pixel_values, self.config, **kwargs)
        features = self.multi_modal_projector(features)
        if tiled:
            features = tuple(
                self._pack_views(image, size) for image, size in zip(torch.split(features, views), image_sizes)
            )
        return _pooled(outputs, features)

    def _image_views(self, image_sizes: torch.Tensor | None, num_images: int) -> list[int]:
        """Views (global + tiles) of each tiled image, from its size; clear errors for inputs that cannot be tiled."""
        pinpoints = self.config.image_grid_pinpoints
        if pinpoints is None:
            raise ValueError(
                "pixel_values are tiled ([images, views, 3, H, W]) but this model has no image_grid_pinpoints: "
                "use its own processor, or a model configured for AnyRes."
            )
        if image_sizes is None or len(image_sizes) != num_images:
            raise ValueError(
                f"Tiled pixel_values of {num_images} image(s) need image_sizes [{num_images}, 2] as (height, width), "
                "as the processor returns them."
            )
        return [num_views(size, pinpoints, self.config.vision_config.image_size) for size in image_sizes]

    def _pack_views(self, features: torch.Tensor, image_size) -> torch.Tensor:
        """One tiled image's projected views `[views, tokens, hidden]` as its soft tokens `[tokens_i, hidden]`."""
        if self.image_newline is None:  # a fixed-count projector: every view's tokens, global view first
            return features.flatten(0, 1)
        pinpoints, tile = self.config.image_grid_pinpoints, self.config.vision_config.image_size
        return pack_grid_features(features, image_size, pinpoints, tile, self.image_newline)

    @can_return_tuple
    def get_video_features(
        self, pixel_values_videos: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """Video clips `[clips, frames, 3, H, W]`: the frames' encoder outputs, with the clips' features
        `[clips, video_seq_length, hidden]` in `pooler_output`.

        Frames are encoded and projected like images, then every `video_temporal_pool` consecutive frames are
        averaged (temporal pooling), so a clip becomes `frames / pool` images' worth of tokens.
        """
        self._check_modality(VIDEO)
        clips, frames = pixel_values_videos.shape[:2]
        pool = self.config.video_temporal_pool
        if frames % pool:
            raise ValueError(f"Video clips have {frames} frames, not a multiple of video_temporal_pool={pool}.")
        outputs = self.get_image_features(pixel_values_videos.flatten(0, 1), return_dict=True, **kwargs)
        features = outputs.pooler_output
        features = features.view(clips, frames // pool, pool, *features.shape[1:]).mean(2)
        return _pooled(outputs, features.flatten(1, 2))

    @can_return_tuple
    def get_audio_features(
        self,
        input_features: torch.Tensor,
        input_features_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """Audio windows `[windows, mel_bins, frames]` + their masks: the audio encoder's outputs, with the soft
        tokens of all clips in order `[1, tokens, hidden]` in `pooler_output`."""
        self._check_modality(AUDIO)
        if input_features_mask is None:
            raise ValueError("input_features need input_features_mask (which frames are real audio).")
        if input_features.shape[0] != input_features_mask.shape[0]:
            raise ValueError(
                f"input_features hold {input_features.shape[0]} audio window(s) but input_features_mask "
                f"{input_features_mask.shape[0]}: windows were lost on the way. transformers' pipeline batching "
                "keeps only the first window of each item, so clips longer than one encoder window need "
                "batch_size=1 in pipelines (or MMLLMProcessor's batched output, which keeps every window)."
            )
        outputs, tokens = encode_audio(
            self.audio_tower, input_features, input_features_mask, self.config.audio_pool_stride, **kwargs
        )
        return _pooled(outputs, self.audio_projector(tokens).unsqueeze(0))

    def _check_modality(self, modality: int) -> None:
        """A clear error when the config has no placeholder (or no encoder) for `modality`."""
        name = MODALITY_NAMES[modality]
        if modality not in self.placeholder_ids():
            raise ValueError(
                f"This model has no <{name}> token ({name}_token_id is None): it cannot take {name} input."
            )
        if modality == AUDIO and self.audio_tower is None:
            raise ValueError("This model has no audio encoder (audio_config is None): it cannot take audio input.")

    def enable_modality_adaptive(self, layers: list[int] | None = None, modalities: list[int] | None = None) -> None:
        """Switch the modality-adaptive module on for this (loaded) model, with the parts the config names
        (`modality_adaptive_parts`); new branches copy the text branch."""
        if self.config.fusion == "cross_attention":
            raise ValueError("The modality-adaptive module does not combine with cross-attention fusion (yet).")
        if self.config.modality_adaptive:
            raise ValueError("The modality-adaptive module is already on for this model.")
        modalities = [IMAGE] if modalities is None else list(modalities)
        apply_modality_adaptive(self.language_model, layers, modalities, self.config.modality_adaptive_parts)
        self.config.modality_adaptive = True
        self.config.modality_adaptive_layers = None if layers is None else list(layers)
        self.config.modality_adaptive_modalities = modalities

    def modality_adaptive_parameters(self):
        """Parameters of the modality-specific (non-text) branches: for freeze policies and LoRA targets."""
        return modality_adaptive_parameters(self.language_model)

    def signal_states(self, hidden_states: torch.Tensor, input_ids: torch.LongTensor) -> torch.Tensor:
        """Hidden states at the signal tokens, one group of k per image to generate: `[images, k, hidden]`."""
        if not self.config.signal_token_ids:
            raise ValueError(
                "This model has no signal tokens: it cannot generate images (see "
                "MMLLMForConditionalGeneration.enable_image_generation)."
            )
        signal_ids = torch.tensor(self.config.signal_token_ids, device=input_ids.device)
        mask = torch.isin(input_ids, signal_ids)
        k = len(self.config.signal_token_ids)
        if int(mask.sum()) % k:
            raise ValueError(
                f"Found {int(mask.sum())} signal tokens, not a multiple of the {k} that make one image: "
                "each image needs the full <gen_img_0> ... <gen_img_{k-1}> group."
            )
        return hidden_states[mask].view(-1, k, hidden_states.shape[-1])

    def get_generation_conditioning(self, signal_states: torch.Tensor) -> torch.Tensor:
        """Output projector: signal-token states `[images, k, hidden]` -> the generator's conditioning."""
        if self.output_projector is None:
            raise ValueError(
                "This model has no output projector: it cannot generate images (see "
                "MMLLMForConditionalGeneration.enable_image_generation)."
            )
        return self.output_projector(signal_states.to(next(self.output_projector.parameters()).dtype))

    def placeholder_ids(self) -> dict[int, int]:
        """Placeholder token id of each configured modality: `{modality id: token id}`."""
        ids = {IMAGE: self.config.image_token_id, VIDEO: self.config.video_token_id, AUDIO: self.config.audio_token_id}
        return {modality: token for modality, token in ids.items() if token is not None}

    def get_mm_token_type_ids(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """Modality id of every token (0 text, 1 image, 2 video, 3 audio), derived from the placeholder token ids."""
        types = torch.zeros_like(input_ids)
        for modality, token in self.placeholder_ids().items():
            types = types.masked_fill(input_ids == token, modality)
        return types

    def get_placeholder_mask(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
        features: torch.Tensor,
        token_id: int | None = None,
        name: str = "image",
    ) -> torch.BoolTensor:
        """Positions of one modality's placeholder tokens; checks they match the number of its features."""
        token_id = self.config.image_token_id if token_id is None else token_id
        if input_ids is None:
            embedding = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
            mask = (inputs_embeds == embedding).all(-1)
        else:
            mask = input_ids == token_id
        n_tokens, n_features = mask.sum(), features.numel() // features.shape[-1]
        items = f" ({features.shape[0]} {name} item(s) x {features.shape[1]})" if features.dim() == 3 else ""
        torch_compilable_check(  # a hint under torch.compile, a ValueError in eager mode; no host sync when traced
            n_tokens == n_features,
            lambda: (
                f"{name.capitalize()} features and {name} tokens do not match: {int(n_tokens)} {name} tokens in the "
                f"input, {n_features} {name} features{items}. Build inputs with MMLLMProcessor (it expands each "
                f"<{name}> to the right count) and make sure truncation does not cut a {name} span."
            ),
        )
        return mask.unsqueeze(-1).to(inputs_embeds.device)

    def _encoder_outputs(
        self, pixel_values, pixel_values_videos, input_features, input_features_mask, image_sizes=None
    ) -> dict:
        """`{modality id: encoder outputs (projected features in pooler_output)}` for the modalities given."""
        given = {IMAGE: pixel_values, VIDEO: pixel_values_videos, AUDIO: input_features}
        for modality, value in given.items():
            if value is not None:
                self._check_modality(modality)
        outputs = {}
        if pixel_values is not None:
            outputs[IMAGE] = self.get_image_features(pixel_values, image_sizes, return_dict=True)
        if pixel_values_videos is not None:
            outputs[VIDEO] = self.get_video_features(pixel_values_videos, return_dict=True)
        if input_features is not None:
            outputs[AUDIO] = self.get_audio_features(input_features, input_features_mask, return_dict=True)
        return outputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        mm_token_type_ids: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        image_attention_mask: torch.LongTensor | None = None,
        cross_attention_states: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MMLLMModelOutputWithPast:
        r"""
        The backbone's cache, and the generation settings it takes (`use_cache`, `output_attentions`, ...), pass
        through `kwargs` under the names the installed transformers uses (`cache` from 5.24 on, `past_key_values`
        before), so one hub set runs on both.

        mm_token_type_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Modality of each token (0 text, 1 image, 2 video, 3 audio), as the processor returns it. When absent
            it is derived from the placeholder ids (`get_mm_token_type_ids`).
        pixel_values_videos (`torch.Tensor` of shape `(clips, frames, 3, height, width)`, *optional*):
            Video frames, as the processor returns them.
        input_features (`torch.Tensor` of shape `(windows, mel_bins, frames)`, *optional*):
            Audio features, one row per encoder window (long clips span several windows).
        input_features_mask (`torch.Tensor` of shape `(windows, frames)`, *optional*):
            1 for frames of real audio, 0 for the padding of the last window of each clip.
        image_sizes (`torch.LongTensor` of shape `(num_images, 2)`, *optional*):
            AnyRes: each image's `(height, width)` before tiling, with `pixel_values` `[images, views, 3, H, W]`.
        image_attention_mask (`torch.LongTensor` of shape `(batch_size, sequence_length, images)`, *optional*):
            Cross-attention fusion: 1 where a token attends to the row's image (IDEFICS's input; the last
            `sequence_length` rows are used, so generation may pass the whole history). Default: each token attends
            to the latest image whose `<image>` token is at or before it.
        cross_attention_states (`torch.Tensor` of shape `(batch_size, images, latents, width)`, *optional*):
            Cross-attention fusion: image latents of an earlier pass (generation reuses the prompt's); `pixel_values`
            are then not encoded again.
        """
        inputs_embeds = self._embed_tokens(input_ids, inputs_embeds, past_length(kwargs))
        cross_attention = self.config.fusion == "cross_attention"
        self._check_fusion_inputs(cross_attention, pixel_values, cross_attention_states, image_attention_mask)
        if cross_attention_states is not None:
            pixel_values = None  # the latents of this prompt's images are already computed
        counts = None
        if cross_attention and pixel_values is not None:
            pixel_values, counts = fusion_images(input_ids, pixel_values, self.config.image_token_id)
        encoder_outputs = self._encoder_outputs(  # encode, then project
            pixel_values, pixel_values_videos, input_features, input_features_mask, image_sizes
        )
        if self.training and input_ids is not None:
            # a training batch whose placeholders lack their media would train on the placeholders' embeddings; at
            # inference the forward embeds what it is given (transformers' convention, which its model tests use)
            # and generate() checks the part of the prompt its cache does not hold
            given = set(encoder_outputs) | ({IMAGE} if cross_attention_states is not None else set())
            check_placeholders_have_media(self.placeholder_ids(), input_ids, given)

        if cross_attention:  # images reach the backbone through its gated cross-attention blocks
            if counts is not None:
                cross_attention_states = per_row(encoder_outputs[IMAGE].pooler_output, counts)
            if cross_attention_states is not None:
                image_attention_mask = image_attention_mask_for(
                    input_ids,
                    inputs_embeds.shape[:2],
                    cross_attention_states.shape[1],
                    image_attention_mask,
                    self.config.image_token_id,
                )
                kwargs["image_cross_attention"] = cross_attention_inputs(
                    cross_attention_states.to(inputs_embeds.dtype), image_attention_mask
                )
        else:  # features become soft tokens in place of their placeholders
            inputs_embeds = self._merge_soft_tokens(input_ids, inputs_embeds, encoder_outputs)
        if self.config.modality_adaptive:
            has_media = bool(encoder_outputs) and not cross_attention
            kwargs["mm_token_type_ids"] = self._modality_routing(input_ids, mm_token_type_ids, has_media)

        outputs = self.language_model(
            attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs
        )
        fused = {"cross_attention_states": cross_attention_states, "image_attention_mask": image_attention_mask}
        return MMLLMModelOutputWithPast(
            **outputs,
            **{f"{MODALITY_NAMES[modality]}_outputs": value for modality, value in encoder_outputs.items()},
            **(fused if cross_attention_states is not None else {}),
        )

    def _embed_tokens(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor | None, past: int | None
    ) -> torch.Tensor:
        """The token embeddings (the given `inputs_embeds`, or those of `input_ids`, checked to be in the vocabulary),
        checked to fit the backbone's context after the `past` cached tokens."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            if past == 0:  # the prompt's ids (generated ones come from the model's own vocabulary)
                check_token_ids(self.config, input_ids)
            inputs_embeds = self.get_input_embeddings()(input_ids)
        check_context(self.config, inputs_embeds.shape[1], past)
        return inputs_embeds

    def _check_fusion_inputs(self, cross_attention: bool, pixel_values, cross_attention_states, image_attention_mask):
        """Cross-attention inputs only for a cross-attention model, and cached latents with their mask."""
        if not cross_attention and (cross_attention_states is not None or image_attention_mask is not None):
            raise ValueError(
                "cross_attention_states and image_attention_mask are inputs of cross-attention fusion; this model "
                "has fusion='tokens' (its images become soft tokens): pass pixel_values only."
            )
        if cross_attention_states is not None and pixel_values is None and image_attention_mask is None:
            raise ValueError(
                "cross_attention_states (latents of an earlier pass) need image_attention_mask for these tokens: "
                "pass the earlier output's image_attention_mask grown by its last row per new token (generate() "
                "does this)."
            )

    def _merge_soft_tokens(self, input_ids, inputs_embeds: torch.Tensor, encoder_outputs: dict) -> torch.Tensor:
        """Token fusion: each modality's projected features replace the embeddings of its placeholder tokens."""
        placeholder_ids = self.placeholder_ids()
        for modality, modality_outputs in encoder_outputs.items():
            features = modality_outputs.pooler_output
            if isinstance(features, (tuple, list)):  # tiled images: each its own token count
                features = torch.cat(list(features))
            features = features.to(inputs_embeds.device, inputs_embeds.dtype)
            mask = self.get_placeholder_mask(
                input_ids, inputs_embeds, features, placeholder_ids[modality], MODALITY_NAMES[modality]
            )
            inputs_embeds = inputs_embeds.masked_scatter(mask, features)
        return inputs_embeds

    def _modality_routing(
        self, input_ids: torch.LongTensor | None, mm_token_type_ids: torch.LongTensor | None, has_media: bool
    ) -> torch.LongTensor | None:
        """Routing for the modality-adaptive module. With `input_ids`, a token goes to a modality's branch only where
        this pass places that modality's features: a pass without media (every decode step) runs the text branches
        alone (`None`), exactly the backbone; with media, the given ids are used when they cover the input, else they
        are derived from the placeholders (assisted decoding passes several new tokens). Embeddings keep the given
        routing: their caller placed the features."""
        if input_ids is None:
            return mm_token_type_ids
        if not has_media:
            return None
        if mm_token_type_ids is None or mm_token_type_ids.shape[-1] != input_ids.shape[-1]:
            return self.get_mm_token_type_ids(input_ids)
        return mm_token_type_ids


class MMLLMForConditionalGeneration(StagedSavingMixin, ImageGenerationMixin, MMLLMPreTrainedModel, GenerationMixin):
    """[`MMLLMModel`] with the LM head: training loss, `logits_to_keep` and KV-cached generation."""

    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: MMLLMConfig):
        super().__init__(config)
        self.model = MMLLMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        # The LM head ties to the backbone's input embeddings, whatever the backbone calls them.
        embeddings = self.model.get_input_embeddings()
        name = next(n for n, m in self.model.language_model.named_modules() if m is embeddings)
        self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{name}.weight"}
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, image_sizes, **kwargs)

    def get_video_features(
        self, pixel_values_videos: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        return self.model.get_video_features(pixel_values_videos, **kwargs)

    def get_audio_features(
        self,
        input_features: torch.Tensor,
        input_features_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        return self.model.get_audio_features(input_features, input_features_mask, **kwargs)

    def enable_modality_adaptive(self, layers: list[int] | None = None, modalities: list[int] | None = None) -> None:
        """Switch mPLUG-Owl2's modality-adaptive module on (see `MMLLMModel.enable_modality_adaptive`)."""
        self.model.enable_modality_adaptive(layers, modalities)

    def modality_adaptive_parameters(self):
        """Parameters of the modality-specific (non-text) branches: for freeze policies and LoRA targets."""
        return self.model.modality_adaptive_parameters()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        mm_token_type_ids: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        image_attention_mask: torch.LongTensor | None = None,
        cross_attention_states: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MMLLMCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets; -100 positions are ignored (mask placeholders and padding in the collator).
        logits_to_keep (`int` or `torch.Tensor`, *optional*):
            Compute logits only for the last `n` positions (or the given indices); 0 keeps all.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            mm_token_type_ids=mm_token_type_ids,
            pixel_values_videos=pixel_values_videos,
            input_features=input_features,
            input_features_mask=input_features_mask,
            image_sizes=image_sizes,
            image_attention_mask=image_attention_mask,
            cross_attention_states=cross_attention_states,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        backbone = {key: value for key, value in outputs.items() if key != "last_hidden_state"}
        return MMLLMCausalLMOutputWithPast(loss=loss, logits=logits, **backbone)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beam search and `num_return_sequences` repeat each row; with cross-attention fusion, flattened images are
        first laid out per row (`[batch, images, 3, H, W]`), so that every copy of a row keeps its own images."""
        pixel_values = model_kwargs.get("pixel_values")
        fusion = self.config.fusion == "cross_attention" and input_ids is not None
        if expand_size > 1 and fusion and pixel_values is not None and pixel_values.dim() == 4:
            model_kwargs["pixel_values"] = images_per_row(input_ids, pixel_values, self.config.image_token_id)
        return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)

    def _update_model_kwargs_for_generation(
        self, outputs, model_kwargs: dict, is_encoder_decoder: bool = False, num_new_tokens: int = 1
    ) -> dict:
        """Cross-attention fusion, as IDEFICS: the next steps reuse the prompt's image latents, and the image
        attention mask grows by the prompt's last row for each new token."""
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder, num_new_tokens
        )
        if outputs.get("cross_attention_states") is not None:
            model_kwargs["cross_attention_states"] = outputs.cross_attention_states
            mask = model_kwargs.get("image_attention_mask")
            mask = outputs.image_attention_mask if mask is None else mask
            model_kwargs["image_attention_mask"] = torch.cat([mask, mask[:, -1:].expand(-1, num_new_tokens, -1)], 1)
        return model_kwargs

    def generate(self, *args, generation_mode: str | None = None, generator_kwargs: dict | None = None, **kwargs):
        """transformers' `generate`, with the inputs checked up front, or images with `generation_mode="image"`
        (`[B, 3, H, W]` in `[0, 1]`, through the output projector and the modality generator, which take
        `generator_kwargs`).

        A prompt that leaves no room in the backbone's context is an error; a generation that would run past it is
        cut to fit, with a warning (as transformers warns for `max_length`), instead of failing half-way."""
        if generation_mode not in (None, "text", "image"):
            raise ValueError(f"generation_mode={generation_mode!r}: use 'text' or 'image'.")
        if kwargs.get("cache_implementation") == "offloaded" and self.device.type == "cpu":
            raise ValueError(
                "cache_implementation='offloaded': the offloaded cache moves layers between a GPU and "
                "the CPU, and this model is on the CPU. Use the default cache or 'static' here."
            )
        prompt = args[0] if args else next((kwargs[key] for key in PROMPT_INPUTS if kwargs.get(key) is not None), None)
        self._check_prompt_media(prompt, kwargs)
        kwargs = fit_to_context(self, prompt, kwargs)
        if generation_mode == "image":
            return self._generate_images(*args, generator_kwargs=generator_kwargs, **kwargs)
        return super().generate(*args, **kwargs)

    def _check_prompt_media(self, prompt: torch.Tensor | None, kwargs: dict) -> None:
        """Every placeholder of the prompt's uncached part has its media. Not for embeddings (the caller placed the
        features), nor for an assistant model, which drafts without the media (transformers drops them)."""
        config = kwargs.get("generation_config") or self.generation_config
        if (
            prompt is None
            or prompt.is_floating_point()
            or config.is_assistant
            or kwargs.get("inputs_embeds") is not None
        ):
            return
        given = {modality for modality, (_, name) in MEDIA_ARGUMENTS.items() if kwargs.get(name) is not None}
        given |= {IMAGE} if "cross_attention_states" in kwargs else set()
        check_placeholders_have_media(self.model.placeholder_ids(), prompt[:, past_length(kwargs) or 0 :], given)

    @classmethod
    def from_components(cls, vision: str, text: str, projector: str = "mlp", **overrides):
        """Compose a model from a pretrained vision encoder and a pretrained causal LM (local folders or Hub ids;
        `text` may also be a `.gguf` file, or a folder holding one, de-quantised to float32 with its tokenizer).

        Returns `(model, processor)`: pretrained weights loaded, a fresh projector, the placeholder tokens added to
        the tokenizer and the embeddings resized. `chat_template=None` keeps the LLM's own chat template when it has
        one (placeholders go inside the user's turn; typed content parts render as their string form), so an
        instruct LLM answers as before; an LLM without one gets the package's template and its role tokens; a
        string is used as given. Any other keyword overrides an `MMLLMConfig` field.
        """
        return import_library_module("builders.composition").compose(cls, vision, text, projector, **overrides)


MMLLMModel.register_for_auto_class("AutoModel")
MMLLMForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
# The Auto classes resolve a config of this module's `MMLLMConfig` to these classes without remote code, from the
# moment the modeling code is loaded (as transformers registers a folder's classes once it has loaded them).
AutoModel.register(MMLLMConfig, MMLLMModel, exist_ok=True)
AutoModelForImageTextToText.register(MMLLMConfig, MMLLMForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(MMLLMConfig, MMLLMForConditionalGeneration, exist_ok=True)


__all__ = ["MMLLMPreTrainedModel", "MMLLMModel", "MMLLMForConditionalGeneration"]
