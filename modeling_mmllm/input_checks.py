"""Checks of a model's inputs, each with an error that names the problem and the fix: token ids in the vocabulary,
placeholders with their media, the backbone's context (`backbone_context`, the one source of the limit), and a
generation cut to fit it."""

import torch
from transformers.utils import logging
from transformers.utils.import_utils import torch_compilable_check

from .configuration_mmllm import AUDIO, IMAGE, VIDEO, backbone_context

logger = logging.get_logger(__name__)

MODALITY_NAMES = {IMAGE: "image", VIDEO: "video", AUDIO: "audio"}
MEDIA_ARGUMENTS = {
    IMAGE: ("images", "pixel_values"),
    VIDEO: ("videos", "pixel_values_videos"),
    AUDIO: ("audio", "input_features"),
}


def check_context(config, new_tokens: int, past: int | None = 0) -> None:
    """A clear error when the cached and new tokens together run past the backbone's context: beyond it the model
    silently produces garbage (or, with learned positions, fails deep inside the backbone). Sequence lengths
    are static shapes: plain Python, also under torch.compile (`past=None`: unknown there, not checked)."""
    context = backbone_context(config)
    if context is None or past is None or past + new_tokens <= context:
        return
    cached = f" ({past} in the cache + {new_tokens} new)" if past else ""
    raise ValueError(
        f"The input is {past + new_tokens} tokens{cached}, but the backbone's context "
        f"(text_config.max_position_embeddings) is {context}: shorten the prompt, use fewer images, or lower "
        f"max_new_tokens (for training, set max_length to at most {context})."
    )


def check_token_ids(config, input_ids: torch.LongTensor) -> None:
    """A clear error for token ids outside the embedding table (an `IndexError` deep in torch otherwise): ids
    from another tokenizer, or a vocabulary resized without the model. The size comes from the config, which
    `resize_token_embeddings` keeps current: PEFT's wrappers of the embedding (trainable tokens) hide its own."""
    rows = config.text_config.vocab_size

    def message() -> str:
        bad = input_ids[(input_ids < 0) | (input_ids >= rows)]
        return (
            f"input_ids hold token id {int(bad[0])}, outside the model's vocabulary of {rows} ids: encode the text "
            "with this model's own processor (or resize the embeddings after adding tokens)."
        )

    torch_compilable_check(((input_ids >= 0) & (input_ids < rows)).all(), message)


def check_placeholders_have_media(
    placeholder_ids: dict[int, int], input_ids: torch.LongTensor, given: set[int]
) -> None:
    """A clear error for placeholder tokens whose media were not given (`<image>` without `pixel_values`, ...):
    they would run as plain tokens. Not checked for modalities given as features, nor under torch.compile (a
    device-side count)."""
    missing = {modality: token for modality, token in placeholder_ids.items() if modality not in given}
    if not missing or torch.compiler.is_compiling():
        return
    counts = torch.stack([(input_ids == token).sum() for token in missing.values()])

    def message() -> str:
        modality, count = next((m, int(n)) for m, n in zip(missing, counts) if n)
        name, (argument, model_input) = MODALITY_NAMES[modality], MEDIA_ARGUMENTS[modality]
        verb = "was" if argument == "audio" else "were"
        return (
            f"The text has {count} <{name}> placeholder token(s) but no {argument} {verb} given ({model_input} "
            f"is None): pass {argument}=... to the processor (it returns {model_input}), or remove the "
            "placeholders."
        )

    torch_compilable_check((counts == 0).all(), message)


def fit_to_context(model, prompt: torch.Tensor | None, kwargs: dict) -> dict:
    """`kwargs` with `max_new_tokens` lowered so that the prompt and its answer fit the backbone's context."""
    context = backbone_context(model.config)
    if context is None or prompt is None:
        return kwargs
    length = prompt.shape[1]
    if length >= context:
        raise ValueError(
            f"The prompt is {length} tokens (soft tokens of its images included) and the backbone's context "
            f"(text_config.max_position_embeddings) is {context}: no room is left to generate. Shorten the "
            "prompt or use fewer images."
        )
    config = kwargs.get("generation_config") or model.generation_config
    new_tokens = kwargs.get("max_new_tokens") or config.max_new_tokens
    total = length + new_tokens if new_tokens is not None else kwargs.get("max_length") or config.max_length
    if total <= context:
        return kwargs
    room = context - length
    logger.warning(
        f"The prompt ({length} tokens) and the requested answer ({total - length} new tokens) exceed the "
        f"backbone's context of {context} tokens: generating at most {room} new tokens. Lower max_new_tokens, "
        "shorten the prompt or use fewer images."
    )
    return {key: value for key, value in kwargs.items() if key != "max_length"} | {"max_new_tokens": room}


__all__ = [
    "MEDIA_ARGUMENTS",
    "MODALITY_NAMES",
    "check_context",
    "check_placeholders_have_media",
    "check_token_ids",
    "fit_to_context",
]
