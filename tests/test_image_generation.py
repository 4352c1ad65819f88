"""The output side (NExT-GPT): config validation, output projectors, signal tokens, `generate(generation_mode=
"image")`, the chat template's assistant images, post-processing to PIL, saving, auto_map and the model card."""

import json

import jinja2
import numpy as np
import pytest
import torch
from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList

from helpers import make_images, seeded_model
from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration, MMLLMProcessor
from modeling_mmllm.export.hub_card import _component_rows, render_model_card
from modeling_mmllm.output_projector import OUTPUT_PROJECTORS, build_output_projector
from modeling_mmllm.saving import save_model_folder

pytestmark = pytest.mark.hub

SIGNAL = [512, 513, 514, 515]  # <gen_img_0..3> of the any2any-tiny preset
GREEDY = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}


@pytest.fixture(scope="module")
def model():
    return seeded_model(MMLLMConfig.from_preset("any2any-tiny"))


@pytest.fixture(scope="module")
def a2a_processor():
    return MMLLMProcessor.from_preset("any2any-tiny")


def _prompt(processor, question: str, image: bool = False, history: list | None = None) -> str:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template(
        [*(history or []), {"role": "user", "content": content}], add_generation_prompt=True
    )


class ForceTokens(LogitsProcessor):
    """Make chosen rows emit given tokens from the first new step on (the tiny model is untrained)."""

    def __init__(self, prompt_length: int, plan: dict[int, list[int]]):
        self.prompt_length, self.plan = prompt_length, plan

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        for row, tokens in self.plan.items():
            if step < len(tokens):
                scores[row] = float("-inf")
                scores[row, tokens[step]] = 0
        return scores


def _generate_images(model, inputs, plan=None, **kwargs) -> torch.Tensor:
    force = LogitsProcessorList([ForceTokens(inputs["input_ids"].shape[1], plan or {})])
    return model.generate(**inputs, **GREEDY, logits_processor=force, generation_mode="image", **kwargs)


@torch.no_grad()
def _image_from(model, ids: list[int], pixel_values=None) -> torch.Tensor:
    """By hand: the hidden states at the last k tokens of `ids` -> output projector -> generator."""
    media = {} if pixel_values is None else {"pixel_values": pixel_values}
    hidden = model.model(input_ids=torch.tensor([ids]), **media).last_hidden_state
    return model.model.modality_generator.generate(model.model.output_projector(hidden[:, -len(SIGNAL) :]))


# Config validation.


@pytest.mark.parametrize("missing", ["output_projector_type", "signal_token_ids", "modality_generator"])
def test_the_three_parts_come_together(missing):
    with pytest.raises(ValueError, match=f"together; {missing} missing"):
        MMLLMConfig.from_preset("any2any-tiny", **{missing: None})
    with pytest.raises(ValueError, match="enable_image_generation"):
        MMLLMConfig.from_preset("llava-tiny", **{missing: MMLLMConfig.from_preset("any2any-tiny").to_dict()[missing]})


def test_text_only_configs_have_no_output_side():
    config = MMLLMConfig.from_preset("llava-tiny")
    assert not config.image_generation and config.signal_token_ids is None


def test_signal_ids_must_be_in_the_vocabulary():
    with pytest.raises(ValueError, match=r"outside the backbone's vocabulary of 516"):
        MMLLMConfig.from_preset("any2any-tiny", signal_token_ids=[513, 514, 515, 516])
    with pytest.raises(ValueError, match="outside"):
        MMLLMConfig.from_preset("any2any-tiny", signal_token_ids=[-1, 513, 514, 515])


@pytest.mark.parametrize(
    "generator, message",
    [
        ({"type": "gan", "condition_length": 8, "condition_width": 64}, r"Unknown modality_generator type 'gan'"),
        ({"condition_length": 8, "condition_width": 64}, r"Unknown modality_generator type None"),
        ({"type": "builtin", "steps": 4}, r"keys \['steps'\] that the 'builtin' generator does not use"),
    ],
)
def test_bad_generators_are_refused(generator, message):
    with pytest.raises(ValueError, match=message):
        MMLLMConfig.from_preset("any2any-tiny", modality_generator=generator)


