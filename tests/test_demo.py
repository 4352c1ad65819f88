"""`mmllm demo`: the Gradio app in a real headless Chromium (attach images, ask, read the streamed answer, compare
with `generate`, screenshot), and through `gradio_client`: audio files, drawings of any-to-any models, settings."""

import numpy as np
import pytest
import soundfile
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from helpers import ARTIFACTS, ask_in_browser, free_port, make_images, seeded_model
from modeling_mmllm import MMLLMConfig, MMLLMProcessor
from modeling_mmllm.serving.gradio_demo import build_demo

QUESTION = "What colour are the shapes?"


def generate_text(model, processor, text, max_new_tokens=64, **media):
    """What `mmllm generate` answers (greedy) for one user turn: one part per media item, then the text."""
    parts = [{"type": kind} for kind, items in (("image", media.get("images")), ("audio", media.get("audio")))
             for _ in items or []] + [{"type": "text", "text": text}]  # fmt: skip
    prompt = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
    inputs = processor(text=[prompt], return_tensors="pt", **media)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def launch(model, processor):
    port = free_port()
    app = build_demo(model, processor, title="test")
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return app, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def demo(tiny_model, processor):
    app, url = launch(tiny_model, processor)
    yield url
    app.close()


def _words(text: str) -> list[str]:
    return text.split()


def test_in_a_browser_two_images_and_a_question_get_the_generate_answer(demo, tiny_model, processor, tmp_path):
    images = make_images(2, seed=1)
    paths = [tmp_path / f"shape{i}.png" for i in range(2)]
    for image, path in zip(images, paths):
        image.save(path)
    screenshot = ARTIFACTS / "demo-llava-tiny.png"
    screenshot.unlink(missing_ok=True)
    shown = ask_in_browser(demo, paths, QUESTION, screenshot)
    assert _words(shown) == _words(generate_text(tiny_model, processor, QUESTION, images=images))
    assert screenshot.stat().st_size > 10_000


def _answer(url, text, files=(), max_new_tokens=64, temperature=0.0, top_p=1.0, client=None):
    client = client or Client(url, verbose=False)
    message = {"text": text, "files": [handle_file(str(path)) for path in files]}
    _, chat = client.predict(message, [], max_new_tokens, temperature, top_p, api_name="/answer")
    return chat


def _texts(chat) -> list[str]:
    return [part["text"] for message in chat if message["role"] == "assistant" for part in message["content"]
            if part["type"] == "text"]  # fmt: skip


def test_the_settings_panel_sets_the_answer_length(demo, tiny_model, processor, tmp_path):
    make_images(1, seed=2)[0].save(path := tmp_path / "image.png")
    chat = _answer(demo, QUESTION, [path], max_new_tokens=3)
    expected = generate_text(tiny_model, processor, QUESTION, max_new_tokens=3, images=make_images(1, seed=2))
    assert _texts(chat) == [expected] and [m["role"] for m in chat] == ["user", "user", "assistant"]
    sampled = {tuple(_texts(_answer(demo, QUESTION, [path], max_new_tokens=6, temperature=1.5))) for _ in range(3)}
    assert len(sampled) > 1  # temperature > 0 samples


def test_answers_stream_in_pieces(demo, tmp_path):
    make_images(1, seed=6)[0].save(path := tmp_path / "image.png")
    job = Client(demo, verbose=False).submit(
        {"text": QUESTION, "files": [handle_file(str(path))]}, [], 16, 0.0, 1.0, api_name="/answer"
    )
    job.result()
    answers = [_texts(chat)[-1] for _, chat in job.outputs() if _texts(chat)]
    assert len(set(answers)) > 2 and all(answers[-1].startswith(answer.strip()) for answer in answers)


def test_a_turn_over_the_context_is_refused_and_leaves_the_conversation_as_it_was(
    demo, tiny_model, processor, tmp_path
):
    client = Client(demo, verbose=False)  # one session: the conversation carries over between its calls
    make_images(1, seed=7)[0].save(path := tmp_path / "image.png")
    with pytest.raises(AppError, match="context"):
        _answer(demo, "word " * 600, [path], client=client)
    chat = _answer(demo, QUESTION, [path], max_new_tokens=4, client=client)
    expected = generate_text(tiny_model, processor, QUESTION, max_new_tokens=4, images=make_images(1, seed=7))
    assert _texts(chat) == [expected]
    follow_up = _answer(demo, "And the sizes?", max_new_tokens=4, client=client)  # the second turn sees the first
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": expected}]},
        {"role": "user", "content": [{"type": "text", "text": "And the sizes?"}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=make_images(1, seed=7), return_tensors="pt")
    output = tiny_model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert _texts(follow_up) == [
        processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    ]


def test_audio_models_take_audio_files(tmp_path):
    model, processor = seeded_model(MMLLMConfig.from_preset("audio-tiny")), MMLLMProcessor.from_preset("audio-tiny")
    soundfile.write(wav := tmp_path / "beeps.wav", (0.5 * np.sin(np.arange(20000) * 0.3)).astype("float32"), 16000)
    app, url = launch(model, processor)
    try:
        chat = _answer(url, "How many beeps?", [wav], max_new_tokens=8)
    finally:
        app.close()
    assert _texts(chat) == [generate_text(model, processor, "How many beeps?", max_new_tokens=8, audio=[str(wav)])]


def test_any_to_any_models_show_their_drawing(tmp_path):
    model, processor = seeded_model(MMLLMConfig.from_preset("any2any-tiny")), MMLLMProcessor.from_preset("any2any-tiny")
    model.generation_config.sequence_bias = {(model.config.signal_token_ids[0],): 50.0}  # it answers with an image
    app, url = launch(model, processor)
    try:
        chat = _answer(url, "Draw a red circle.", max_new_tokens=6)
    finally:
        app.close()
    files = [part for message in chat for part in message["content"] if part["type"] == "file"]
    assert chat[-1]["role"] == "assistant" and len(files) == 1 and files[0]["file"].endswith(".png")
