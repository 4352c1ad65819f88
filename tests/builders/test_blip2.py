"""from_blip2: transformers' BLIP-2 (OPT) -> our qformer projector with equal logits; the published size."""

import pytest
import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration

from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration
from modeling_mmllm.conversion import from_blip2

pytestmark = pytest.mark.hub

IMAGE_TOKEN, QUERIES = 5, 8


@pytest.fixture(scope="module")
def blip2() -> Blip2ForConditionalGeneration:
    config = Blip2Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        qformer_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            cross_attention_frequency=1,
        ),
        text_config=dict(
            model_type="opt",
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            vocab_size=512,
            max_position_embeddings=128,
            pad_token_id=0,
        ),
        num_query_tokens=QUERIES,
        image_token_id=IMAGE_TOKEN,
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # BLIP-2 initialises its ViT with std 1e-10: give it real weights
        for parameter in model.vision_model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def _inputs():
    span = [IMAGE_TOKEN] * QUERIES
    rows = [[*span, 2, 40, 41, 42], [0, 0, *span, 2, 50]]
    torch.manual_seed(3)
    return dict(
        input_ids=torch.tensor(rows),
        attention_mask=torch.tensor([[1] * 12, [0, 0] + [1] * 10]),
        pixel_values=torch.randn(2, 3, 32, 32),
    )


def test_logits_equal_blip2(blip2, tmp_path):
    inputs = _inputs()
    for source in (blip2, tmp_path):
        if source == tmp_path:
            blip2.save_pretrained(tmp_path)
        ours = from_blip2(source)
        assert ours.config.projector_type == "qformer" and ours.config.image_seq_length == QUERIES
        with torch.no_grad():
            expected, actual = blip2(**inputs).logits, ours(**inputs).logits
        mask = inputs["attention_mask"].bool()
        assert (actual[mask] - expected[mask]).abs().max() <= 1e-4
    kwargs = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert torch.equal(ours.generate(**inputs, **kwargs), blip2.generate(**inputs, **kwargs))


def test_blip2_opt_2_7b_parameter_count_matches_transformers():
    with torch.device("meta"):
        model = MMLLMForConditionalGeneration(MMLLMConfig.from_preset("blip2-opt-2.7b"))
    assert model.num_parameters() == 3_744_679_936
