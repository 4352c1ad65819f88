"""One context limit (`backbone_context`): `generate`, the processor, `mmllm chat` and the demo (their shared
`ChatSession`), and the server read the same source, so they agree on a backbone with a fixed context and on one
with dynamic RoPE (no fixed limit)."""

import pytest
import torch

from helpers import make_images
from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration, MMLLMProcessor
from modeling_mmllm.builders.presets import load_processor_preset
from modeling_mmllm.configuration_mmllm import backbone_context
from modeling_mmllm.serving.chat_session import ChatSession
from modeling_mmllm.serving.context import new_token_budget

CONTEXT = 48  # the tiny backbone's max_position_embeddings here; a prompt of a few images and words runs past it
DYNAMIC = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}


def _model(dynamic: bool):
    text = {"max_position_embeddings": CONTEXT, **({"rope_parameters": DYNAMIC} if dynamic else {})}
    config = MMLLMConfig.from_preset("llava-tiny", text_config={**_tiny_text(), **text})
    torch.manual_seed(0)
    model = MMLLMForConditionalGeneration(config).eval()
    return model, load_processor_preset(MMLLMProcessor, "llava-tiny", config)


def _tiny_text() -> dict:
    from modeling_mmllm.builders.presets import read_preset

    return read_preset("llava-tiny")["text_config"]


def _long_chat(images: int = 3) -> ChatSession:
    """A conversation (`mmllm chat`'s and the demo's) whose one message runs past the fixed context."""
    return ChatSession().with_user_turn("describe these", [("image", image) for image in make_images(images)])


@pytest.mark.parametrize("dynamic", [False, True], ids=["fixed", "dynamic-rope"])
def test_every_reader_of_the_context_agrees(dynamic):
    model, processor = _model(dynamic)
    limit = backbone_context(model.config)
    assert limit == (None if dynamic else CONTEXT)
    assert processor.context_length == limit  # the processor built for this config

    if dynamic:  # no fixed limit: nothing is refused, cut or dropped
        for drop_oldest in (True, False):  # the chat's policy, and the demo's
            kept, inputs, room, dropped = _long_chat().fit(processor, model.config, 8, drop_oldest=drop_oldest)
            length = inputs["input_ids"].shape[1]
            assert length > CONTEXT and (len(kept.exchanges), room, dropped) == (1, 8, 0)
        assert new_token_budget(model.config, length, 8) == 8  # the server and the demo
        output = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert output.shape[1] == length + 8  # generate does not cut either
    else:  # the same limit everywhere: a prompt past it is refused by each reader
        for drop_oldest in (True, False):
            with pytest.raises(ValueError, match=f"context is {CONTEXT}"):
                _long_chat().fit(processor, model.config, 8, drop_oldest=drop_oldest)
        inputs = processor(images=make_images(3), text=["<image><image><image> describe"], return_tensors="pt")
        length = inputs["input_ids"].shape[1]
        assert length > CONTEXT
        with pytest.raises(ValueError, match=f"context is {CONTEXT}"):
            new_token_budget(model.config, length, 8)
        with pytest.raises(ValueError, match=f"is {CONTEXT}: no room"):
            model.generate(**inputs, max_new_tokens=8)
        assert new_token_budget(model.config, CONTEXT - 3, 8) == 3  # and the room left is the same number
