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


def test_pixel_shuffle_equals_idefics3s_connector():
    """`pixel_shuffle` with one linear layer without bias is transformers' `Idefics3Connector` (SmolVLM's too):
    the same weight gives the same tokens, so Idefics3 checkpoints' connectors apply unchanged."""
    from transformers import Idefics3Config
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    config = MMLLMConfig.from_preset("pixel-shuffle-tiny")
    reference_config = Idefics3Config(
        vision_config={"hidden_size": 32}, text_config={"model_type": "llama", "hidden_size": 64}, scale_factor=2
    )
    reference = Idefics3Connector(reference_config)
    projector = build_input_projector(config)
    projector.linear_1.load_state_dict(reference.modality_projection.proj.state_dict())
    features = torch.randn(3, 16, 32)  # a 4 x 4 patch grid
    with torch.no_grad():
        torch.testing.assert_close(projector(features), reference(features), atol=0, rtol=0)
    assert config.image_seq_length == 4 and projector(features).shape == (3, 4, 64)


def test_pixel_shuffle_refuses_a_grid_its_scale_does_not_divide():
    with pytest.raises(ValueError, match=r"scale_factor=3 needs a square grid of patches whose side it divides"):
        MMLLMConfig.from_preset("pixel-shuffle-tiny", projector_config={"scale_factor": 3})
    with pytest.raises(ValueError, match="the encoder gives 17 tokens per image"):  # CLS kept: not a square
        MMLLMConfig.from_preset("pixel-shuffle-tiny", vision_feature_select_strategy="full")


def test_registry_lists_the_types():
    assert {"linear", "mlp", "pixel_shuffle", "abstractor", "qformer", "resampler"} <= set(PROJECTORS)


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


class PooledProjector(nn.Module):
    """A projector type a user adds: the mean of the patches, as 2 tokens of the LLM's width."""

    def __init__(self, config):
        super().__init__()
        self.proj = nn.Linear(config.vision_config.hidden_size, 2 * config.text_config.hidden_size)

    def forward(self, features):
        return self.proj(features.mean(1, keepdim=True)).unflatten(-1, (2, -1)).flatten(1, 2)


def test_adding_a_projector_is_its_module_and_its_settings_entry(monkeypatch):
    """The CONTRIBUTING walk-through: a module in `PROJECTORS` and an `InputProjectorSpec` in `INPUT_PROJECTORS` are
    all a new type needs; the config, the model and the processor take it (2 soft tokens per image)."""
    from helpers import make_images
    from modeling_mmllm import MMLLMForConditionalGeneration, MMLLMProcessor
    from modeling_mmllm.component_settings import INPUT_PROJECTORS, InputProjectorSpec

    monkeypatch.setitem(PROJECTORS, "pooled", PooledProjector)
    monkeypatch.setitem(INPUT_PROJECTORS, "pooled", InputProjectorSpec({}, lambda config, settings: 2))
    config = MMLLMConfig.from_preset("llava-tiny", projector_type="pooled")
    assert config.image_seq_length == 2
    model = MMLLMForConditionalGeneration(config).eval()
    processor = MMLLMProcessor.from_preset("llava-tiny")
    processor.image_seq_length = config.image_seq_length
    inputs = processor(images=make_images(1), text="<image> what is it?", return_tensors="pt")
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == 2
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.image_hidden_states.shape == (1, 2, config.text_config.hidden_size)
