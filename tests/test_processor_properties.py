"""Property tests of MMLLMProcessor (issue 21): for random images (sizes, PIL modes, array dtypes), random text with
random placeholder counts (surrogates included) and random audio (lengths, rates, channels), the processor either
returns inputs whose placeholder count is exactly the number of features the tiny model computes, or raises a
ValueError: never another exception, never a silent mismatch."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from helpers import seeded_model
from modeling_mmllm import MMLLMConfig, MMLLMProcessor

pytestmark = pytest.mark.hub

SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}
MODES = ["RGB", "L", "RGBA", "I;16", "P", "CMYK"]
UNICODE = st.text(st.characters(exclude_categories=()), max_size=12)  # surrogates (category Cs) included


@pytest.fixture(scope="module")
def audio_pair():
    return MMLLMProcessor.from_preset("audio-tiny"), seeded_model(MMLLMConfig.from_preset("audio-tiny")).eval()


@st.composite
def images(draw):
    """A PIL image of a random mode, or a uint8 / float32-in-[0, 1] `[H, W, 3]` array, 1..300 px each side."""
    width, height = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    kind = draw(st.sampled_from([*MODES, "uint8", "float32"]))
    values = np.random.default_rng(draw(st.integers(0, 2**16))).random((height, width, 3))
    if kind == "uint8":
        return (values * 255).astype(np.uint8)
    if kind == "float32":
        return values.astype(np.float32)
    if kind == "I;16":
        return Image.fromarray((values[..., 0] * 65535).astype(np.uint16), mode="I;16")
    return Image.fromarray((values * 255).astype(np.uint8), "RGB").convert(kind)


@st.composite
def prompts(draw, token: str):
    """Random unicode with 0..3 placeholders at random positions; returns the text and its placeholder count."""
    count = draw(st.integers(0, 3))
    pieces = draw(st.lists(UNICODE, min_size=count + 1, max_size=count + 1))
    return token.join(pieces), count


@st.composite
def image_batches(draw):
    """1..3 samples; each sample's image count equals its placeholders, except now and then (a mismatch)."""
    texts, items = [], []
    for _ in range(draw(st.integers(1, 3))):
        text, count = draw(prompts("<image>"))
        count = draw(st.integers(0, 3)) if draw(st.integers(0, 5)) == 0 else count
        texts.append(text)
        items += draw(st.lists(images(), min_size=count, max_size=count))
    return texts, items


def processed_or_refused(processor, **inputs):
    """The processor's padded tensors for `inputs`, or None where it refused them with a ValueError (the one
    exception it may raise; the message is recorded as a hypothesis event)."""
    try:
        return processor(**inputs, padding=True, return_tensors="pt")
    except ValueError as error:
        event(f"ValueError: {str(error)[:40]}")
        return None


def placeholders_match_features(inputs, token_id: int, features: torch.Tensor | None) -> None:
    """The placeholder count is the feature count, and mm_token_type_ids marks exactly the placeholders."""
    is_token = inputs["input_ids"] == token_id
    n_features = 0 if features is None else features.numel() // features.shape[-1]
    assert int(is_token.sum()) == n_features
    assert torch.equal(inputs["mm_token_type_ids"].bool() & inputs["attention_mask"].bool(), is_token)


@settings(max_examples=60, **SETTINGS)
@given(batch=image_batches())
def test_images_and_text_give_matching_counts_or_a_value_error(processor, tiny_model, batch):
    texts, items = batch
    if (inputs := processed_or_refused(processor, images=items or None, text=texts)) is None:
        return
    features = None
    if items:
        with torch.no_grad():
            features = tiny_model.model.get_image_features(inputs["pixel_values"]).pooler_output
    placeholders_match_features(inputs, processor.image_token_id, features)
    assert len(items) * processor.image_seq_length == (0 if features is None else features.shape[0] * features.shape[1])


@settings(max_examples=100, **SETTINGS)
@given(texts=st.lists(UNICODE | st.binary(max_size=8) | st.none() | st.integers(), min_size=1, max_size=3))
def test_any_text_is_tokenized_or_a_value_error(processor, texts):
    """Random str (lone surrogates too), bytes, None and ints: tokenized, or refused with a ValueError."""
    if (inputs := processed_or_refused(processor, text=texts)) is None:
        return
    assert all(isinstance(text, str) for text in texts) and inputs["input_ids"].shape[0] == len(texts)
    assert not inputs["mm_token_type_ids"].any()


@st.composite
def audio_batches(draw):
    """1..2 samples of 0..2 clips each, 0..3 s at 8000..48000 Hz, mono or stereo `[samples, 2]`."""
    texts, clips = [], []
    for _ in range(draw(st.integers(1, 2))):
        count = draw(st.integers(0, 2))
        texts.append("say " + "<audio> " * count)
        for _ in range(count):
            rate = draw(st.integers(8000, 48000))
            samples = int(draw(st.floats(0, 3)) * rate)
            shape = (samples, 2) if draw(st.booleans()) else (samples,)
            clip = np.random.default_rng(draw(st.integers(0, 2**16))).normal(0, 0.1, shape).astype(np.float32)
            clips.append({"array": clip, "sampling_rate": rate})
    return texts, clips


@settings(max_examples=30, **SETTINGS)
@given(batch=audio_batches())
def test_audio_gives_matching_counts_or_a_value_error(audio_pair, batch):
    processor, model = audio_pair
    texts, clips = batch
    if (inputs := processed_or_refused(processor, audio=clips or None, text=texts)) is None:
        return
    features = None
    if clips:
        with torch.no_grad():
            features = model.model.get_audio_features(inputs["input_features"], inputs["input_features_mask"])
        features = features.pooler_output
    placeholders_match_features(inputs, processor.audio_token_id, features)
    assert all(len(clip["array"]) for clip in clips)  # an empty clip is refused, never a zero-token item
