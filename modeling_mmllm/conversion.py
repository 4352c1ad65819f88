"""Import existing checkpoints into the mmllm family (library side).

`from_llava` takes a transformers `LlavaForConditionalGeneration` (object or saved folder). Its parameter names
are ours (`model.vision_tower`, `model.multi_modal_projector.linear_{1,2}`, `model.language_model`, `lm_head`),
so the conversion is a config translation plus a strict state-dict load: any unmatched key is an error.
"""

from pathlib import Path

from torch import nn
from transformers import LlavaForConditionalGeneration

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


__all__ = ["from_llava"]
