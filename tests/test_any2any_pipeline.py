"""pipeline("any-to-any") on saved folders: audio questions (issue #7) and image generation (issue #8).

transformers' any-to-any pipeline requires torchvision for models that take images, and uses it nowhere else; where
torchvision does not import (CPU CI), `pipeline_gate` lifts exactly that requirement. On a machine with torchvision
nothing is patched and these tests run against the real pipeline.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_gate import lift_torchvision_gate, torchvision_importable, without_torchvision
from transformers import pipeline

from helpers import TESTS, make_images, seeded_model
from modeling_mmllm import MMLLMConfig, MMLLMProcessor
from modeling_mmllm.saving import save_model_folder

soundfile = pytest.importorskip("soundfile", reason="audio files need mmllm[audio] (soundfile)")

pytestmark = pytest.mark.hub

RATE = 16000
GREEDY = {"max_new_tokens": 6, "do_sample": False}


def _greedy():
    # A fresh dict per call: the pipeline writes `generation_mode` into the generate_kwargs it is given.
    return dict(GREEDY)


def _tone(seconds: float, frequency: float) -> np.ndarray:
    time = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * frequency * time)).astype(np.float32)


def _chat(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


@pytest.fixture(scope="module")
def any_to_any():
    """`pipeline("any-to-any", ...)` with only the torchvision gate lifted (nothing lifted where it imports)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        lift_torchvision_gate(monkeypatch)
        yield lambda folder: pipeline("any-to-any", model=str(folder), trust_remote_code=True)


def test_the_gate_helper_lifts_torchvision_only():
    calls = []
    check = without_torchvision(lambda obj, backends: calls.append(backends))
    check("pipe", "torchvision")
    check("pipe", "vision")
    check("pipe", ["vision", "torchvision", "torch"])
    assert calls == [["vision"], ["vision", "torch"]]


@pytest.mark.skipif(torchvision_importable(), reason="torchvision imports here: the real pipeline runs unpatched")
def test_without_the_helper_the_pipeline_asks_for_torchvision(audio_folder):
    with pytest.raises(ImportError, match="(?i)torchvision"):
        pipeline("any-to-any", model=str(audio_folder), trust_remote_code=True)


# Issue #7: audio questions through pipeline("any-to-any").


@pytest.fixture(scope="module")
def audio_model():
    return seeded_model(MMLLMConfig.from_preset("audio-tiny"))


@pytest.fixture(scope="module")
def audio_processor():
    return MMLLMProcessor.from_preset("audio-tiny")


@pytest.fixture(scope="module")
def audio_folder(tmp_path_factory, audio_model, audio_processor):
    return save_model_folder(audio_model, audio_processor, tmp_path_factory.mktemp("any2any") / "audio-tiny")


@pytest.fixture(scope="module")
def audio_pipe(any_to_any, audio_folder):
    return any_to_any(audio_folder)


@pytest.fixture(scope="module")
def audio_chats(tmp_path_factory):
    """Two questions (different lengths, so batches are padded), each clip as an array and as a wav file."""
    folder = tmp_path_factory.mktemp("clips")
    clips = {"low": _tone(0.6, 330.0), "high": _tone(1.3, 880.0)}  # one encoder window each (audio-tiny: 2 s)
    chats = {}
    for name, question in (("low", "How many beeps are there?"), ("high", "Is it high?")):
        soundfile.write(folder / f"{name}.wav", clips[name], RATE, subtype="FLOAT")  # exact samples
        chats[name, "array"] = _chat({"type": "audio", "audio": clips[name]}, _text(question))
        chats[name, "file"] = _chat({"type": "audio", "path": str(folder / f"{name}.wav")}, _text(question))
    return chats


def _expected_answer(model, processor, chat) -> tuple[list[int], str]:
    """Greedy `model.generate` on the processor's inputs for `chat`: the new ids and their text."""
    inputs = processor.apply_chat_template(
        chat, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt"
    )
    assert (inputs["mm_token_type_ids"] == 3).any()  # the audio really is in the prompt
    with torch.no_grad():
        ids = model.generate(**inputs, **GREEDY, pad_token_id=processor.tokenizer.pad_token_id)
    new = ids[0, inputs["input_ids"].shape[1] :]
    return ids[0].tolist(), processor.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("form", ["array", "file"])
def test_audio_question_answers_like_generate(audio_pipe, audio_model, audio_processor, audio_chats, form):
    chat = audio_chats["low", form]
    ids, answer = _expected_answer(audio_model, audio_processor, chat)
    assert answer

    output = audio_pipe(text=chat, generate_kwargs=_greedy())
    assert output[0]["generated_text"] == [*chat, {"role": "assistant", "content": answer}]
    assert audio_pipe(text=chat, generate_kwargs=_greedy(), return_full_text=False)[0]["generated_text"] == answer
    tokens = audio_pipe(text=chat, generate_kwargs=_greedy(), return_tensors=True)[0]["generated_token_ids"]
    assert tokens.tolist() == ids


