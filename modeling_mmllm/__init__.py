"""mmllm: multimodal LLMs of the survey's five-component taxonomy as one Hub-native transformers model family.

Importing the package registers `MMLLMConfig` with `AutoConfig` and stays light: the model and processor classes
are imported on first use of their names below. Their modules register them with `AutoModel`,
`AutoModelForImageTextToText`, `AutoModelForCausalLM` and `AutoProcessor` as they load (as transformers registers a
folder's remote classes once loaded), so from then on `AutoModel...` takes local configs without remote code.
"""

import importlib

from transformers import AutoConfig

from .configuration_mmllm import MMLLMConfig

__version__ = "0.2.0"  # the one place the version is written (pyproject.toml reads it)

# Public names imported on first use, and the hub module that defines each.
_LAZY = {
    "MMLLMForConditionalGeneration": "modeling_mmllm",
    "MMLLMModel": "modeling_mmllm",
    "MMLLMPreTrainedModel": "modeling_mmllm",
    "MMLLMProcessor": "processing_mmllm",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


AutoConfig.register("mmllm", MMLLMConfig, exist_ok=True)

__all__ = [
    "MMLLMConfig",
    "MMLLMForConditionalGeneration",
    "MMLLMModel",
    "MMLLMPreTrainedModel",
    "MMLLMProcessor",
]
