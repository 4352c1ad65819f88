"""Architecture presets and the offline processor of the tiny presets (library side, not in the hub set).

Data files live in the repository's top-level folders (`configuration/`, `processing/`, `hub_cards/`,
`training_recipes/`); the wheel installs them inside the package, so both layouts are searched.
"""

import json
from functools import lru_cache
from pathlib import Path

import transformers
from transformers import PreTrainedTokenizerFast

from ..component_settings import GRID_PROJECTORS
from ..configuration_mmllm import backbone_context

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # modeling_mmllm/
TOKENIZER_VOCAB_SIZE = 512


def asset_dir(kind: str) -> Path:
    """The folder of one kind of data file, in an installed wheel or a source checkout."""
    for base in (PACKAGE_DIR, PACKAGE_DIR.parent):
        if (base / kind).is_dir():
            return base / kind
    raise FileNotFoundError(f"The mmllm data folder {kind!r} is missing: reinstall the package (pip install mmllm).")


def preset_names() -> list[str]:
    """Names of the architecture presets that ship with the package."""
    return sorted(path.stem for path in asset_dir("configuration").glob("*.json"))


def read_preset(name: str, _derived: tuple[str, ...] = ()) -> dict:
    """The fields of preset `name`, with a clear error listing the valid names. A preset may name a `"base"`
    preset and give only what differs from it (`merge_preset`)."""
    path = asset_dir("configuration") / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"Unknown preset {name!r}: choose one of {', '.join(preset_names())}.")
    preset = json.loads(path.read_text())
    base = preset.pop("base", None)
    if base is None:
        return preset
    if base in (*_derived, name):
        raise ValueError(f"Preset {name!r} derives from itself ({' -> '.join((*_derived, name, base))}).")
    return merge_preset(read_preset(base, (*_derived, name)), preset)


def merge_preset(base: dict, changes: dict) -> dict:
    """`changes` over `base`: a sub-config (`vision_config`, ...) of the same `model_type` is merged field by field,
    so a preset names only the sizes it changes; any other value (a sub-config of another type, a settings dict such
    as `projector_config`) replaces the base's."""
    merged = dict(base)
    for key, value in changes.items():
        old = base.get(key)
        sub_config = isinstance(old, dict) and isinstance(value, dict) and "model_type" in old
        if sub_config and value.get("model_type", old["model_type"]) == old["model_type"]:
            merged[key] = merge_preset(old, value)
        else:
            merged[key] = value
    return merged


def load_config_preset(config_class, name: str, **overrides):
    """`MMLLMConfig.from_preset`: the preset's fields, updated with `overrides`."""
    return config_class(**{**read_preset(name), **overrides})


def _template_file(name: str) -> str:
    return (asset_dir("processing") / name).read_text()


def chat_template() -> str:
    """The package's multimodal chat template (with `{% generation %}` markers), for LLMs without their own."""
    return _template_file("content_parts.jinja") + _template_file("chat_template.jinja")


def llm_chat_template(own: str) -> str:
    """An LLM's own chat template, kept, behind a prelude that turns typed content parts into their string form
    (placeholders where the media go): the LLM sees the chats it was tuned on, with `<image>` in the user's turn."""
    parts = _template_file("content_parts.jinja")
    if own.startswith(parts):  # already kept (a folder composed before)
        return own
    return parts + _template_file("llm_template_prelude.jinja") + own


def special_tokens() -> dict:
    """The package's special-token set: pad, eos, chat roles and one placeholder per modality."""
    return json.loads((asset_dir("processing") / "special_tokens.json").read_text())


def image_processor_for(vision_config, image_grid_pinpoints: list[list[int]] | None = None, **kwargs):
    """The image processor that matches a vision encoder type, resized to the encoder's input size; with
    `image_grid_pinpoints`, transformers' AnyRes processor (LLaVA-NeXT's) with that encoder's normalisation."""
    names = json.loads((asset_dir("processing") / "image_processors.json").read_text())
    if vision_config.model_type not in names:
        raise ValueError(
            f"No image-processor preset for vision encoder type {vision_config.model_type!r} (known: "
            f"{sorted(names)}): compose with from_components, which uses the encoder's own image processor."
        )
    image_processor_class = getattr(transformers, names[vision_config.model_type])
    size = vision_config.image_size
    if "shortest_edge" in image_processor_class().size:
        kwargs = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}, **kwargs}
    else:
        kwargs = {"size": {"height": size, "width": size}, **kwargs}
    if image_grid_pinpoints is None:
        return image_processor_class(**kwargs)
    plain = image_processor_class(**kwargs)
    return transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=[list(pair) for pair in image_grid_pinpoints],
        image_mean=plain.image_mean,
        image_std=plain.image_std,
    )


