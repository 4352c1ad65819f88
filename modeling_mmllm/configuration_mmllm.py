"""Configuration of the mmllm model family: one config describes any MM-LLM of the survey's taxonomy.

The vision encoder and the LLM backbone are ordinary transformers configs (`vision_config`, `text_config`);
the fields here say how they are wired together (which encoder layer feeds the input projector, which
projector, how many soft tokens one image becomes).
"""

import importlib
from dataclasses import field
from typing import Literal

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from .component_settings import (
    check_fusion,
    check_image_grid_pinpoints,
    checked_generator_settings,
    image_text_length,
    output_projector_settings,
    projector_output_length,
)

# Modality ids of `mm_token_type_ids`, shared with transformers' processors.
TEXT, IMAGE, VIDEO, AUDIO = 0, 1, 2, 3


def import_library_module(name: str):
    """Import a library-side module of the `mmllm` package (presets, composition, cards).

    The hub set (the files copied next to a checkpoint) must not depend on the installed package, so features
    that need the package's data files reach it through this function and fail with a clear message without it.
    """
    try:
        return importlib.import_module(f"modeling_mmllm.{name}")
    except ImportError as error:
        raise ImportError(
            f"This feature needs the `mmllm` package (module `modeling_mmllm.{name}`), which is not importable "
            f"here ({error}). Install it with `pip install mmllm` or from a source checkout."
        ) from error


def backbone_context(config) -> int | None:
    """The one source of the context limit (`generate`, the processor, the chat, the server and the demo read it):
    tokens the backbone attends over (`text_config.max_position_embeddings`; beyond it a model trained on that
    length produces garbage), or None when it has no fixed limit (no such field, or dynamic RoPE scaling, which
    extends it by design)."""
    text_config = getattr(config, "text_config", None) or config
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None)
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "dynamic":
        return None
    context = getattr(text_config, "max_position_embeddings", None)
    return context if isinstance(context, int) and context > 0 else None


