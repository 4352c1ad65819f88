"""MMLLMProcessor: placeholder expansion, modality ids, left padding, chat template, clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from modeling_mmllm import MMLLMProcessor
from modeling_mmllm.builders.presets import _offline_tokenizer_json

pytestmark = pytest.mark.hub


def test_expands_each_image_to_image_seq_length(processor, images):
    out = processor(images=images[:2], text=["<image> and <image> differ"], return_tensors="pt")
    ids = out["input_ids"][0]
    assert (ids == processor.image_token_id).sum() == 2 * 16
    assert out["mm_token_type_ids"][0].tolist() == [int(i == processor.image_token_id) for i in ids.tolist()]
    assert out["pixel_values"].shape == (2, 3, 32, 32)


def test_batch_pads_on_the_left(processor):
    out = processor(text=["short", "a much longer prompt than the first"], padding=True, return_tensors="pt")
    assert out["attention_mask"][0, 0] == 0 and out["attention_mask"][0, -1] == 1
    assert out["input_ids"][0, 0] == processor.tokenizer.pad_token_id


def test_offline_tokenizer_is_deterministic_and_has_the_special_tokens(processor):
    assert _offline_tokenizer_json.__wrapped__() == _offline_tokenizer_json.__wrapped__()
    tokenizer = processor.tokenizer
    assert (tokenizer.image_token, tokenizer.video_token, tokenizer.audio_token) == ("<image>", "<video>", "<audio>")
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|end|>"
    for token in ("<|user|>", "<|assistant|>", "<|system|>", "<image>"):
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_string_and_typed_parts_and_assistant_mask(processor):
    parts = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    plain = [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}]
    text = processor.apply_chat_template(parts)
    assert (
        text == processor.apply_chat_template(plain) == "<|user|>\n<image>Colour?<|end|>\n<|assistant|>\nred<|end|>\n"
    )
    prompt = processor.apply_chat_template(parts[:1], add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    encoded = processor.tokenizer.apply_chat_template(
        plain, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert processor.tokenizer.decode(masked) == "red<|end|>"


def test_save_and_load_round_trip(tmp_path, processor, images):
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert reloaded.image_seq_length == 16 and reloaded.tokenizer.padding_side == "left"
    a = processor(images=images[:1], text=["<image>x"], return_tensors="np")
    b = reloaded(images=images[:1], text=["<image>x"], return_tensors="np")
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"images": "images:2", "text": ["<image> only one placeholder"]}, "Got 2 image item\\(s\\) but 1 <image>"),
        ({"images": "images:1", "text": ["<image><image> two placeholders"]}, "Got 1 image item\\(s\\) but 2 <image>"),
        (
            {"images": "images:1", "text": ["no placeholder at all"]},
            "Got 1 image item\\(s\\) but 0 <image>.*Nothing is inserted",
        ),
        ({"text": ["<image> but no image"]}, "Got 0 image item\\(s\\) but 1 <image>"),
        ({"images": [42], "text": ["<image>"]}, "Image 0 is of type int, not an image"),
        ({"text": ["   "]}, "Empty prompt"),
        (
            {"images": "images:1", "text": ["hello <image>"], "truncation": True, "max_length": 8},
            "Please disable truncation or increase `max_length`",
        ),
    ],
)
def test_bad_input_is_a_value_error_naming_the_fix(processor, images, kwargs, message):
    if isinstance(kwargs.get("images"), str):
        kwargs = {**kwargs, "images": images[: int(kwargs["images"].split(":")[1])]}
    with pytest.raises(ValueError, match=message):
        processor(**kwargs)


def test_tokenizer_without_image_token_is_refused(processor):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_offline_tokenizer_json()))
    with pytest.raises(ValueError, match="no image token"):
        MMLLMProcessor(image_processor=processor.image_processor, tokenizer=plain)


def test_pad_to_square_keeps_the_whole_image():
    processor = MMLLMProcessor.from_preset("owl2-tiny")
    assert processor.pad_to_square
    from PIL import Image

    wide = Image.new("RGB", (64, 16), (255, 0, 0))  # a red bar: padded, not cropped
    pixels = processor(images=[wide], text=["<image>"], return_tensors="pt")["pixel_values"][0]
    mean = torch.tensor(processor.image_processor.image_mean)
    std = torch.tensor(processor.image_processor.image_std)
    rgb = pixels * std[:, None, None] + mean[:, None, None]
    assert rgb[0, 16, :].mean() > 0.95  # the middle row is the red bar
    torch.testing.assert_close(rgb[:, 0, 16], mean, atol=0.02, rtol=0)  # top row is the mean-colour padding
    assert processor(images=[wide], text=["<image>"], return_tensors="pt")["input_ids"].shape[1] == 9


@pytest.mark.parametrize("preset", ["llava-tiny", "llava-next-tiny", "owl2-anyres-tiny", "flamingo-tiny"])
def test_num_multimodal_tokens_equal_what_the_processor_expands(preset):
    """transformers' `_get_num_multimodal_tokens(image_sizes=...)` (vLLM's Transformers backend lays out prompts
    with it): one count per `(height, width)`, each what `<image>` becomes for an image of that size."""
    processor = MMLLMProcessor.from_preset(preset)
    sizes = [(32, 32), (40, 90), (90, 40), (64, 64), (20, 150)]
    data = processor._get_num_multimodal_tokens(image_sizes=sizes)
    image_id = processor.image_token_id
    batches = [processor(text=["<image>"], images=[Image.new("RGB", (w, h))], return_tensors="pt") for h, w in sizes]
    expanded = [int((batch["input_ids"][0] == image_id).sum()) for batch in batches]
    assert data.num_image_tokens == expanded and data.num_image_patches == [1] * len(sizes)
    assert "num_image_tokens" in data and "num_video_tokens" not in processor._get_num_multimodal_tokens()
