"""The settings of every component type, checked without torch or the network: `MMLLMConfig` validates with
these when it is made (so importing and building a config stays light), and the components build from them.

One entry per type: its default settings (the keys its `*_config` field may set) and, for input projectors, the
number of soft tokens it emits per image.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Vision encoders without a CLS token: every token they emit is a patch.
NO_CLS_MODEL_TYPES = ("siglip_vision_model", "siglip2_vision_model")


@dataclass(frozen=True)
class InputProjectorSpec:
    """What the config knows of an input projector type (its module is in `input_projector.PROJECTORS`)."""

    defaults: dict | None  # the keys `projector_config` may set, with their defaults (None: free-form)
    tokens: Callable[[Any, dict], int]  # soft tokens per image, from the config and the projector's settings
    grid: bool = False  # one token per encoder patch: AnyRes packs the tiles as a grid (LLaVA-NeXT)
    encoder_width_in_cross_attention: bool = False  # keeps the encoder's width under cross-attention fusion


def _per_patch(config, settings: dict) -> int:
    return num_vision_tokens(config)


def _per_shuffled_block(config, settings: dict) -> int:
    """Tokens after pixel shuffle: one per `scale_factor` x `scale_factor` block of a square patch grid."""
    tokens, scale = num_vision_tokens(config), settings["scale_factor"]
    side = math.isqrt(tokens)
    if side * side != tokens or scale < 1 or side % scale:
        raise ValueError(
            f"pixel_shuffle with scale_factor={scale} needs a square grid of patches whose side it divides; the "
            f"encoder gives {tokens} tokens per image. Pick a scale_factor that divides the grid side, an image_size "
            "/ patch_size that makes the side divisible, or vision_feature_select_strategy='default' for an "
            "encoder with a CLS token."
        )
    return tokens // scale**2


# One entry per input projector type: adding a projector is this entry and its module in `PROJECTORS`.
INPUT_PROJECTORS: dict[str, InputProjectorSpec] = {
    "linear": InputProjectorSpec({}, _per_patch, grid=True),
    "mlp": InputProjectorSpec({}, _per_patch, grid=True),
    # Idefics3 / SmolVLM: space-to-depth, then the token-wise MLP (`projector_depth`, `multimodal_projector_bias`)
    "pixel_shuffle": InputProjectorSpec({"scale_factor": 2}, _per_shuffled_block),
    "abstractor": InputProjectorSpec(  # mPLUG-Owl2's visual abstractor
        {
            "num_queries": 64,
            "num_layers": 6,
            "num_heads": 16,
            "intermediate_size": 2816,
            "layer_norm_eps": 1e-6,
            "end_token": True,
        },
        lambda config, settings: settings["num_queries"] + int(settings["end_token"]),
    ),
    "qformer": InputProjectorSpec(  # BLIP-2: Blip2QFormerConfig's own fields, plus num_query_tokens
        None, lambda config, settings: settings.get("num_query_tokens", 32)
    ),
    "resampler": InputProjectorSpec(  # Flamingo / IDEFICS perceiver resampler
        {"num_latents": 64, "depth": 6, "num_heads": 16, "head_dim": 96, "qk_layer_norms": False},
        lambda config, settings: settings["num_latents"],
        encoder_width_in_cross_attention=True,
    ),
}
INPUT_PROJECTOR_DEFAULTS = {kind: spec.defaults for kind, spec in INPUT_PROJECTORS.items()}
GRID_PROJECTORS = tuple(kind for kind, spec in INPUT_PROJECTORS.items() if spec.grid)
OUTPUT_PROJECTOR_DEFAULTS = {
    "mlp": {"hidden_act": "gelu"},
    "transformer": {"num_layers": 2, "num_heads": 4, "intermediate_size": None, "dropout": 0.0},
}
# How the projected image features reach the LLM: as soft tokens in its input (LLaVA, BLIP-2, mPLUG-Owl2), or through
# gated cross-attention blocks before every `cross_layer_interval`-th decoder layer (Flamingo, IDEFICS).
FUSIONS = ("tokens", "cross_attention")
CROSS_ATTENTION_DEFAULTS = {"cross_layer_interval": 1, "qk_layer_norms": False, "alpha_type": "float"}
GENERATOR_DEFAULTS = {
    "builtin": {
        "condition_length": 8,
        "condition_width": 64,
        "image_size": 32,
        "channels": 64,
        "num_heads": 4,
        "vocab_size": None,
    },
    "diffusers": {  # the conditioning shape is read from the pipeline when the generator is attached
        "pretrained": None,
        "condition_length": None,
        "condition_width": None,
        "num_inference_steps": 50,
        "guidance_scale": 7.5,
        "image_size": None,
    },
}


def checked_settings(given: dict | None, defaults: dict, field: str, owner: str) -> dict:
    """`given` (the config's `field`) over `owner`'s defaults; unknown keys are an error, not ignored."""
    given = dict(given or {})
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(
            f"{field} has keys {sorted(unknown)} that the {owner} does not use; its settings are {sorted(defaults)}."
        )
    return {**defaults, **given}


def _known(kind: str | None, registry: dict, field: str) -> None:
    if kind not in registry:
        raise ValueError(f"Unknown {field} {kind!r}: choose one of {sorted(registry)}.")


def input_projector_settings(config) -> dict:
    """`config.projector_config` over its projector type's defaults (the Q-Former's are free-form)."""
    _known(config.projector_type, INPUT_PROJECTORS, "projector_type")
    defaults = INPUT_PROJECTORS[config.projector_type].defaults
    if defaults is None:
        return dict(config.projector_config or {})
    return checked_settings(
        config.projector_config, defaults, "projector_config", f"{config.projector_type!r} projector"
    )


def cross_attention_settings(config) -> dict:
    """`config.cross_attention_config` over the gated cross-attention's defaults."""
    return checked_settings(
        config.cross_attention_config, CROSS_ATTENTION_DEFAULTS, "cross_attention_config", "gated cross-attention"
    )


