"""Quantized models save (issue 22, point 8): `--quantization int8` (torchao's int8 weight-only, through
transformers' TorchAoConfig) saves and reloads to the same logits; torch's dynamic quantization, which safetensors
cannot store, is refused with the fix named before anything is written."""

import copy
import warnings

import pytest
import torch

from modeling_mmllm import MMLLMForConditionalGeneration
from modeling_mmllm.saving import save_model_folder

PROMPT = "What colour is the sea?"


def _logits(model, processor) -> torch.Tensor:
    inputs = processor.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


def test_an_int8_model_saves_and_reloads(saved_folder, tmp_path):
    pytest.importorskip("torchao")
    from modeling_mmllm.serving.quantization import load_for_inference

    model, processor = load_for_inference(saved_folder, "int8")
    folder = save_model_folder(model, processor, tmp_path / "int8")
    assert (folder / "model.safetensors").stat().st_size < (saved_folder / "model.safetensors").stat().st_size
    reloaded, reloaded_processor = load_for_inference(folder)  # the folder's config carries the quantization
    assert reloaded.config.quantization_config.quant_method == "torchao"
    assert torch.equal(_logits(reloaded, reloaded_processor), _logits(model, processor))


def _dynamically_quantized(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates its eager quantization (for torchao)
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


@pytest.mark.parametrize("api", ["save_pretrained", "save_model_folder"])
def test_a_dynamically_quantized_model_is_refused_before_writing(tiny_model, processor, tmp_path, api):
    quantized = _dynamically_quantized(tiny_model)
    assert isinstance(quantized, MMLLMForConditionalGeneration)
    target = tmp_path / "model"
    with pytest.raises(
        ValueError, match=r"quantized weights.*quantize_dynamic.*Save the unquantized model.*--quantization int8"
    ):
        if api == "save_pretrained":
            quantized.save_pretrained(target)
        else:
            save_model_folder(quantized, processor, target)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a staging folder