def test_generator_defaults_are_filled_in():
    config = MMLLMConfig.from_preset("any2any-tiny", modality_generator={"type": "builtin"})
    assert config.modality_generator["condition_length"] == 8 and config.modality_generator["image_size"] == 32


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"output_projector_type": "qformer"}, r"Unknown output_projector_type 'qformer': choose one of \['mlp', "),
        (
            {"output_projector_config": {"num_layer": 2}},
            r"keys \['num_layer'\] that the 'transformer' output projector",
        ),
        ({"output_projector_type": "mlp"}, r"keys \['num_heads', 'num_layers'\] that the 'mlp' output projector"),
    ],
)
def test_bad_output_projectors_are_refused_with_the_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        MMLLMConfig.from_preset("any2any-tiny", **overrides)


def test_output_projector_heads_must_divide_the_condition_width():
    config = MMLLMConfig.from_preset("any2any-tiny", output_projector_config={"num_heads": 5})
    with pytest.raises(ValueError, match="not divisible by output_projector_config.num_heads=5"):
        MMLLMForConditionalGeneration(config)


def test_builtin_decoder_size_must_be_four_times_a_power_of_two():
    config = MMLLMConfig.from_preset("any2any-tiny", modality_generator={"type": "builtin", "image_size": 24})
    with pytest.raises(ValueError, match="4 x a power of two"):
        MMLLMForConditionalGeneration(config)


# Output projectors.


@pytest.mark.parametrize(
    "kind, settings",
    [
        ("mlp", None),
        ("mlp", {"hidden_act": "silu"}),
        ("transformer", None),
        ("transformer", {"num_layers": 1, "num_heads": 2}),
    ],
)
def test_output_projectors_map_signal_states_to_the_condition_shape(kind, settings):
    config = MMLLMConfig.from_preset(
        "any2any-tiny",
        output_projector_type=kind,
        output_projector_config=settings,
        modality_generator={"type": "builtin", "condition_length": 6, "condition_width": 32},
    )
    torch.manual_seed(0)
    projector = build_output_projector(config)
    assert isinstance(projector, OUTPUT_PROJECTORS[kind])
    states = torch.randn(3, len(SIGNAL), config.text_config.hidden_size, requires_grad=True)
    conditioning = projector(states)
    assert conditioning.shape == (3, 6, 32)
    conditioning.square().mean().backward()
    assert states.grad.abs().sum() > 0
    for name, parameter in projector.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # Each image's conditioning depends on its own signal states only.
    with torch.no_grad():
        other = states.detach().clone()
        other[1] += 1
        changed = projector(other) != projector(states.detach())
    assert not changed[0].any() and changed[1].any() and not changed[2].any()


def test_no_output_projector_without_image_generation():
    assert build_output_projector(MMLLMConfig.from_preset("llava-tiny")) is None


# enable_image_generation: signal tokens as special tokens; nothing the model already does changes.