def test_audio_as_array_and_as_file_give_the_same_answer(audio_pipe, audio_chats):
    answers = {
        form: audio_pipe(text=audio_chats["high", form], generate_kwargs=_greedy(), return_full_text=False)[0][
            "generated_text"
        ]
        for form in ("array", "file")
    }
    assert answers["array"] == answers["file"]


def test_batched_audio_questions_equal_single_ones(audio_pipe, audio_model, audio_processor, audio_chats):
    chats = [audio_chats["low", "array"], audio_chats["high", "file"]]
    expected = [_expected_answer(audio_model, audio_processor, chat)[1] for chat in chats]
    assert expected[0] != expected[1]
    single = [
        audio_pipe(text=chat, generate_kwargs=_greedy(), return_full_text=False)[0]["generated_text"] for chat in chats
    ]
    batched = audio_pipe(text=chats, batch_size=2, generate_kwargs=_greedy(), return_full_text=False)
    assert single == expected
    assert [output[0]["generated_text"] for output in batched] == expected


def test_batched_long_clips_name_the_pipeline_limit(audio_pipe, audio_chats):
    """transformers' pipeline batching keeps one window per item: a clip longer than a window gets a clear error
    (not a placeholder-count mismatch); alone it is answered."""
    long_chat = _chat({"type": "audio", "audio": _tone(3.5, 440.0)}, _text("How many beeps are there?"))
    assert audio_pipe(text=long_chat, generate_kwargs=_greedy(), return_full_text=False)[0]["generated_text"]
    with pytest.raises(ValueError, match=r"hold 2 audio window\(s\) but input_features_mask 3.*batch_size=1"):
        audio_pipe(text=[long_chat, audio_chats["low", "array"]], batch_size=2, generate_kwargs=_greedy())


def test_audio_model_card_and_output_modalities(audio_folder, audio_pipe):
    card = (audio_folder / "README.md").read_text()
    assert "pipeline_tag: any-to-any" in card.split("---")[1]
    assert "Audio questions go through" in card and '{"type": "audio", "path": "question.wav"}' in card
    assert "| Modality Generator | none (text output) |" in card and 'generation_mode="image"' not in card
    assert audio_pipe.model.output_modalities == ("text",)
    assert set(audio_pipe.model.input_modalities) == {"image", "audio", "text"}


def test_a_model_without_image_generation_refuses_image_mode(audio_pipe, audio_chats):
    with pytest.raises(ValueError, match=r"generation_mode=image.*only output the following modalities: \('text',\)"):
        audio_pipe(text=audio_chats["low", "array"], generation_mode="image", generate_kwargs=_greedy())


# Issue #8: images out of pipeline("any-to-any").


@pytest.fixture(scope="module")
def image_model():
    return seeded_model(MMLLMConfig.from_preset("any2any-tiny"))


@pytest.fixture(scope="module")
def image_processor():
    return MMLLMProcessor.from_preset("any2any-tiny")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, image_model, image_processor):
    return save_model_folder(image_model, image_processor, tmp_path_factory.mktemp("any2any") / "any2any-tiny")


@pytest.fixture(scope="module")
def image_pipe(any_to_any, image_folder):
    return any_to_any(image_folder)


DRAW = _chat(_text("Draw a red circle on a blue background."))
DRAW_LIKE = _chat({"type": "image", "image": make_images(1, seed=3)[0]}, _text("Draw one like this."))


