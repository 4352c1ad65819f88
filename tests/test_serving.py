"""`mmllm serve`: a real server (a child process on 127.0.0.1) driven by the `openai` client — the listed model id,
answers equal to greedy `generate` on the chat template (images as data URLs and local files, audio, streaming,
concurrent requests), bad requests answered with 400 while the server keeps serving, answers capped at the room
the prompt leaves in the context; `--quantization`."""

import base64
import io
import pickle
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile
import torch
from openai import BadRequestError, OpenAI
from PIL import Image

from helpers import free_port, make_images, seeded_model, start_service, stop_service
from modeling_mmllm import MMLLMConfig, MMLLMProcessor
from modeling_mmllm.cli import main
from modeling_mmllm.saving import save_model_folder
from modeling_mmllm.serving.openai_server import MMLLMModelLoader
from modeling_mmllm.serving.quantization import load_for_inference

MAX_TOKENS = 8


def start_server(folder, *options, cwd=None):
    """`mmllm serve FOLDER --port P` in a child process; the `openai` client for it once `/v1/models` answers."""
    port = free_port()
    command = [sys.executable, "-m", "modeling_mmllm.cli", "serve", str(folder), "--port", str(port), *options]
    process = start_service(command, f"http://127.0.0.1:{port}/v1/models", cwd=cwd)
    return process, OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def server(saved_folder):
    process, client = start_server(saved_folder)
    yield client
    stop_service(process)


@pytest.fixture(scope="module")
def local_model(saved_folder):
    return load_for_inference(saved_folder)


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def generate_locally(model, processor, text: str, images=(), audio=()) -> str:
    """What `mmllm generate` answers: the chat template with one part per item, greedy."""
    parts = [{"type": "image"}] * len(images) + [{"type": "audio"}] * len(audio) + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
    inputs = processor(images=list(images) or None, audio=list(audio) or None, text=[prompt], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def ask(client, content, **options) -> str:
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": content}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        **options,
    )
    return reply.choices[0].message.content.strip()


def image_parts(urls: list[str], text: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url}} for url in urls] + [{"type": "text", "text": text}]


def test_models_lists_the_served_folder_under_the_id_chat_accepts(server, saved_folder):
    models = server.models.list().data
    assert [model.id for model in models] == [str(saved_folder)]
    reply = server.chat.completions.create(
        model=models[0].id, messages=[{"role": "user", "content": "hello"}], max_tokens=2, temperature=0
    )
    assert reply.model == str(saved_folder) and reply.usage.completion_tokens <= 2
    with pytest.raises(BadRequestError, match="pinned"):
        server.chat.completions.create(model="someone/else", messages=[{"role": "user", "content": "hi"}])


def test_answers_equal_generate_for_data_urls_local_files_and_text(server, local_model, tmp_path):
    model, processor = local_model
    images = make_images(2, seed=3)
    paths = [tmp_path / f"image{i}.png" for i in range(2)]
    for image, path in zip(images, paths):
        image.save(path)
    question = "What colour are the shapes?"
    assert ask(server, image_parts([data_url(images[0])], question)) == generate_locally(
        model, processor, question, images[:1]
    )
    assert ask(server, image_parts([str(path) for path in paths], question)) == generate_locally(
        model, processor, question, images
    )
    assert ask(server, question) == generate_locally(model, processor, question)