def test_enable_image_generation_adds_signal_tokens_and_keeps_everything_else():
    model = seeded_model(MMLLMConfig.from_preset("llava-tiny"))
    processor = MMLLMProcessor.from_preset("llava-tiny")
    vocab = len(processor.tokenizer)
    assert model.output_modalities == ("text",) and processor.signal_tokens == []
    text = processor(text=["<|user|>\nWhat colour is the sky?<|end|>\n<|assistant|>\n"], return_tensors="pt")
    embeddings = model.get_input_embeddings().weight.detach().clone()
    head = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        logits = model(**text).logits

    model.enable_image_generation(processor, num_signal_tokens=3)

    tokens = ["<gen_img_0>", "<gen_img_1>", "<gen_img_2>"]
    assert processor.signal_tokens == tokens
    assert model.config.signal_token_ids == list(range(vocab, vocab + 3))
    assert model.config.image_generation and model.output_modalities == ("image", "text")
    assert model.get_input_embeddings().weight.shape[0] == model.lm_head.weight.shape[0] == vocab + 3
    assert model.config.text_config.vocab_size == vocab + 3
    assert torch.equal(model.get_input_embeddings().weight[:vocab], embeddings)
    assert torch.equal(model.lm_head.weight[:vocab], head)
    with torch.no_grad():
        after = model(**text).logits
    assert after.shape[-1] == vocab + 3 and torch.equal(after[..., :vocab], logits)
    # Single special tokens: never split, skipped when decoding.
    for token, token_id in zip(tokens, model.config.signal_token_ids):
        assert processor.tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id]
    ids = processor.tokenizer("A cat:<gen_img_0><gen_img_1><gen_img_2> done", add_special_tokens=False)["input_ids"]
    assert [i for i in ids if i >= vocab] == model.config.signal_token_ids
    assert processor.decode(ids, skip_special_tokens=True) == "A cat: done"
    assert "<gen_img_1>" in processor.decode(ids)
    # The new modules exist and are the configured ones.
    assert isinstance(model.model.output_projector, OUTPUT_PROJECTORS["transformer"])
    assert model.config.modality_generator["type"] == "builtin"
    with pytest.raises(ValueError, match="already on"):
        model.enable_image_generation(processor)


def test_enable_image_generation_uses_free_vocabulary_rows_without_resizing():
    config = MMLLMConfig.from_preset(
        "llava-tiny", text_config={**MMLLMConfig.from_preset("llava-tiny").text_config.to_dict(), "vocab_size": 520}
    )
    model = seeded_model(config)
    processor = MMLLMProcessor.from_preset("llava-tiny")
    embeddings = model.get_input_embeddings().weight.detach().clone()
    model.enable_image_generation(processor, output_projector_type="mlp")
    assert model.config.signal_token_ids == SIGNAL
    assert torch.equal(model.get_input_embeddings().weight, embeddings)  # 520 rows, untouched
    assert isinstance(model.model.output_projector, OUTPUT_PROJECTORS["mlp"])


# signal_states.


def test_signal_states_picks_each_group_in_order(model):
    hidden = torch.randn(2, 12, 64)
    ids = torch.full((2, 12), 20)
    ids[0, 2:6] = torch.tensor(SIGNAL)
    ids[1, 1:5] = torch.tensor(SIGNAL)
    ids[1, 8:12] = torch.tensor(SIGNAL)
    states = model.model.signal_states(hidden, ids)
    assert states.shape == (3, 4, 64)
    assert torch.equal(states[0], hidden[0, 2:6])
    assert torch.equal(states[1], hidden[1, 1:5]) and torch.equal(states[2], hidden[1, 8:12])


def test_signal_states_refuses_incomplete_groups(model):
    ids = torch.full((1, 10), 20)
    ids[0, 3:6] = torch.tensor(SIGNAL[:3])
    with pytest.raises(ValueError, match="Found 3 signal tokens, not a multiple of the 4"):
        model.model.signal_states(torch.randn(1, 10, 64), ids)


def test_signal_states_without_signal_tokens(tiny_model):
    with pytest.raises(ValueError, match="no signal tokens"):
        tiny_model.model.signal_states(torch.randn(1, 4, 64), torch.zeros(1, 4, dtype=torch.long))


# generate(generation_mode="image").