def _generated_images(model, processor, chats, **kwargs) -> list:
    """In process: processor -> `model.generate(generation_mode="image")` -> the processor's PIL images."""
    inputs = processor.apply_chat_template(
        chats, tokenize=True, return_dict=True, add_generation_prompt=True, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        images = model.generate(
            **inputs, **GREEDY, pad_token_id=processor.tokenizer.pad_token_id, generation_mode="image", **kwargs
        )
    assert images.shape == (len(chats), 3, 32, 32)
    return processor.post_process_multimodal_output(images, generation_mode="image")


def _pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _same_image(image, expected) -> bool:
    """The same pixels up to float rounding: the pipeline runs under inference_mode, and BLAS may sum in another
    order (seen on a 16-core GPU machine), which moves a value across a colour level at most."""
    return np.abs(_pixels(image) - _pixels(expected)).max() <= 1


@pytest.mark.parametrize("chat", [DRAW, DRAW_LIKE], ids=["text-prompt", "image-prompt"])
def test_image_mode_returns_the_generated_image(image_pipe, image_model, image_processor, chat):
    (expected,) = _generated_images(image_model, image_processor, [chat])
    (output,) = image_pipe(text=chat, generation_mode="image", generate_kwargs=_greedy())
    assert set(output) == {"input_text", "generated_image"}
    image = output["generated_image"]
    assert image.mode == "RGB" and image.size == (32, 32)  # the built-in generator's image_size
    assert _same_image(image, expected)
    assert _pixels(image).std() > 0  # an image, not a constant


def test_the_input_image_changes_the_generated_image(image_pipe):
    other = _chat({"type": "image", "image": make_images(1, seed=4)[0]}, _text("Draw one like this."))
    images = [
        image_pipe(text=chat, generation_mode="image", generate_kwargs=_greedy())[0]["generated_image"]
        for chat in (DRAW_LIKE, other)
    ]
    assert not np.array_equal(_pixels(images[0]), _pixels(images[1]))


def test_batched_image_prompts(image_pipe, image_model, image_processor):
    chats = [DRAW, _chat(_text("A cat."))]
    batched = image_pipe(text=chats, batch_size=2, generation_mode="image", generate_kwargs=_greedy())
    images = [output[0]["generated_image"] for output in batched]
    for image, expected in zip(images, _generated_images(image_model, image_processor, chats)):
        assert _same_image(image, expected)
    single = [
        image_pipe(text=chat, generation_mode="image", generate_kwargs=_greedy())[0]["generated_image"]
        for chat in chats
    ]
    for image, alone in zip(images, single):  # left padding changes float rounding only: at most one level
        assert np.abs(_pixels(image) - _pixels(alone)).max() <= 1
    assert not np.array_equal(_pixels(images[0]), _pixels(images[1]))


@pytest.mark.parametrize("mode", [None, "text"])
def test_text_mode_is_unchanged(image_pipe, image_model, image_processor, mode):
    inputs = image_processor.apply_chat_template(
        DRAW, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt"
    )
    with torch.no_grad():
        ids = image_model.generate(**inputs, **GREEDY, pad_token_id=image_processor.tokenizer.pad_token_id)
    expected = image_processor.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    kwargs = {} if mode is None else {"generation_mode": mode}
    output = image_pipe(text=DRAW, generate_kwargs=_greedy(), return_full_text=False, **kwargs)
    assert output[0]["generated_text"] == expected


def test_image_model_modalities_and_card(image_pipe, image_folder):
    assert image_pipe.model.output_modalities == ("image", "text")
    assert image_pipe.model.input_modalities == ("image", "text")
    header = (image_folder / "README.md").read_text().split("---")[1]
    assert "pipeline_tag: any-to-any" in header


def test_images_still_answer_through_image_text_to_text(image_folder, image_model, image_processor):
    pipe = pipeline("image-text-to-text", model=str(image_folder), trust_remote_code=True)
    image = make_images(1, seed=5)[0]
    chat = _chat({"type": "image", "image": image}, _text("What colour is it?"))
    inputs = image_processor.apply_chat_template(
        chat, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt"
    )
    with torch.no_grad():
        ids = image_model.generate(**inputs, **GREEDY, pad_token_id=image_processor.tokenizer.pad_token_id)
    expected = image_processor.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    output = pipe(text=chat, generate_kwargs=_greedy(), return_full_text=False)
    assert output[0]["generated_text"] == expected


FRESH = """
import json, sys
sys.modules["modeling_mmllm"] = None  # the package cannot be imported: only the folder's code may run
tests, folder, messages, png = sys.argv[1:5]
sys.path.insert(0, tests)
from pipeline_gate import lift_torchvision_gate
lift_torchvision_gate()  # the same gate, lifted the same way (only where torchvision does not import)
from transformers import pipeline
pipe = pipeline("any-to-any", model=folder, trust_remote_code=True)
greedy = {"max_new_tokens": 6, "do_sample": False}
output = pipe(text=json.loads(messages), generation_mode="image", generate_kwargs=greedy)
output[0]["generated_image"].save(png)
print(json.dumps({"module": type(pipe.model).__module__, "outputs": list(pipe.model.output_modalities)}))
"""


@pytest.mark.slow
def test_image_generation_through_the_pipeline_in_a_fresh_process(image_folder, image_pipe, tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", FRESH, str(TESTS), str(image_folder), json.dumps(DRAW), str(tmp_path / "image.png")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules") and report["outputs"] == ["image", "text"]
    expected = image_pipe(text=DRAW, generation_mode="image", generate_kwargs=_greedy())[0]["generated_image"]
    with Image.open(tmp_path / "image.png") as image:
        assert image.size == (32, 32)
        assert _same_image(image.convert("RGB"), expected)
