"""mmllm: multimodal LLMs of the survey's five-component taxonomy as one Hub-native transformers model family.

Importing the package registers the classes with transformers' Auto classes (so `AutoModel...` works on local
configs without remote code) and marks them for `trust_remote_code` export on `save_pretrained`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_mmllm import MMLLMConfig
from .modeling_mmllm import MMLLMForConditionalGeneration, MMLLMModel, MMLLMPreTrainedModel
from .processing_mmllm import MMLLMProcessor

AutoConfig.register("mmllm", MMLLMConfig, exist_ok=True)
AutoModel.register(MMLLMConfig, MMLLMModel, exist_ok=True)
AutoModelForImageTextToText.register(MMLLMConfig, MMLLMForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(MMLLMConfig, MMLLMForConditionalGeneration, exist_ok=True)
AutoProcessor.register(MMLLMConfig, MMLLMProcessor, exist_ok=True)

__version__ = "0.2.0"  # the one place the version is written (pyproject.toml reads it)

__all__ = [
    "MMLLMConfig",
    "MMLLMForConditionalGeneration",
    "MMLLMModel",
    "MMLLMPreTrainedModel",
    "MMLLMProcessor",
]