class MMLLMConfig(PreTrainedConfig):
    r"""
    Configuration of [`MMLLMForConditionalGeneration`]: modality encoder + input projector + LLM backbone.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the vision encoder: any transformers vision model (CLIP and SigLIP vision models, ...).
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the LLM backbone: any transformers causal LM (Llama, Mistral, Qwen2, GPT-2, ...).
        vision_feature_layer (`int` or `list[int]`, *optional*, defaults to -2):
            Index into the encoder's hidden states (0 = embeddings) whose features feed the projector; a list
            concatenates several layers. Encoder layers above the deepest selected one are kept in the weights
            but not run.
        vision_feature_select_strategy (`str`, *optional*, defaults to `"default"`):
            `"default"` drops the CLS token, `"full"` keeps every token.
        vision_feature_layernorm (`bool`, *optional*, defaults to `False`):
            Apply the encoder's final LayerNorm (`post_layernorm`) to every selected token, as mPLUG-Owl2 and
            BLIP-2 do (transformers' CLIP applies it to the pooled CLS token only).
        projector_type (`str`, *optional*, defaults to `"mlp"`):
            Input projector: one of the registry in `input_projector.py` (`linear`, `mlp`, `abstractor`,
            `qformer`, `resampler`).
        projector_config (`dict`, *optional*):
            Settings of a query-based projector (number of queries, layers, heads, ...); missing keys take the
            projector's defaults (`input_projector.py`). For `qformer`, the fields of a `Blip2QFormerConfig`.
        projector_depth (`int`, *optional*, defaults to 2):
            Number of linear layers of the `mlp` projector (LLaVA-1.5 uses 2).
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation between the `mlp` projector's layers.
        multimodal_projector_bias (`bool`, *optional*, defaults to `True`):
            Whether the projector's linear layers have a bias.
        image_token_id (`int`, *optional*, defaults to 32000):
            Id of the `<image>` placeholder token in the tokenizer.
        image_seq_length (`int`, *optional*):
            Tokens one `<image>` becomes in the text: the projector's soft tokens (derived from the encoder's patch
            grid and the select strategy when left unset), or 1 with cross-attention fusion. A different value is an
            error, because the processor expands `<image>` to this count.
        fusion (`str`, *optional*, defaults to `"tokens"`):
            How image features reach the LLM. `"tokens"`: the projector's soft tokens replace the `<image>`
            placeholders (LLaVA, BLIP-2, mPLUG-Owl2). `"cross_attention"`: Flamingo / IDEFICS; `<image>` stays one
            token and gated cross-attention blocks (`tanh` gates starting at 0, so the model starts as the plain
            LLM) before every `cross_layer_interval`-th decoder layer let text tokens attend to the latents of the
            latest image at or before them (Llama-family backbones; see `gated_cross_attention.py`).
        cross_attention_config (`dict`, *optional*):
            Settings of the gated cross-attention (`fusion="cross_attention"`): `cross_layer_interval` (1),
            `qk_layer_norms` (`False`: RMS norms on its queries and keys) and `alpha_type` (a `"float"` gate per
            block, or a `"vector"` of the LLM's width). Not named `fusion_config`: transformers reads that name
            as its own module-fusion setting when loading.
        image_grid_pinpoints (`list[list[int]]`, *optional*):
            AnyRes (LLaVA-NeXT): the `[height, width]` grids an image may be tiled into, multiples of the encoder's
            image size. Each image becomes a global view plus the tiles of its best grid; `linear`/`mlp` projectors
            pack the tiles as LLaVA-NeXT does (unpadded, a learned `image_newline` after each row), the others keep
            every view's `image_seq_length` tokens. `None`: one square view per image.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether the LM head shares the backbone's input embeddings (taken from `text_config` when it ties).
        modality_adaptive (`bool`, *optional*, defaults to `False`):
            mPLUG-Owl2's modality-adaptive module: per-modality K/V projections and layer norms in the backbone's
            decoder layers (Llama-family backbones).
        modality_adaptive_layers (`list[int]`, *optional*):
            Decoder layers that get the module; `None` means all.
        modality_adaptive_modalities (`list[int]`, *optional*, defaults to `[1]`):
            Modality ids that get their own branch besides text (0): 1 image, 2 video, 3 audio.
        modality_adaptive_parts (`str`, *optional*, defaults to `"kv_norms"`):
            Which modules get a branch per modality: `"kv_norms"` (mPLUG-Owl2: K/V projections and both norms) or
            `"all"` (CogVLM's visual expert: also the query and output projections and the MLP).
        audio_config (`dict` or `PreTrainedConfig`, *optional*):
            Audio encoder (Whisper: its encoder half is used). `None`: no audio input.
        audio_token_id (`int`, *optional*):
            Id of the `<audio>` placeholder token (required with `audio_config`).
        audio_pool_stride (`int`, *optional*, defaults to 4):
            Audio encoder frames averaged into one soft token (Whisper: 50 frames/s, so 4 gives 12.5 tokens/s).
        video_token_id (`int`, *optional*):
            Id of the `<video>` placeholder token; clips go through the vision encoder and the input projector
            frame by frame.
        video_num_frames (`int`, *optional*, defaults to 8):
            Frames sampled uniformly from each clip.
        video_temporal_pool (`int`, *optional*, defaults to 2):
            Consecutive projected frames averaged into one (divides `video_num_frames`).
        output_projector_type (`str`, *optional*):
            Output projector from the LLM's hidden states at the signal tokens to the generator's conditioning:
            `mlp` or `transformer` (NExT-GPT: learnable queries). `None`: text output only.
        output_projector_config (`dict`, *optional*):
            Settings of the output projector (layers, heads, ...); missing keys take the type's defaults.
        signal_token_ids (`list[int]`, *optional*):
            Ids of the signal tokens `<gen_img_0> ... <gen_img_{k-1}>` the LLM emits to produce an image (NExT-GPT
            uses k = 4); `MMLLMForConditionalGeneration.enable_image_generation` adds them to the tokenizer.
        modality_generator (`dict`, *optional*):
            The modality generator: `{"type": "builtin", ...}` (a small image decoder, weights in this model) or
            `{"type": "diffusers", "pretrained": ID_OR_SUBFOLDER, ...}` (a Stable Diffusion-family pipeline,
            referenced, conditioned through `prompt_embeds`). Never a field named `generator`: transformers reads
            that name as the text model.
        base_models (`list[str]`, *optional*):
            Folders or Hub ids the pretrained components came from (the model card's `base_model`).
    """

    model_type = "mmllm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper", optional=True),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    vision_feature_layernorm: bool = False
    projector_type: str = "mlp"
    projector_config: dict | None = None
    projector_depth: int = 2
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    image_token_id: int = 32000
    image_seq_length: int | None = None
    image_grid_pinpoints: list[list[int]] | None = None
    fusion: Literal["tokens", "cross_attention"] = "tokens"
    cross_attention_config: dict | None = None
    tie_word_embeddings: bool = False
    modality_adaptive: bool = False
    modality_adaptive_layers: list[int] | None = None
    modality_adaptive_modalities: list[int] = field(default_factory=lambda: [IMAGE])
    modality_adaptive_parts: str = "kv_norms"
    audio_config: dict | PreTrainedConfig | None = None
    audio_token_id: int | None = None
    audio_pool_stride: int = 4
    video_token_id: int | None = None
    video_num_frames: int = 8
    video_temporal_pool: int = 2
    output_projector_type: str | None = None
    output_projector_config: dict | None = None
    signal_token_ids: list[int] | None = None
    modality_generator: dict | None = None
    base_models: list[str] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy={self.vision_feature_select_strategy!r} is not supported: "
                "use 'default' (drop CLS) or 'full' (keep every token)."
            )
        num_layers = self.vision_config.num_hidden_layers
        layers = self.vision_feature_layer
        for layer in [layers] if isinstance(layers, int) else layers:
            if not -(num_layers + 1) <= layer <= num_layers:
                raise ValueError(
                    f"vision_feature_layer={self.vision_feature_layer} is out of range for a vision encoder with "
                    f"{num_layers} layers: use an index in [-{num_layers + 1}, {num_layers}]."
                )
        if not set(self.modality_adaptive_modalities) <= {IMAGE, VIDEO, AUDIO}:
            raise ValueError(
                f"modality_adaptive_modalities={self.modality_adaptive_modalities}: use modality ids 1 (image), "
                "2 (video) and 3 (audio); text (0) always has its branch."
            )
        if self.modality_adaptive_parts not in ("kv_norms", "all"):
            raise ValueError(
                f"modality_adaptive_parts={self.modality_adaptive_parts!r}: use 'kv_norms' (mPLUG-Owl2: K/V and "
                "norms per modality) or 'all' (CogVLM's visual expert: every projection, the MLP and the norms)."
            )
        layers = self.modality_adaptive_layers
        num_text_layers = self.text_config.num_hidden_layers
        if layers is not None and not all(-num_text_layers <= i < num_text_layers for i in layers):
            raise ValueError(
                f"modality_adaptive_layers={layers} is out of range for a backbone with {num_text_layers} layers."
            )
        if self.audio_config is not None and self.audio_token_id is None:
            raise ValueError("audio_config is set but audio_token_id is not: give the id of the <audio> token.")
        if self.audio_pool_stride < 1:
            raise ValueError(f"audio_pool_stride={self.audio_pool_stride}: use 1 or more encoder frames per token.")
        if self.video_temporal_pool < 1 or self.video_num_frames % self.video_temporal_pool:
            raise ValueError(
                f"video_num_frames={self.video_num_frames} is not a multiple of video_temporal_pool="
                f"{self.video_temporal_pool}: pooling averages groups of that many consecutive frames."
            )
        self._check_image_generation()
        check_fusion(self)
        expected = image_text_length(self)
        if self.image_seq_length is None:
            self.image_seq_length = expected
        elif self.image_seq_length != expected:
            raise ValueError(
                f"image_seq_length={self.image_seq_length}, but with the {self.projector_type!r} projector and "
                f"fusion={self.fusion!r} one image takes {expected} token(s) in the text: leave image_seq_length "
                f"unset or set it to {expected}."
            )
        check_image_grid_pinpoints(self)

    def _check_image_generation(self) -> None:
        """Output projector, signal tokens and generator come together (or not at all)."""
        parts = {
            "output_projector_type": self.output_projector_type,
            "signal_token_ids": self.signal_token_ids,
            "modality_generator": self.modality_generator,
        }
        given = [name for name, value in parts.items() if value]
        if given and len(given) != len(parts):
            missing = sorted(set(parts) - set(given))
            raise ValueError(
                f"Image generation needs output_projector_type, signal_token_ids and modality_generator "
                f"together; {', '.join(missing)} missing. Use "
                "MMLLMForConditionalGeneration.enable_image_generation(processor, ...), which sets all "
                "three and adds the signal tokens to the tokenizer."
            )
        if self.modality_generator:
            self.modality_generator = checked_generator_settings(self.modality_generator)
        if self.output_projector_type:
            output_projector_settings(self)
        vocab_size = self.text_config.vocab_size
        if self.signal_token_ids and not all(0 <= token < vocab_size for token in self.signal_token_ids):
            raise ValueError(
                f"signal_token_ids={self.signal_token_ids} are outside the backbone's vocabulary of "
                f"{vocab_size}: resize the embeddings (enable_image_generation does)."
            )

    @property
    def image_generation(self) -> bool:
        """Whether this model can output images (output projector + generator configured)."""
        return self.output_projector_type is not None

    @property
    def feature_layers(self) -> list[int]:
        """The selected vision feature layers as a list (non-negative indices into the hidden states)."""
        layers = self.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        return [layer % (self.vision_config.num_hidden_layers + 1) for layer in layers]

    def projected_seq_length(self) -> int:
        """Tokens (latents, with cross-attention fusion) the input projector emits per image (the projector
        registry knows each type's count)."""
        return projector_output_length(self)

    @property
    def video_seq_length(self) -> int:
        """Soft tokens one video clip becomes: the pooled frames, each `image_seq_length` tokens."""
        return self.video_num_frames // self.video_temporal_pool * self.image_seq_length

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        """A folder's config, refused before anything is built when it is not an mmllm checkpoint (transformers
        would only warn, then build the default 7B-size model over the folder)."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        check_checkpoint_config(config_dict, str(pretrained_model_name_or_path))
        return config_dict, kwargs

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MMLLMConfig":
        """Build the config of a named architecture preset (`configuration/<name>.json`).

        Any field can be overridden by keyword, e.g. `from_preset("llava-tiny", projector_type="linear")`.
        """
        return import_library_module("builders.presets").load_config_preset(cls, name, **overrides)


# Checkpoints `mmllm convert KIND` reads, by their model_type.
CONVERTIBLE = {
    "llava": "llava",
    "llava_next": "llava-next",
    "blip-2": "blip2",
    "idefics": "idefics",
    "mplug_owl2": "mplug-owl2",
}


def check_checkpoint_config(config_dict: dict, source: str) -> None:
    """A clear error when `config_dict` (a folder's config.json) is not an mmllm model's: another model type, or
    a vision/text sub-config missing (building from defaults would make a 7B-size model)."""
    model_type = config_dict.get("model_type")
    if model_type != MMLLMConfig.model_type:
        kind = CONVERTIBLE.get(model_type)
        fix = (
            f"convert it first: `mmllm convert {kind} {source} OUTPUT`"
            if kind
            else "mmllm loads its own folders only: make one with `mmllm build --preset NAME FOLDER`, or compose "
            "this backbone with a vision encoder (`MMLLMForConditionalGeneration.from_components(vision=..., "
            f"text={source!r})`)"
        )
        architectures = ", ".join(config_dict.get("architectures") or []) or "no architectures listed"
        raise ValueError(
            f"{source} is not an mmllm checkpoint: its config.json has model_type {model_type!r} ({architectures}); "
            f"{fix}."
        )
    for name in ("vision_config", "text_config"):
        if not isinstance(config_dict.get(name), dict) or "model_type" not in config_dict[name]:
            raise ValueError(
                f"{source}: config.json has no {name} with a model_type, so the component would be built from "
                f"defaults (a 7B-size model for text_config). Restore the folder's config.json as mmllm saved it."
            )


MMLLMConfig.register_for_auto_class()


class _Name(str):
    """A name with the `__name__` that transformers reads from an auto mapping's keys and values (classes there)."""

    @property
    def __name__(self) -> str:
        return str(self)


def _register_model_type_name() -> None:
    """Put "mmllm" among `AutoModelForImageTextToText`'s model types: a loaded config is known to have an LM head.

    lmms-eval's `huggingface` model (0.7) loads only the config, then picks its auto class by looking the model type
    up among the keys of the Auto class's mapping: config classes, never a model-type string (the lookup fails for
    transformers' own LLaVA too), so every folder fell to the headless `AutoModel`. The public
    `register` takes a string key (transformers' mapping is typed `type | str`). The value is the class's name, not
    the class, so the config stays free of modeling code: transformers only reads names from registered values (the
    pipelines' model-type check), and loading goes through the config's `auto_map` or the package's registration.
    """
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.register(
        _Name(MMLLMConfig.model_type), _Name("MMLLMForConditionalGeneration"), exist_ok=True
    )


_register_model_type_name()

__all__ = ["MMLLMConfig", "backbone_context"]