def check_fusion(config) -> None:
    """Cross-attention fusion: a valid layer interval and float/vector gates, and only the features it combines with."""
    if config.fusion not in FUSIONS:
        raise ValueError(f"Unknown fusion {config.fusion!r}: choose one of {list(FUSIONS)}.")
    settings = cross_attention_settings(config)
    if config.fusion != "cross_attention":
        if config.cross_attention_config:
            raise ValueError(
                "cross_attention_config is set but fusion='tokens': set fusion='cross_attention' for the gated "
                "cross-attention blocks, or drop cross_attention_config."
            )
        return
    if not isinstance(settings["qk_layer_norms"], bool):
        raise ValueError(f"cross_attention_config.qk_layer_norms={settings['qk_layer_norms']!r}: use true or false.")
    interval, layers = settings["cross_layer_interval"], config.text_config.num_hidden_layers
    if isinstance(interval, bool) or not isinstance(interval, int) or not 1 <= interval <= layers:
        raise ValueError(
            f"cross_attention_config.cross_layer_interval={interval!r}: a gated cross-attention block goes before "
            f"every n-th decoder layer, so use a whole number from 1 to the backbone's {layers} layers."
        )
    if settings["alpha_type"] not in ("float", "vector"):
        raise ValueError(
            f"cross_attention_config.alpha_type={settings['alpha_type']!r}: the tanh gates are one 'float' per block "
            "(IDEFICS, Flamingo) or a 'vector' of the LLM's width."
        )
    others = {
        "modality_adaptive": config.modality_adaptive,
        "image_grid_pinpoints": config.image_grid_pinpoints is not None,
        "video_token_id": config.video_token_id is not None,
        "audio_config": config.audio_config is not None,
    }
    given = [name for name, value in others.items() if value]
    if given:
        raise ValueError(
            f"fusion='cross_attention' does not combine with {', '.join(given)}: cross-attention fusion takes "
            "single-view images (Flamingo, IDEFICS). Use fusion='tokens' (the default) for the modality-adaptive "
            "module, AnyRes tiling, video and audio."
        )


def feature_width(config) -> int:
    """Width of the encoder features the input projector reads (the selected layers concatenated)."""
    return config.vision_config.hidden_size * len(config.feature_layers)


def projector_output_width(config) -> int:
    """Width of the projected features. With cross-attention fusion the `resampler` keeps the encoder's width, as
    IDEFICS's perceiver does (the blocks' K/V projections map it); every other projector emits the LLM's width."""
    if config.fusion == "cross_attention" and INPUT_PROJECTORS[config.projector_type].encoder_width_in_cross_attention:
        return feature_width(config)
    return config.text_config.hidden_size


