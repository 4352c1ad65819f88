"""mmllm: multimodal LLMs of the survey's five-component taxonomy as one Hub-native transformers model family.

Importing the package registers `MMLLMConfig` with `AutoConfig`; the model and processor classes are imported on
first use (a name below, or the first `MMLLMConfig` made), and then registered with `AutoModel`,
`AutoModelForImageTextToText`, `AutoModelForCausalLM` and `AutoProcessor`, so `AutoModel...` works on local configs
without remote code while importing the config stays light (no modeling code).
"""

import importlib

from transformers import AutoConfig

from .configuration_mmllm import ON_FIRST_CONFIG, MMLLMConfig

__version__ = "0.2.0"  # the one place the version is written (pyproject.toml reads it)

# Public names imported on first use, and the hub module that defines each.
_LAZY = {
    "MMLLMForConditionalGeneration": "modeling_mmllm",
    "MMLLMModel": "modeling_mmllm",
    "MMLLMPreTrainedModel": "modeling_mmllm",
    "MMLLMProcessor": "processing_mmllm",
}


def register_auto_classes() -> None:
    """Register the model and processor classes with transformers' Auto classes (imports the modeling code)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    from .modeling_mmllm import MMLLMForConditionalGeneration, MMLLMModel
    from .processing_mmllm import MMLLMProcessor

    AutoModel.register(MMLLMConfig, MMLLMModel, exist_ok=True)
    AutoModelForImageTextToText.register(MMLLMConfig, MMLLMForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(MMLLMConfig, MMLLMForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(MMLLMConfig, MMLLMProcessor, exist_ok=True)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    register_auto_classes()
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


AutoConfig.register("mmllm", MMLLMConfig, exist_ok=True)
ON_FIRST_CONFIG.append(register_auto_classes)

__all__ = [
    "MMLLMConfig",
    "MMLLMForConditionalGeneration",
    "MMLLMModel",
    "MMLLMPreTrainedModel",
    "MMLLMProcessor",
]
