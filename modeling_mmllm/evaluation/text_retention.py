"""Text retention: how far a tuned multimodal model's language has moved from the original LLM's (library side).

mPLUG-Owl2's claim is that multimodal instruction tuning degrades an LLM's text abilities unless the modality-adaptive
module and joint text + image tuning protect them. Two measures, both against the original LLM:
- `text/kl`: mean per-token KL(original ‖ tuned), in nats, over held-out English prose that no one on this project
  wrote: the Python language reference's topics, which CPython ships as `pydoc_data.topics` (every Python has them);
- `text/agreement`: the share of held-out general prompts (`GENERAL_PROMPTS`, in no training set) whose greedy answer,
  through each model's own chat template, equals the original's.
"""

import math
import re

import torch
import torch.nn.functional as F

GENERAL_PROMPTS = (
    "What is the capital of France?",
    "What is the capital of Japan?",
    "Name a primary colour.",
    "What is 7 times 8?",
    "What is 15 minus 6?",
    "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in our solar system?",
    "How many days are in a week?",
    "What language is spoken in Brazil?",
    "Give me a synonym for happy.",
    "What is the opposite of cold?",
    "Write one sentence about dogs.",
    "Write one sentence about the sea.",
    "Describe the moon in one sentence.",
    "What do bees make?",
    "What gas do plants take in?",
    "How many legs does a spider have?",
    "What is the chemical symbol for gold?",
    "Which ocean is the largest?",
    "What is the freezing point of water in Fahrenheit?",
    "Translate 'good morning' into French.",
    "Translate 'cat' into Spanish.",
    "What is a noun?",
    "Suggest a name for a pet fish.",
    "What season comes after winter?",
    "What is the square root of 81?",
    "How many hours are in a day?",
    "Name a fruit that is yellow.",
    "What instrument has 88 keys?",
    "What is the tallest animal?",
    "Why do we need sleep? Answer briefly.",
    "Give one tip for staying healthy.",
    "What is the main ingredient of bread?",
    "What does a thermometer measure?",
    "Who painted the Mona Lisa?",
    "What is the smallest prime number?",
    "How many continents are there?",
    "What is photosynthesis? Answer in one sentence.",
    "What is the currency of the United Kingdom?",
    "Name a mammal that can fly.",
    "What is the past tense of 'run'?",
    "Write a short greeting for a birthday card.",
    "What colour do you get by mixing blue and yellow?",
    "What is the speed of light, roughly?",
    "How many sides does a hexagon have?",
    "What do you call a baby cat?",
    "Name one planet closer to the Sun than Earth.",
    "What is the plural of 'mouse'?",
    "Give a word that rhymes with 'light'.",
    "What is the first letter of the English alphabet?",
    "Explain what a computer is in one sentence.",
)


def english_passages(count: int, min_words: int = 40) -> list[str]:
    """`count` paragraphs of English prose from the Python reference (`pydoc_data.topics`, shipped with CPython):
    paragraphs of at least `min_words` words with no code lines, in a fixed order."""
    from pydoc_data.topics import topics

    passages = []
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith(" ") or re.fullmatch(r"[*=\-]+", line) for line in lines):
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text.split()) >= min_words:
                passages.append(text)
    if len(passages) < count:
        raise ValueError(f"Only {len(passages)} English passages are available here; asked for {count}.")
    return passages[:count]


def text_divergence(original, tuned, tokenizer, passages: list[str], max_tokens: int = 128) -> dict[str, float]:
    """Over `passages` (each cut to `max_tokens`), on the original vocabulary (rows a composition added are left out
    of both distributions): `kl`, the mean per-token KL(original ‖ tuned) in nats, and `perplexity`, the tuned
    model's on the passages' next tokens."""
    kl, nll, tokens, predicted = 0.0, 0.0, 0, 0
    vocabulary = original.config.get_text_config().vocab_size
    with torch.no_grad():
        for passage in passages:
            ids = tokenizer(passage, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_tokens]
            reference = F.log_softmax(original(input_ids=ids).logits[0, :, :vocabulary].float(), dim=-1)
            candidate = F.log_softmax(tuned(input_ids=ids).logits[0, :, :vocabulary].float(), dim=-1)
            kl += float((reference.exp() * (reference - candidate)).sum())
            nll -= float(candidate[:-1].gather(-1, ids[0, 1:, None]).sum())
            tokens, predicted = tokens + ids.shape[1], predicted + ids.shape[1] - 1
    return {"kl": kl / tokens, "perplexity": math.exp(nll / predicted)}


def greedy_chat_answers(model, processing, prompts, max_new_tokens: int = 24) -> list[str]:
    """Greedy answers to one-turn chats, through `processing`'s chat template (a tokenizer or a processor)."""
    tokenizer = getattr(processing, "tokenizer", processing)
    answers = []
    with torch.no_grad():
        for prompt in prompts:
            inputs = processing.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
            )
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            answers.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return answers


def agreement(reference: list[str], answers: list[str]) -> float:
    """Share of answers equal to the reference's."""
    return sum(a == b for a, b in zip(reference, answers)) / len(reference)


__all__ = ["GENERAL_PROMPTS", "agreement", "english_passages", "greedy_chat_answers", "text_divergence"]