def image_text_length(config) -> int:
    """Tokens one `<image>` stands for in the text: the projector's soft tokens, or the one `<image>` token that
    cross-attention fusion keeps (the latents reach the LLM through the blocks)."""
    return 1 if config.fusion == "cross_attention" else projector_output_length(config)


def num_vision_tokens(config) -> int:
    """Tokens the encoder yields per image after feature selection.

    As in LLaVA, `"default"` drops the first token (the CLS token of CLIP-like encoders) and `"full"` keeps
    every token; encoders without a CLS token (SigLIP) are normally used with `"full"`.
    """
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    has_cls = config.vision_config.model_type not in NO_CLS_MODEL_TYPES
    return patches + int(has_cls) - int(config.vision_feature_select_strategy == "default")


def projector_output_length(config) -> int:
    """Soft tokens per image that `config`'s input projector emits."""
    settings = input_projector_settings(config)
    return INPUT_PROJECTORS[config.projector_type].tokens(config, settings)


def check_image_grid_pinpoints(config) -> None:
    """AnyRes grids (`image_grid_pinpoints`): `[height, width]` pairs, multiples of the encoder's image size; a grid
    projector needs a square patch grid per view (no CLS token among its tokens)."""
    pinpoints, size = config.image_grid_pinpoints, config.vision_config.image_size
    if pinpoints is None:
        return
    pairs = isinstance(pinpoints, (list, tuple)) and pinpoints and all(len(pair) == 2 for pair in pinpoints)
    if not pairs or any(side <= 0 or side % size for pair in pinpoints for side in pair):
        raise ValueError(
            f"image_grid_pinpoints={pinpoints}: give [height, width] pairs that are multiples of the vision "
            f"encoder's image size {size} (e.g. [[{size}, {2 * size}], [{2 * size}, {size}], "
            f"[{2 * size}, {2 * size}]])."
        )
    patches = config.vision_config.image_size // config.vision_config.patch_size
    if config.projector_type in GRID_PROJECTORS and config.image_seq_length != patches**2:
        raise ValueError(
            f"AnyRes with the {config.projector_type!r} projector packs each view as a {patches}x{patches} patch "
            f"grid, but a view has {config.image_seq_length} tokens: use vision_feature_select_strategy='default' "
            "to drop the CLS token (or 'full' on an encoder without one)."
        )


def output_projector_settings(config) -> dict:
    """`config.output_projector_config` over its output projector type's defaults."""
    kind = config.output_projector_type
    _known(kind, OUTPUT_PROJECTOR_DEFAULTS, "output_projector_type")
    return checked_settings(
        config.output_projector_config,
        OUTPUT_PROJECTOR_DEFAULTS[kind],
        "output_projector_config",
        f"{kind!r} output projector",
    )


def checked_generator_settings(settings: dict) -> dict:
    """A `modality_generator` dict with its type's defaults filled in; unknown types and keys are errors (reads no
    files: the config checks this). A diffusers pipeline's conditioning shape may stay unset here:
    `modality_generator.resolve_generator_settings` reads it when the generator is attached."""
    kind = settings.get("type")
    _known(kind, GENERATOR_DEFAULTS, "modality_generator type")
    defaults = GENERATOR_DEFAULTS[kind]
    complete = checked_settings(
        {k: v for k, v in settings.items() if k != "type"}, defaults, "modality_generator", f"{kind!r} generator"
    )
    if kind == "diffusers" and not complete["pretrained"]:
        raise ValueError(
            "modality_generator type 'diffusers' needs 'pretrained': a local pipeline folder or a "
            "Hub id (e.g. a Stable Diffusion 1.x/2.x pipeline)."
        )
    missing = [key for key in ("condition_length", "condition_width") if complete[key] is None]
    if missing and kind != "diffusers":
        raise ValueError(f"modality_generator needs {missing} (the shape of the generator's conditioning).")
    return {"type": kind, **complete}


__all__ = [
    "CROSS_ATTENTION_DEFAULTS",
    "FUSIONS",
    "GENERATOR_DEFAULTS",
    "INPUT_PROJECTORS",
    "INPUT_PROJECTOR_DEFAULTS",
    "InputProjectorSpec",
    "OUTPUT_PROJECTOR_DEFAULTS",
    "check_fusion",
    "checked_generator_settings",
    "checked_settings",
    "cross_attention_settings",
    "feature_width",
    "image_text_length",
    "input_projector_settings",
    "num_vision_tokens",
    "output_projector_settings",
    "projector_output_length",
    "projector_output_width",
]
