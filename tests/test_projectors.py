"""Input projectors of the registry: shapes, depth, activation, gradients."""

import pytest
import torch
from torch import nn

from modeling_mmllm import MMLLMConfig
from modeling_mmllm.input_projector import PROJECTORS, build_input_projector

pytestmark = pytest.mark.hub


@pytest.mark.parametrize("projector_type, depth", [("linear", 1), ("mlp", 2), ("mlp", 3)])
def test_projector_shapes_and_gradients(projector_type, depth):
    config = MMLLMConfig.from_preset("llava-tiny", projector_type=projector_type, projector_depth=depth)
    projector = build_input_projector(config)
    assert sum(isinstance(m, nn.Linear) for m in projector.modules()) == depth
    features = torch.randn(3, 16, 32, requires_grad=True)
    tokens = projector(features)
    assert tokens.shape == (3, 16, 64)
    tokens.square().mean().backward()
    assert features.grad.abs().sum() > 0
    assert all(p.grad is not None for p in projector.parameters())


def test_mlp_is_llava_projector_with_configurable_activation():
    config = MMLLMConfig.from_preset("llava-tiny", projector_hidden_act="relu", multimodal_projector_bias=False)
    projector = build_input_projector(config)
    assert [name for name, _ in projector.named_parameters()] == ["linear_1.weight", "linear_2.weight"]
    x = torch.randn(1, 4, 32)
    expected = projector.linear_2(torch.relu(projector.linear_1(x)))
    torch.testing.assert_close(projector(x), expected)


def test_multiple_feature_layers_widen_the_input():
    config = MMLLMConfig.from_preset("llava-tiny", vision_feature_layer=[-3, -1])
    assert build_input_projector(config).linear_1.in_features == 64


def test_registry_lists_the_types():
    assert {"linear", "mlp"} <= set(PROJECTORS)


def test_every_component_type_has_its_settings_entry():
    """The torch-free settings layer (what the config checks) and the component registries name the same types."""
    from modeling_mmllm.component_settings import (
        GENERATOR_DEFAULTS,
        INPUT_PROJECTOR_DEFAULTS,
        OUTPUT_PROJECTOR_DEFAULTS,
    )
    from modeling_mmllm.modality_generator import GENERATORS
    from modeling_mmllm.output_projector import OUTPUT_PROJECTORS

    assert set(PROJECTORS) == set(INPUT_PROJECTOR_DEFAULTS)
    assert set(OUTPUT_PROJECTORS) == set(OUTPUT_PROJECTOR_DEFAULTS)
    assert set(GENERATORS) == set(GENERATOR_DEFAULTS)