def test_rows_that_emit_signal_tokens_use_those_positions(model, a2a_processor):
    inputs = a2a_processor(text=[_prompt(a2a_processor, "Draw a red circle.")], return_tensors="pt")
    prompt = inputs["input_ids"][0].tolist()
    answer = [300, 301, *SIGNAL, 302, 303]  # a caption, the signal group, then more text (ignored)
    images = _generate_images(model, inputs, {0: answer})
    assert images.shape == (1, 3, 32, 32) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(images, _image_from(model, prompt + answer[:6]), atol=1e-5, rtol=0)
    # The states depend on where the group sits: the same group right after the prompt gives another image.
    assert (images - _image_from(model, prompt + SIGNAL)).abs().max() > 1e-3


def test_rows_without_signal_tokens_get_them_after_the_prompt(model, a2a_processor):
    inputs = a2a_processor(text=[_prompt(a2a_processor, "Draw a red circle.")], return_tensors="pt")
    prompt = inputs["input_ids"][0].tolist()
    text_ids = model.generate(**inputs, **GREEDY)[0, len(prompt) :].tolist()
    assert not set(text_ids) & set(SIGNAL)  # the untrained model answers without signal tokens
    images = _generate_images(model, inputs)
    torch.testing.assert_close(images, _image_from(model, prompt + SIGNAL), atol=1e-5, rtol=0)
    # An incomplete group in the answer counts as none.
    images = _generate_images(model, inputs, {0: [300, *SIGNAL[:3], 301]})
    torch.testing.assert_close(images, _image_from(model, prompt + SIGNAL), atol=1e-5, rtol=0)


def test_left_padded_batches_equal_single_rows(model, a2a_processor):
    pictures = make_images(2, seed=7)
    prompts = [
        _prompt(a2a_processor, "Draw one like this.", image=True),
        _prompt(a2a_processor, "Now draw the same picture again but much larger and in green.", image=True),
    ]
    plans = [[300, *SIGNAL], []]
    batch = a2a_processor(images=[[pictures[0]], [pictures[1]]], text=prompts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # the first row is left-padded
    batched = _generate_images(model, batch, {0: plans[0]})
    for row in range(2):
        single = a2a_processor(images=[pictures[row]], text=[prompts[row]], return_tensors="pt")
        alone = _generate_images(model, single, {0: plans[row]} if plans[row] else None)
        torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-5, rtol=0)
    assert (batched[0] - batched[1]).abs().max() > 1e-3


def test_generator_kwargs_are_checked(model, a2a_processor):
    """The built-in decoder is deterministic: sampling keywords are accepted (one call for every generator), and
    have no effect; a misspelt keyword is an error, not silently dropped."""
    inputs = a2a_processor(text=[_prompt(a2a_processor, "Draw a red circle.")], return_tensors="pt")
    plain = _generate_images(model, inputs)
    torch.testing.assert_close(
        _generate_images(model, inputs, generator_kwargs={"seed": 3, "num_inference_steps": 9}), plain
    )
    with pytest.raises(ValueError, match=r"takes no \['num_steps'\]"):
        _generate_images(model, inputs, generator_kwargs={"num_steps": 9})