@lru_cache(maxsize=1)
def _offline_tokenizer_json() -> str:
    """Train the offline byte-level BPE on the package's corpus (deterministic, about a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokens = special_tokens()
    specials = [tokens["pad_token"], tokens["eos_token"], *tokens["roles"], *tokens["modality_tokens"].values()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = (asset_dir("processing") / "tokenizer_corpus.txt").read_text().splitlines()
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer.to_str()


def offline_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer with the package's special tokens, padding on the left for generation."""
    from tokenizers import Tokenizer

    tokens = special_tokens()
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_offline_tokenizer_json()),
        pad_token=tokens["pad_token"],
        eos_token=tokens["eos_token"],
        extra_special_tokens=tokens["modality_tokens"],
        padding_side="left",
        chat_template=chat_template(),
    )


def load_processor_preset(processor_class, name: str, config=None):
    """`MMLLMProcessor.from_preset`: offline tokenizer + image processor + chat template for preset `name`.

    `config` (the preset's config with overrides, e.g. another image size) defaults to the preset's own.
    """
    from ..configuration_mmllm import MMLLMConfig

    config = config or MMLLMConfig.from_preset(name)
    tokenizer = offline_tokenizer()
    signal_tokens = [f"<gen_img_{index}>" for index in range(len(config.signal_token_ids or []))]
    tokenizer.add_tokens(signal_tokens, special_tokens=True)
    if tokenizer.convert_tokens_to_ids(signal_tokens) != list(config.signal_token_ids or []):
        raise ValueError(
            f"Preset {name!r} has signal_token_ids={config.signal_token_ids}, but the offline tokenizer "
            f"gives {signal_tokens} the ids {tokenizer.convert_tokens_to_ids(signal_tokens)}."
        )
    if tokenizer.image_token_id != config.image_token_id or len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(
            f"Preset {name!r} does not fit the offline tokenizer (image token id {tokenizer.image_token_id}, "
            f"{len(tokenizer)} tokens): it needs image_token_id={tokenizer.image_token_id} and a vocab_size of at "
            f"least {len(tokenizer)}. Use from_components for presets of pretrained models."
        )
    options = json.loads((asset_dir("processing") / "processor_presets.json").read_text()).get(name, {})
    if config.image_grid_pinpoints is not None:
        options["grid_packing"] = config.projector_type in GRID_PROJECTORS
    if config.video_token_id is not None:
        options.update(video_num_frames=config.video_num_frames, video_temporal_pool=config.video_temporal_pool)
    if config.audio_config is not None:
        options.update(
            audio_features=audio_features_for(config.audio_config), audio_pool_stride=config.audio_pool_stride
        )
    return processor_class(
        image_processor=image_processor_for(config.vision_config, config.image_grid_pinpoints),
        tokenizer=tokenizer,
        chat_template=chat_template(),
        image_seq_length=config.image_seq_length,
        context_length=backbone_context(config),
        **options,
    )


def audio_features_for(audio_config, sampling_rate: int = 16000, hop_length: int = 160):
    """Whisper's log-mel feature extractor sized to the encoder: its window is `2 * max_source_positions` frames."""
    if audio_config.model_type != "whisper":
        raise ValueError(
            f"No feature-extractor preset for audio encoder type {audio_config.model_type!r}: pass the "
            "encoder's own feature extractor to MMLLMProcessor(audio_features=...)."
        )
    window_samples = 2 * audio_config.max_source_positions * hop_length
    if window_samples % sampling_rate:
        raise ValueError(
            f"max_source_positions={audio_config.max_source_positions} gives a window of "
            f"{window_samples / sampling_rate} s: use a whole number of seconds."
        )
    return transformers.WhisperFeatureExtractor(
        feature_size=audio_config.num_mel_bins,
        sampling_rate=sampling_rate,
        hop_length=hop_length,
        chunk_length=window_samples // sampling_rate,
    )


__all__ = [
    "asset_dir",
    "audio_features_for",
    "chat_template",
    "image_processor_for",
    "load_config_preset",
    "load_processor_preset",
    "offline_tokenizer",
    "preset_names",
    "merge_preset",
    "read_preset",
    "special_tokens",
]
