"""Compose an MM-LLM from pretrained parts: any transformers vision encoder + any causal LM (library side).

`MMLLMForConditionalGeneration.from_components` calls `compose`. The encoder and the backbone keep their
pretrained weights, the input projector is fresh, the tokenizer gains the placeholder tokens and the embeddings grow
to match without changing the rows of the original vocabulary. An LLM with a chat template of its own keeps it (an
instruct LLM answers as it was tuned to); only LLMs without one get the package's template and its role tokens.
"""

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel, PreTrainedConfig

from ..configuration_mmllm import backbone_context
from .presets import chat_template as package_chat_template
from .presets import llm_chat_template, special_tokens
from .real_llm import load_causal_lm, load_config, load_tokenizer


def _vision_encoder_config(vision: str) -> PreTrainedConfig:
    """The vision config of a folder or Hub id: a vision model, or the vision half of a CLIP/SigLIP model."""
    config = AutoConfig.from_pretrained(vision)
    return getattr(config, "vision_config", None) or config


# Vision encoders without a CLS token: every output token is a patch, so all of them go to the projector.
NO_CLS_TOKEN = ("siglip_vision_model", "siglip2_vision_model")


def _chat_template(own, chat_template: str | None) -> tuple[str, bool]:
    """`(template, whether it is the LLM's own)`: the caller's, else the LLM's own (kept), else the package's."""
    if chat_template is not None:
        return chat_template, False
    if isinstance(own, str) and own:
        return llm_chat_template(own), True
    return package_chat_template(), False


def _load_tokenizer(text: str, chat_template: str | None):
    """`(tokenizer, whether its LLM's template is kept)`: the LM's tokenizer (a GGUF file's own too) with the
    placeholder tokens added (named, so `tokenizer.image_token` works) and the chat template set; with the package's
    template, its role and end-of-turn markers as well."""
    tokens = special_tokens()
    tokenizer = load_tokenizer(text, extra_special_tokens=tokens["modality_tokens"], padding_side="left")
    tokenizer.chat_template, own_template = _chat_template(tokenizer.chat_template, chat_template)
    if not own_template:  # the package template's markers must stay single tokens
        template_tokens = [*tokens["roles"], tokens["eos_token"]]
        tokenizer.add_special_tokens({"extra_special_tokens": template_tokens}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": tokens["pad_token"]})
    return tokenizer, own_template


def compose(model_class, vision: str, text: str, projector: str = "mlp", chat_template: str | None = None, **overrides):
    """Build `(model, processor)` from a pretrained vision encoder and causal LM; see `from_components`."""
    from ..processing_mmllm import MMLLMProcessor

    # The modality-adaptive module is switched on after the pretrained weights are in: its branches copy them.
    modality_adaptive = overrides.pop("modality_adaptive", False)
    adaptive_layers = overrides.pop("modality_adaptive_layers", None)
    adaptive_modalities = overrides.pop("modality_adaptive_modalities", None)
    vision_config = _vision_encoder_config(vision)
    text_config = load_config(text)
    overrides.setdefault(
        "vision_feature_select_strategy", "full" if vision_config.model_type in NO_CLS_TOKEN else "default"
    )
    tokenizer, own_template = _load_tokenizer(text, chat_template)
    config = model_class.config_class(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        projector_type=projector,
        image_token_id=tokenizer.image_token_id,
        base_models=[vision, text],
        **overrides,
    )
    model = model_class(config)

    vision_model = AutoModel.from_pretrained(vision, config=vision_config)  # the class its config maps to
    model.model.vision_tower.load_state_dict(vision_model.state_dict())
    causal_lm = load_causal_lm(text)
    missing, unexpected = model.model.language_model.load_state_dict(causal_lm.base_model.state_dict(), strict=False)
    missing = [key for key in missing if ".gated_cross_attn." not in key]  # new blocks (cross-attention fusion)
    if missing or unexpected:
        raise RuntimeError(f"{text} does not fit the backbone config: missing {missing}, unexpected {unexpected}.")
    with torch.no_grad():
        model.lm_head.weight.copy_(causal_lm.get_output_embeddings().weight)
    model.tie_weights()
    if len(tokenizer) > config.text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    if modality_adaptive:
        model.enable_modality_adaptive(adaptive_layers, adaptive_modalities)

    # Generation stops where the LM stops (its generation config and tokenizer) and, under the package's template,
    # at that template's end-of-turn token.
    generation = model.generation_config
    eos = causal_lm.generation_config.eos_token_id
    eos = [*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id]
    if not own_template:
        eos.append(tokenizer.convert_tokens_to_ids(special_tokens()["eos_token"]))
    generation.eos_token_id = sorted({token for token in eos if token is not None})
    generation.pad_token_id = tokenizer.pad_token_id

    processor = MMLLMProcessor(
        image_processor=AutoImageProcessor.from_pretrained(vision),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,  # one template: the tokenizer's and the processor's files agree
        image_seq_length=config.image_seq_length,
        context_length=backbone_context(config),
    )
    return model, processor


__all__ = ["compose"]
