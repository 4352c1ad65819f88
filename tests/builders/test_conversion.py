"""from_llava: transformers' LLaVA -> mmllm with equal logits."""

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from helpers import tiny_text_config, tiny_vision_config
from modeling_mmllm import MMLLMForConditionalGeneration
from modeling_mmllm.conversion import from_llava

pytestmark = pytest.mark.hub

IMAGE_TOKEN = 5


def _tiny_llava(feature_layer, strategy, seed=0) -> LlavaForConditionalGeneration:
    config = LlavaConfig(
        vision_config=tiny_vision_config("clip").to_dict(),
        text_config=tiny_text_config("llama").to_dict(),
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=16 + (strategy == "full"),
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def _inputs(tokens_per_image: int):
    """Two rows, left padding in row 1, two images in row 0 and one in row 1."""
    span = [IMAGE_TOKEN] * tokens_per_image
    row0 = [20, 21, *span, 22, *span, 23, 24]
    row1 = [30, *span, 31, 32, 33]
    width = max(len(row0), len(row1))
    pad = lambda row: [0] * (width - len(row)) + row  # noqa: E731
    input_ids = torch.tensor([pad(row0), pad(row1)])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in (row0, row1)])
    torch.manual_seed(7)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=torch.randn(3, 3, 32, 32))


@pytest.mark.parametrize("feature_layer", [-2, -1, 1, [-3, -1]])
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_logits_equal_llava(feature_layer, strategy):
    llava = _tiny_llava(feature_layer, strategy)
    ours = from_llava(llava)
    inputs = _inputs(16 + (strategy == "full"))
    with torch.no_grad():
        expected = llava(**inputs).logits
        actual = ours(**inputs).logits
    mask = inputs["attention_mask"].bool()
    assert (actual[mask] - expected[mask]).abs().max() <= 1e-4


def test_from_saved_folder_and_generation(tmp_path):
    llava = _tiny_llava(-2, "default")
    llava.save_pretrained(tmp_path)
    ours = from_llava(tmp_path)
    assert isinstance(ours, MMLLMForConditionalGeneration)
    inputs = _inputs(16)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours.generate(**inputs, **kwargs), llava.generate(**inputs, **kwargs))


def test_wrong_input_type_is_a_clear_error():
    with pytest.raises(TypeError, match="Expected a LlavaForConditionalGeneration"):
        from_llava(42)
