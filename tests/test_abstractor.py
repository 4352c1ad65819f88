"""The visual abstractor equals mPLUG-Owl2's original (fixture computed by the original code)."""

import pytest
import torch
from safetensors.torch import load_file

from helpers import FIXTURES
from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration
from modeling_mmllm.conversion import convert_abstractor_state_dict
from modeling_mmllm.input_projector import sincos_1d, sincos_2d

pytestmark = pytest.mark.hub

FIXTURE = FIXTURES / "mplug-owl2-tiny"
PREFIX = "model.visual_abstractor."


def _abstractor_weights() -> dict[str, torch.Tensor]:
    weights = load_file(FIXTURE / "model.safetensors")
    return {k[len(PREFIX) :]: v for k, v in weights.items() if k.startswith(PREFIX)}


def test_position_tables_equal_the_original_buffers():
    original = _abstractor_weights()
    q_table = original["encoder.layers.0.crossattention.attention.q_pos_embed"]
    k_table = original["encoder.layers.0.crossattention.attention.k_pos_embed"]
    torch.testing.assert_close(sincos_1d(48, torch.arange(8)), q_table, atol=1e-6, rtol=0)
    torch.testing.assert_close(sincos_2d(48, 17), k_table, atol=1e-6, rtol=0)


def test_abstractor_reproduces_the_original_image_features():
    model = MMLLMForConditionalGeneration(MMLLMConfig.from_preset("owl2-tiny")).eval()
    projector = model.model.multi_modal_projector
    projector.load_state_dict(convert_abstractor_state_dict(_abstractor_weights()), strict=True)
    expected = load_file(FIXTURE / "expected.safetensors")
    with torch.no_grad():
        features = projector(expected["vision_last_hidden_state"])
    assert features.shape == (2, 9, 64)
    assert (features - expected["image_features"]).abs().max() <= 1e-4
