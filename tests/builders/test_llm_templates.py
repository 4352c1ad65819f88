"""Composition keeps an instruct LLM's behaviour: its own chat template (placeholders in the user's turn, no new role
tokens), its end-of-turn token, its greedy answers through our processor, and again from a saved folder in a fresh
process; assistant-only loss under that template. Tiny Llama (Llama-3's template) and Qwen2 (ChatML) LLMs that carry
their own templates stand in for real ones here; tests/builders/test_real_llm.py runs SmolLM2 itself."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from helpers import (
    ROOT,
    composed_answers,
    fresh_process_answers,
    make_images,
    original_answers,
    tiny_text_config,
    typed,
)
from modeling_mmllm import MMLLMForConditionalGeneration
from modeling_mmllm.saving import save_model_folder
from modeling_mmllm.training.collator import MultimodalCollator

pytestmark = pytest.mark.hub

# Qwen2-Instruct's template (default system prompt when none is given) and Llama-3-Instruct's (no tools): both take
# string content only, as many LLM templates do.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{% for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLMS = {
    "qwen2": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>", bos=None),
    "llama": dict(
        specials=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        eos="<|eot_id|>",
        bos="<|begin_of_text|>",
    ),
}
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france paris is the capital",
    "you are a helpful assistant answer briefly",
    "cats and dogs are animals two plus three is five",
] * 10

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Two plus three?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who jumps over the dog?"}],
    [{"role": "system", "content": "You are a fox."}, {"role": "user", "content": "Are cats animals?"}],
    [
        {"role": "user", "content": "Name an animal."},
        {"role": "assistant", "content": "A dog."},
        {"role": "user", "content": "Another one?"},
    ],
    [
        {"role": "system", "content": "Be a helpful assistant."},
        {"role": "user", "content": "the quick brown fox"},
        {"role": "assistant", "content": "jumps over"},
        {"role": "user", "content": "the lazy dog?"},
    ],
    [{"role": "user", "content": "paris"}],
    [{"role": "user", "content": "Is the dog lazy or quick?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "What is five?"}],
    [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What are cats?"},
        {"role": "assistant", "content": "Animals."},
        {"role": "user", "content": "And dogs?"},
    ],
]


def _templated_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    spec = LLMS[kind]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=spec["specials"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    if spec["bos"]:  # Llama 3's tokenizer adds <|begin_of_text|> itself, and its template writes it too
        bos_id = tokenizer.token_to_id(spec["bos"])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{spec['bos']} $A", special_tokens=[(spec["bos"], bos_id)]
        )
    template = {"qwen2": QWEN2_TEMPLATE, "llama": LLAMA3_TEMPLATE}[kind]
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=spec["bos"], eos_token=spec["eos"], chat_template=template
    )


@pytest.fixture(scope="module")
def llms(tmp_path_factory, vision_folder):
    """`{kind: folder}`: tiny instruct-style LLMs with their own tokenizer, template and end-of-turn token."""
    root = tmp_path_factory.mktemp("llms")
    for kind in LLMS:
        tokenizer = _templated_tokenizer(kind)
        torch.manual_seed(3)
        eos = tokenizer.convert_tokens_to_ids(LLMS[kind]["eos"])
        config = tiny_text_config(kind, vocab_size=len(tokenizer), eos_token_id=eos, initializer_range=0.2)
        lm = AutoModelForCausalLM.from_config(config)
        lm.generation_config.eos_token_id = eos
        lm.save_pretrained(root / kind)
        tokenizer.save_pretrained(root / kind)
    return root


@pytest.mark.parametrize("kind", list(LLMS))
def test_composition_keeps_the_llms_template_and_answers(llms, vision_folder, tmp_path, kind):
    model, processor = MMLLMForConditionalGeneration.from_components(
        vision=str(vision_folder), text=str(llms / kind), projector="mlp", modality_adaptive=True
    )
    model.eval()
    original = AutoTokenizer.from_pretrained(llms / kind)
    # Only the placeholders are new (and a pad token where the LLM has none): no role tokens, and the LLM's
    # end-of-turn token ends generation.
    added = set(processor.tokenizer.get_vocab()) - set(original.get_vocab())
    assert added == {"<image>", "<video>", "<audio>"} | ({"<|pad|>"} if original.pad_token is None else set())
    eos = original.convert_tokens_to_ids(LLMS[kind]["eos"])
    assert model.generation_config.eos_token_id == [eos]
    assert processor.tokenizer.chat_template == processor.chat_template
    # Typed parts in every role render exactly as string content under the LLM's own template; an image part is
    # the placeholder inside the user's turn, and nothing else changes.
    for chat in CHATS:
        expected = original.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert processor.apply_chat_template(typed(chat), add_generation_prompt=True) == expected
        assert processor.tokenizer.apply_chat_template(typed(chat), add_generation_prompt=True, tokenize=False) == (
            expected
        )
    with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    as_string = [{"role": "user", "content": "<image>What is it?"}]
    assert processor.apply_chat_template(with_image) == original.apply_chat_template(as_string, tokenize=False)

    expected = original_answers(llms / kind, CHATS)
    assert len({tuple(answer) for answer in expected}) > 3  # the chats are told apart: equality below means something
    assert composed_answers(model, processor, CHATS) == expected
    # An image chat runs through the same template end to end.
    prompt = processor.apply_chat_template(with_image, add_generation_prompt=True)
    batch = processor(images=make_images(1), text=[prompt], return_tensors="pt")
    assert model.generate(**batch, max_new_tokens=2, do_sample=False).shape[1] > batch["input_ids"].shape[1]

    folder = save_model_folder(model, processor, tmp_path / "composed")
    assert fresh_process_answers(folder, CHATS) == expected


def test_assistant_only_loss_under_the_llms_own_template(llms, vision_folder):
    """The template has no {% generation %} markers: the collator finds the answers itself; the loss covers every
    answer and its end-of-turn token, nothing of the prompts."""
    _, processor = MMLLMForConditionalGeneration.from_components(vision=str(vision_folder), text=str(llms / "qwen2"))
    collator = MultimodalCollator(processor=processor, assistant_only_loss=True)
    rows = [
        {"images": make_images(1), "messages": CHATS[9]},
        {"images": [], "messages": [*CHATS[2], {"role": "assistant", "content": "The fox."}]},
    ]
    batch = collator([dict(row) for row in rows])
    kept = [processor.tokenizer.decode(ids[labels != -100]) for ids, labels in zip(batch["input_ids"], batch["labels"])]
    assert kept == ["Hello! How can I help?<|im_end|>Animals.<|im_end|>", "The fox.<|im_end|>"]


def test_the_package_template_stays_for_llms_without_one(tmp_path, vision_folder):
    """A base LLM (no chat template) gets the package's template and role tokens, as before."""
    tokenizer = _templated_tokenizer("qwen2")
    tokenizer.chat_template = None
    AutoModelForCausalLM.from_config(tiny_text_config("qwen2", vocab_size=len(tokenizer))).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, processor = MMLLMForConditionalGeneration.from_components(vision=str(vision_folder), text=str(tmp_path))
    chat = typed(CHATS[2])
    assert processor.apply_chat_template(chat, add_generation_prompt=True) == (
        "<|system|>\nAnswer briefly.<|end|>\n<|user|>\nWho jumps over the dog?<|end|>\n<|assistant|>\n"
    )
    assert (ROOT / "processing" / "chat_template.jinja").read_text() in processor.chat_template


def test_assistant_only_loss_refuses_a_template_whose_answers_it_cannot_find(llms, vision_folder):
    """A template with no generation prompt gives no way to tell the answers apart: a clear error, not a silent
    loss on every token (or on none)."""
    _, processor = MMLLMForConditionalGeneration.from_components(
        vision=str(vision_folder),
        text=str(llms / "qwen2"),
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
    )
    with pytest.raises(ValueError, match="assistant_only_loss cannot find the answers.*generation.*false"):
        MultimodalCollator(processor=processor, assistant_only_loss=True)
