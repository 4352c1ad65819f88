"""Issue 21, processor side: bad input is a clear ValueError naming the item and the fix; odd but valid images
(16-bit, float, grayscale arrays, alpha) reach the encoder with the right values."""

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_mmllm import MMLLMConfig, MMLLMProcessor

pytestmark = pytest.mark.hub


@pytest.fixture(scope="module")
def audio_processor() -> MMLLMProcessor:
    return MMLLMProcessor.from_preset("audio-tiny")


def pixels(processor, image) -> torch.Tensor:
    return processor(images=[image], text=["<image>"], return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_audio_with_nan_or_inf_samples_is_refused_naming_the_clip(audio_processor, bad):
    good, clip = np.zeros(8000, np.float32), np.zeros(8000, np.float32)
    clip[100] = bad
    with pytest.raises(ValueError, match="Audio item 1 has .*(NaN|infinite)"):
        audio_processor(text=["<audio><audio>"], audio=[good, clip], sampling_rate=16000)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("I;16", (32, 32), 32768),
        Image.new("I;16", (32, 32), 32768).convert("I"),
        Image.new("F", (32, 32), 0.5),
        Image.new("L", (32, 32), 128),
        np.full((32, 32), 128, np.uint8),
        np.full((32, 32, 3), 0.5, np.float32),
        torch.full((1, 32, 32), 128, dtype=torch.uint8),
    ],
    ids=["I;16", "I", "F", "L", "2-D array", "float array", "1-channel tensor"],
)
def test_grey_in_any_depth_or_layout_is_the_8_bit_grey(processor, image):
    """A mid-grey 16-bit / float / grayscale image is what the 8-bit grey (128) RGB image is, within rounding."""
    torch.testing.assert_close(pixels(processor, image), pixels(processor, Image.new("RGB", (32, 32), (128,) * 3)))


def test_out_of_range_float_image_is_refused(processor):
    with pytest.raises(ValueError, match="Image 0 is a mode F image with values in .*outside \\[0, 1.0\\]"):
        processor(images=[Image.new("F", (32, 32), 300.0)], text=["<image>"])


@pytest.mark.parametrize("layout", ["HWC", "CHW", "PIL"])
def test_alpha_is_composited_on_white(processor, layout):
    """RGBA (arrays too, channels last or first): alpha composited on white, as transformers does for RGBA PIL."""
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128  # half-transparent red
    image = {"HWC": rgba, "CHW": rgba.transpose(2, 0, 1), "PIL": Image.fromarray(rgba, "RGBA")}[layout]
    expected = Image.new("RGB", (32, 32), (255, 127, 127))
    torch.testing.assert_close(pixels(processor, image), pixels(processor, expected), atol=0.02, rtol=0)


def test_gray_alpha_array_is_taken_as_gray_plus_alpha(processor):
    gray_alpha = np.stack([np.full((32, 32), 128, np.uint8), np.full((32, 32), 255, np.uint8)], axis=-1)
    torch.testing.assert_close(pixels(processor, gray_alpha), pixels(processor, Image.new("RGB", (32, 32), (128,) * 3)))


@pytest.mark.parametrize(
    "text, message",
    [
        ([b"<image> hi"], "Text 0 is bytes, not a str: decode it first"),
        (b"hello", "Text 0 is bytes"),
        (["fine", "caf\udce9"], "Text 1 is not valid Unicode \\(lone surrogate"),
        (["fine", 3], "Text 1 is of type int, not a str"),
        ([None], "Text 0 is of type NoneType, not a str"),
        (42, "text is of type int: pass a string or a list of strings"),
    ],
)
def test_text_that_is_not_valid_unicode_str_is_refused_naming_it(processor, text, message):
    with pytest.raises(ValueError, match=message):
        processor(text=text)


def test_a_processor_that_does_not_match_the_config_is_refused(processor):
    config = MMLLMConfig.from_preset("llava-tiny")
    processor.check_config(config)
    edited = MMLLMProcessor.from_preset("llava-tiny")
    edited.image_seq_length += 1  # a hand-edited processor_config.json
    with pytest.raises(ValueError, match="image_seq_length=17 does not match the model config's 16"):
        edited.check_config(config)


def test_the_model_refuses_a_placeholder_count_it_does_not_project(tiny_model):
    """The model side already checks: one placeholder too many is a ValueError in generate, not garbage."""
    edited = MMLLMProcessor.from_preset("llava-tiny")
    edited.image_seq_length += 1
    inputs = edited(images=[Image.new("RGB", (32, 32))], text=["<image>hi"], return_tensors="pt")
    with pytest.raises(ValueError, match="17 image tokens in the input, 16 image features"):
        tiny_model.generate(**inputs, max_new_tokens=2)


def test_audio_and_video_processors_check_their_own_fields():
    for preset, name in (("audio-tiny", "audio_pool_stride"), ("video-tiny", "video_temporal_pool")):
        processor, config = MMLLMProcessor.from_preset(preset), MMLLMConfig.from_preset(preset)
        processor.check_config(config)
        setattr(processor, name, getattr(processor, name) * 2)
        with pytest.raises(ValueError, match=f"processor's {name}="):
            processor.check_config(config)


def test_empty_stereo_audio_is_refused_as_empty(audio_processor):
    """Found by the property tests: an empty `[0, 2]` clip was averaged into two NaN samples."""
    with pytest.raises(ValueError, match="Audio item 0 is empty"):
        audio_processor(text=["<audio>"], audio=[np.zeros((0, 2), np.float32)], sampling_rate=16000)