def test_streaming_gives_the_same_answer_in_pieces(server):
    content = image_parts([data_url(make_images(1, seed=5)[0])], "Describe it.")
    stream = server.chat.completions.create(
        model=server.models.list().data[0].id,
        messages=[{"role": "user", "content": content}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    chunks = [chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert len(chunks) > 1
    assert "".join(chunks).strip() == ask(server, content)


def test_concurrent_requests_each_get_their_own_answer(server):
    requests = [image_parts([data_url(image)], f"Question {i}?") for i, image in enumerate(make_images(4, seed=9))]
    alone = [ask(server, content) for content in requests]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda content: ask(server, content), requests))
    assert together == alone and len(set(alone)) > 1


BAD_REQUESTS = {
    "bad base64": (image_parts(["data:image/png;base64,!!!not-base64"], "What is it?"), "Incorrect image source"),
    "not an image": (
        image_parts(["data:image/png;base64," + base64.b64encode(b"no picture here").decode()], "What is it?"),
        "cannot identify image file",
    ),
    "missing file": (image_parts(["/no/such/picture.png"], "What is it?"), "Incorrect image source"),
    "more placeholders than images": (image_parts([data_url(make_images(1)[0])], "<image> and this?"), "placeholder"),
    "prompt over the context": ("word " * 3000, "context"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_bad_requests_get_400_with_a_message_and_the_server_keeps_serving(server, case, stream):
    content, message = BAD_REQUESTS[case]
    with pytest.raises(BadRequestError, match=message) as error:
        ask(server, content, stream=stream)
    assert error.value.status_code == 400
    assert ask(server, "still there?")  # the next request is answered


def _prompt_tokens(processor, text: str) -> int:
    messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return len(inputs["input_ids"][0])


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_the_answer_is_capped_at_the_room_the_prompt_leaves_in_the_context(server, local_model, stream):
    model, processor = local_model
    context = model.config.get_text_config().max_position_embeddings
    words = max(n for n in range(context) if _prompt_tokens(processor, "word " * n) <= context - 3)
    room = context - _prompt_tokens(processor, "word " * words)
    reply = server.chat.completions.create(
        model=server.models.list().data[0].id,
        messages=[{"role": "user", "content": "word " * words}],
        max_tokens=room + 20,
        temperature=0,
        stream=stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    )
    if stream:
        chunks = list(reply)
        finish = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1]
        usage = chunks[-1].usage  # the last chunk: the usage, without choices
    else:
        finish, usage = reply.choices[0].finish_reason, reply.usage
    assert usage.prompt_tokens == context - room and usage.completion_tokens == room and finish == "length"


def test_an_image_in_an_assistant_turn_of_a_text_answering_model_is_a_400(server):
    with pytest.raises(BadRequestError, match="signal tokens"):
        server.chat.completions.create(
            model=server.models.list().data[0].id,
            messages=[{"role": "assistant", "content": image_parts([data_url(make_images(1)[0])], "look")}],
        )


@pytest.fixture(scope="module")
def audio_folder(tmp_path_factory):
    model, processor = seeded_model(MMLLMConfig.from_preset("audio-tiny")), MMLLMProcessor.from_preset("audio-tiny")
    return save_model_folder(model, processor, tmp_path_factory.mktemp("serve") / "audio-tiny")


def test_audio_models_take_input_audio_parts(audio_folder, tmp_path):
    wav = tmp_path / "tone.wav"
    soundfile.write(wav, (0.5 * np.sin(np.arange(16000) * 0.2)).astype("float32"), 16000)
    question = "How many beeps?"
    content = [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav.read_bytes()).decode(), "format": "wav"}},
        {"type": "text", "text": question},
    ]
    model, processor = load_for_inference(audio_folder)
    expected = generate_locally(model, processor, question, audio=[str(wav)])
    process, client = start_server(audio_folder)
    try:
        assert ask(client, content) == expected
    finally:
        stop_service(process)


# --- quantization -------------------------------------------------------------------------------------------


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_int8_loading_stores_int8_weights_and_stays_close(saved_folder, local_model):
    model, processor = local_model
    quantized, _ = load_for_inference(saved_folder, "int8")
    weight = quantized.model.language_model.layers[0].self_attn.q_proj.weight
    assert type(weight).__name__ == "Int8Tensor" and weight.qdata.dtype == torch.int8
    inputs = processor(images=make_images(1), text=["<image> What is it?"], return_tensors="pt")
    reference, low_bit = _logits(model, inputs), _logits(quantized, inputs)
    assert 0 < (low_bit - reference).abs().max() <= 0.02 * reference.abs().max()


def test_generate_with_quantization_answers_as_the_quantized_model(saved_folder, tmp_path, capsys):
    image = make_images(1, seed=4)[0]
    image.save(path := tmp_path / "image.png")
    question = "What colour are the shapes?"
    assert main(["generate", str(saved_folder), "--image", str(path), "--prompt", question, "--quantization", "int8",
                 "--max-new-tokens", str(MAX_TOKENS)]) == 0  # fmt: skip
    quantized, processor = load_for_inference(saved_folder, "int8")
    assert capsys.readouterr().out.strip() == generate_locally(quantized, processor, question, [image])


def test_the_server_loads_the_model_quantized_when_asked(saved_folder):
    # transformers >= 5.25 pickles the loader into the model's process, which loads there: a copy loads quantized
    loader = pickle.loads(pickle.dumps(MMLLMModelLoader(quantization="int8")))
    model = loader.load_model_and_processor(str(saved_folder))[0]
    assert type(model.model.language_model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "demo"])
def test_int4_is_refused_with_the_reason(saved_folder, command, capsys):
    extra = ["--prompt", "hi"] if command == "generate" else []
    assert main([command, str(saved_folder), *extra, "--quantization", "int4"]) == 1
    assert "--quantization int4: torchao's 4-bit weights need its packed int4 kernels" in capsys.readouterr().err


def test_serve_refuses_what_is_neither_a_folder_nor_a_hub_id(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing"), "--quantization", "int8"]) == 1
    assert "neither a model folder nor a Hub id" in capsys.readouterr().err