def test_several_images_per_prompt(model, a2a_processor):
    """num_return_sequences: one image per returned sequence, in generate's order (consecutive rows per prompt)."""
    prompts = [_prompt(a2a_processor, "Draw a red circle."), _prompt(a2a_processor, "Draw two small blue squares now.")]
    batch = a2a_processor(text=prompts, padding=True, return_tensors="pt")
    sampling = {"max_new_tokens": 6, "do_sample": True, "num_return_sequences": 3}
    torch.manual_seed(3)
    sequences = model.generate(**batch, **sampling)
    torch.manual_seed(3)
    images = model.generate(**batch, **sampling, generation_mode="image")
    assert images.shape == (6, 3, 32, 32)
    width = batch["input_ids"].shape[1]
    for row, sequence in enumerate(sequences.tolist()):
        prompt = [t for t, keep in zip(sequence[:width], batch["attention_mask"][row // 3].tolist()) if keep]
        answer = sequence[width:]
        starts = [i for i in range(len(answer)) if answer[i : i + len(SIGNAL)] == SIGNAL]
        ids = prompt + (answer[: starts[0] + len(SIGNAL)] if starts else SIGNAL)
        torch.testing.assert_close(images[row : row + 1], _image_from(model, ids), atol=1e-5, rtol=0)
    assert (images[0] - images[3]).abs().max() > 1e-3


def test_the_input_image_conditions_the_generated_image(model, a2a_processor):
    prompt = _prompt(a2a_processor, "Draw one like this.", image=True)
    images = [
        _generate_images(model, a2a_processor(images=[picture], text=[prompt], return_tensors="pt"))
        for picture in make_images(2, seed=8)
    ]
    assert (images[0] - images[1]).abs().max() > 1e-3
    inputs = a2a_processor(images=make_images(1, seed=8), text=[prompt], return_tensors="pt")
    expected = _image_from(model, inputs["input_ids"][0].tolist() + SIGNAL, inputs["pixel_values"])
    torch.testing.assert_close(images[0], expected, atol=1e-5, rtol=0)


def test_images_of_earlier_turns_do_not_add_images(model, a2a_processor):
    """A conversation that already holds a generated image (its signal group in the prompt) still gives one image
    per row, conditioned on the new group."""
    history = [{"role": "user", "content": "Draw a cat."}, {"role": "assistant", "content": [{"type": "image"}]}]
    prompts = [_prompt(a2a_processor, "Now make it red.", history=history), _prompt(a2a_processor, "Draw a dog.")]
    assert "".join(a2a_processor.signal_tokens) in prompts[0]
    batch = a2a_processor(text=prompts, padding=True, return_tensors="pt")
    images = _generate_images(model, batch)
    assert images.shape == (2, 3, 32, 32)
    single = a2a_processor(text=prompts[:1], return_tensors="pt")
    torch.testing.assert_close(
        images[:1], _image_from(model, single["input_ids"][0].tolist() + SIGNAL), atol=1e-5, rtol=0
    )


def test_text_mode_is_plain_generate(model, a2a_processor):
    inputs = a2a_processor(
        images=make_images(1), text=[_prompt(a2a_processor, "What is it?", image=True)], return_tensors="pt"
    )
    expected = GenerationMixin.generate(model, **inputs, **GREEDY)
    assert torch.equal(model.generate(**inputs, **GREEDY), expected)
    assert torch.equal(model.generate(**inputs, **GREEDY, generation_mode="text"), expected)


def test_generate_errors(model, a2a_processor, tiny_model):
    inputs = a2a_processor(text=[_prompt(a2a_processor, "Draw.")], return_tensors="pt")
    with pytest.raises(ValueError, match="generation_mode='audio': use 'text' or 'image'"):
        model.generate(**inputs, **GREEDY, generation_mode="audio")
    with pytest.raises(ValueError, match="drop return_dict_in_generate"):
        model.generate(**inputs, **GREEDY, generation_mode="image", return_dict_in_generate=True)
    with pytest.raises(ValueError, match="cannot generate images: it has no output projector"):
        tiny_model.generate(input_ids=torch.tensor([[8, 9, 10]]), **GREEDY, generation_mode="image")


# Chat template and a2a_processor.


def test_an_assistant_image_renders_as_the_signal_tokens(a2a_processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Draw one like it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Here:"}, {"type": "image"}]},
    ]
    text = a2a_processor.apply_chat_template(messages)
    assert text == (
        "<|user|>\n<image>Draw one like it.<|end|>\n"
        "<|assistant|>\nHere:<gen_img_0><gen_img_1><gen_img_2><gen_img_3><|end|>\n"
    )
    ids = a2a_processor(images=make_images(1), text=[text], return_tensors="pt")["input_ids"][0]
    assert int(torch.isin(ids, torch.tensor(SIGNAL)).sum()) == 4


def test_an_assistant_image_without_signal_tokens_is_an_error(a2a_processor):
    plain = MMLLMProcessor.from_preset("llava-tiny")
    messages = [{"role": "user", "content": "Draw a cat."}, {"role": "assistant", "content": [{"type": "image"}]}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="no signal tokens <gen_img_i>: enable image generation"):
        plain.apply_chat_template(messages)
    # A user image is still an input placeholder for both.
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    assert plain.apply_chat_template(user) == a2a_processor.apply_chat_template(user) == "<|user|>\n<image>Hi<|end|>\n"


def test_post_processing_to_pil(a2a_processor):
    pixels = torch.rand(2, 3, 8, 6)
    pixels[0, 0, 0, 0], pixels[0, 1, 0, 0] = 1.7, -0.2  # out of range: clamped
    images = a2a_processor.post_process_multimodal_output(pixels, generation_mode="image")
    assert [image.size for image in images] == [(6, 8), (6, 8)] and all(image.mode == "RGB" for image in images)
    expected = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.stack([np.asarray(image) for image in images]), expected)
    assert tuple(np.asarray(images[0])[0, 0, :2]) == (255, 0)
    # PIL -> tensor -> PIL is lossless at 8 bits.
    again = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2) / 255
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(a2a_processor.post_process_multimodal_output(again, generation_mode="image"), images)
    )
    # Text mode still decodes ids.
    ids = a2a_processor.tokenizer(["Hello there"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert a2a_processor.post_process_multimodal_output(ids) == ["Hello there"]
    # One image, arrays and lists give the same pictures; anything else is a clear error.
    for form in (pixels[0], pixels.numpy(), [pixels[0], pixels[1]], list(pixels.numpy())):
        converted = a2a_processor.post_process_multimodal_output(form, generation_mode="image")
        assert [np.asarray(image).tolist() for image in converted] == [
            np.asarray(image).tolist() for image in images[: len(converted)]
        ]
    for bad in (ids, torch.rand(2, 4, 8, 6)):
        with pytest.raises(ValueError, match=r"pixels \[B, 3, H, W\].*got"):
            a2a_processor.post_process_multimodal_output(bad, generation_mode="image")
    with pytest.raises(ValueError, match="pass generation_mode='image'"):
        a2a_processor.post_process_multimodal_output(pixels)


# Saving, auto_map, model card.


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model, a2a_processor):
    return save_model_folder(model, a2a_processor, tmp_path_factory.mktemp("image-generation") / "any2any-tiny")


def test_save_and_reload_give_identical_images(saved, model, a2a_processor):
    loaded = MMLLMForConditionalGeneration.from_pretrained(saved).eval()
    reprocessor = MMLLMProcessor.from_pretrained(saved)
    assert reprocessor.signal_tokens == a2a_processor.signal_tokens
    assert loaded.config.signal_token_ids == SIGNAL
    assert loaded.config.modality_generator == model.config.modality_generator
    prompt = _prompt(reprocessor, "Draw one like this.", image=True)
    inputs = reprocessor(images=make_images(1, seed=9), text=[prompt], return_tensors="pt")
    assert torch.equal(
        inputs["input_ids"],
        a2a_processor(images=make_images(1, seed=9), text=[prompt], return_tensors="pt")["input_ids"],
    )
    assert torch.equal(
        _generate_images(loaded, inputs, {0: [300, *SIGNAL]}), _generate_images(model, inputs, {0: [300, *SIGNAL]})
    )


def test_auto_map_names_the_multimodal_auto_class_for_image_generation(saved, saved_folder):
    auto_map = json.loads((saved / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForMultimodalLM"] == "modeling_mmllm.MMLLMForConditionalGeneration"
    assert auto_map["AutoModelForImageTextToText"] == "modeling_mmllm.MMLLMForConditionalGeneration"
    assert "AutoModelForMultimodalLM" not in json.loads((saved_folder / "config.json").read_text())["auto_map"]


def test_model_card_describes_the_output_side(saved, saved_folder):
    card = (saved / "README.md").read_text()
    header = card.split("---")[1]
    assert "pipeline_tag: any-to-any" in header and "- text-to-image" in header
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in card.splitlines()
        if line.startswith("| Output Projector") or line.startswith("| Modality Generator")
    }
    assert rows["Output Projector"] == (
        "`transformer` (num_layers 2, num_heads 4): hidden states at the 4 signal tokens `<gen_img_0>` … "
        "`<gen_img_3>` → conditioning of 8 × 64 (condition length × width)"
    )
    assert rows["Modality Generator"] == (
        "built-in image decoder (weights in this checkpoint): 8 × 64 conditioning → 32×32 RGB images"
    )
    assert 'pipeline("any-to-any"' in card and 'generation_mode="image"' in card
    plain = (saved_folder / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in plain.split("---")[1] and 'pipeline("any-to-any"' not in plain
    assert "| Output Projector | none |" in plain and "| Modality Generator | none (text output) |" in plain


@pytest.mark.parametrize(
    "pretrained, where",
    [
        (
            "stabilityai/stable-diffusion-2-1-base",
            "the diffusers pipeline `stabilityai/stable-diffusion-2-1-base` (referenced, not copied)",
        ),
        ("modality_generator", "the diffusers pipeline in this repository's `modality_generator/` sub-folder"),
    ],
)
def test_model_card_of_a_diffusers_generator(pretrained, where):
    generator = {
        "type": "diffusers",
        "pretrained": pretrained,
        "condition_length": 77,
        "condition_width": 1024,
        "num_inference_steps": 25,
    }
    config = MMLLMConfig.from_preset(
        "any2any-tiny", modality_generator=generator, output_projector_type="mlp", output_projector_config=None
    )
    rows = _component_rows(config)
    assert rows["output_projector"].startswith("`mlp`: hidden states at the 4 signal tokens")
    assert rows["output_projector"].endswith("→ conditioning of 77 × 1024 (condition length × width)")
    assert rows["generator"] == (
        f"{where}, conditioned through `prompt_embeds` of 77 × 1024, 25 denoising steps; "
        "generating images needs diffusers: `pip install mmllm[generation]`"
    )


def test_model_card_render_for_a_repo(model):
    card = str(render_model_card(model, repo_id="someone/any2any-demo"))
    assert 'pipeline("any-to-any", model="someone/any2any-demo", trust_remote_code=True)' in card
    assert "generating images through a transformer output projector and the builtin image generator" in card


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"output_projector_type": "conv"}, "Unknown output_projector_type"),
        ({"output_projector_config": {"depth": 3}}, "does not use"),
        ({"modality_generator": {"type": "gan"}}, "Unknown modality_generator type"),
        ({"num_signal_tokens": 0}, "whole number"),
        ({"num_signal_tokens": "4"}, "whole number"),
        ({"modality_generator": "builtin"}, "pass a dict"),
        # Checked when the modules are built: still before anything changes.
        ({"modality_generator": {"type": "builtin", "image_size": 30}}, "4 x a power of two"),
        ({"output_projector_config": {"num_heads": 3}}, "not divisible by output_projector_config.num_heads=3"),
    ],
)
def test_enable_image_generation_refuses_bad_settings_before_changing_anything(kwargs, message):
    model = MMLLMForConditionalGeneration(MMLLMConfig.from_preset("owl2-tiny"))
    processor = MMLLMProcessor.from_preset("owl2-tiny")
    vocab, config = len(processor.tokenizer), model.config.to_dict()
    with pytest.raises(ValueError, match=message):
        model.enable_image_generation(processor, **kwargs)
    assert len(processor.tokenizer) == vocab and model.config.to_dict() == config
    assert model.lm_head.weight.shape[0] == vocab and model.model.output_projector is None
    model.enable_image_generation(processor)  # a corrected call then works
    assert model.config.image_generation and len(processor.tokenizer) == vocab + 4
