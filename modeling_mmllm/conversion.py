"""Import existing checkpoints into the mmllm family (library side).

Each converter translates the config and renames the state dict, then loads it strictly: any unmatched key is
an error, never a silently random weight. `from_llava` needs no renaming (LLaVA's names are ours); `from_blip2`
moves the Q-Former, its queries and the language projection into our `qformer` projector.
"""

import re
from pathlib import Path

import torch
from torch import nn
from transformers import Blip2ForConditionalGeneration, LlavaForConditionalGeneration

from .configuration_mmllm import MMLLMConfig
from .modeling_mmllm import MMLLMForConditionalGeneration


def _load(model_or_path, model_class: type[nn.Module]) -> nn.Module:
    if isinstance(model_or_path, model_class):
        return model_or_path
    if isinstance(model_or_path, (str, Path)):
        return model_class.from_pretrained(model_or_path)
    raise TypeError(
        f"Expected a {model_class.__name__} or the path of one saved with save_pretrained, "
        f"got {type(model_or_path).__name__}."
    )


def rename_keys(state_dict: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Rename state-dict keys with the first matching `(regex, replacement)` rule; keys matching none are kept."""
    renamed = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in rules:
            if re.match(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        renamed[key] = tensor
    return renamed


# mPLUG-Owl2's visual abstractor -> our `abstractor` projector (relative to the abstractor module).
ABSTRACTOR_KEY_RULES = [
    (r"^encoder\.layers\.(\d+)\.crossattention\.attention\.(query|key|value)\.", r"layers.\1.\2."),
    (r"^encoder\.layers\.(\d+)\.crossattention\.output\.", r"layers.\1."),
    (r"^encoder\.layers\.(\d+)\.crossattention\.", r"layers.\1."),
    (r"^vit_eos$", "end_token"),
]
# Fixed sin-cos tables that the original stores as buffers and we compute.
ABSTRACTOR_COMPUTED = re.compile(r"\.attention\.(q|k)_pos_embed$")


def convert_abstractor_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original mPLUG-Owl2 abstractor state dict (keys relative to `visual_abstractor.`) in our names."""
    kept = {key: tensor for key, tensor in state_dict.items() if not ABSTRACTOR_COMPUTED.search(key)}
    return rename_keys(kept, ABSTRACTOR_KEY_RULES)


BLIP2_KEY_RULES = [
    (r"^vision_model\.", "model.vision_tower."),
    (r"^(query_tokens|qformer\.|language_projection\.)", r"model.multi_modal_projector.\1"),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
]


def from_blip2(model_or_path) -> MMLLMForConditionalGeneration:
    """Convert a BLIP-2 model with a decoder-only LM (transformers' `Blip2ForConditionalGeneration`, OPT).

    The result is our `qformer` projector over BLIP-2's ViT (post-LayerNorm on every token, CLS kept), with equal
    logits on the same inputs.
    """
    blip2 = _load(model_or_path, Blip2ForConditionalGeneration)
    source = blip2.config
    if not source.use_decoder_only_language_model:
        raise ValueError(
            f"from_blip2 converts BLIP-2 models with a decoder-only language model (OPT); this one uses "
            f"{source.text_config.model_type!r} (encoder-decoder), which mmllm does not support."
        )
    config = MMLLMConfig(
        vision_config=source.vision_config.to_dict(),
        text_config=source.text_config.to_dict(),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_feature_layernorm=True,
        projector_type="qformer",
        projector_config={"num_query_tokens": source.num_query_tokens, **source.qformer_config.to_diff_dict()},
        image_token_id=source.image_token_id,
        tie_word_embeddings=source.text_config.tie_word_embeddings,
        base_models=[source._name_or_path] if source._name_or_path else None,
    )
    model = MMLLMForConditionalGeneration(config).to(blip2.dtype)
    model.load_state_dict(rename_keys(blip2.state_dict(), BLIP2_KEY_RULES), strict=True)
    model.generation_config = blip2.generation_config
    return model.eval()


def from_llava(model_or_path) -> MMLLMForConditionalGeneration:
    """Convert a LLaVA model (transformers' `LlavaForConditionalGeneration`) into `MMLLMForConditionalGeneration`.

    Logits are equal on the same inputs (the LLaVA projector is our `mlp` projector of depth 2).
    """
    llava = _load(model_or_path, LlavaForConditionalGeneration)
    source = llava.config
    config = MMLLMConfig(
        vision_config=source.vision_config.to_dict(),
        text_config=source.text_config.to_dict(),
        vision_feature_layer=source.vision_feature_layer,
        vision_feature_select_strategy=source.vision_feature_select_strategy,
        projector_type="mlp",
        projector_depth=2,
        projector_hidden_act=source.projector_hidden_act,
        multimodal_projector_bias=source.multimodal_projector_bias,
        image_token_id=source.image_token_id,
        tie_word_embeddings=source.tie_word_embeddings,
        base_models=[source._name_or_path] if source._name_or_path else None,
    )
    model = MMLLMForConditionalGeneration(config).to(llava.dtype)
    model.load_state_dict(llava.state_dict(), strict=True)
    model.generation_config = llava.generation_config
    return model.eval()


__all__ = ["convert_abstractor_state_dict", "from_blip2", "from_llava", "rename_keys"]
