"""Exact-match evaluation of a model on question-answer rows, per question kind (library side)."""

from collections import defaultdict

import torch
from datasets import Dataset
from tqdm.auto import tqdm


def answer_questions(model, processor, rows: list[dict], max_new_tokens: int = 12, batch_size: int = 32) -> list[str]:
    """Greedy answers to the user turn of each row (the assistant turn is dropped)."""
    answers = []
    model.eval()
    for start in tqdm(range(0, len(rows), batch_size), desc="evaluating", leave=False):
        batch = rows[start:start + batch_size]
        prompts = [processor.apply_chat_template(_prompt_messages(row), add_generation_prompt=True) for row in batch]
        images = [image for row in batch for image in row.get("images") or []] or None
        clips = [clip for row in batch for clip in row.get("audio") or []] or None
        inputs = processor(images=images, audio=clips, text=prompts, padding=True, return_tensors="pt").to(model.device)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        answers += [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def _prompt_messages(row: dict) -> list[dict]:
    user = next(message for message in row["messages"] if message["role"] == "user")
    content = user["content"]
    if isinstance(content, str):
        content = ([{"type": "image"}] * len(row.get("images") or []) + [{"type": "audio"}] * len(row.get("audio") or [])
                   + [{"type": "text", "text": content}])
    return [{"role": "user", "content": content}]


def exact_match(model, processor, dataset: Dataset, **kwargs) -> dict[str, float]:
    """Accuracy per `kind` column, plus `overall` (rows need `messages`, `answer`, `kind`; `images`, `audio`)."""
    rows = list(dataset)
    predictions = answer_questions(model, processor, rows, **kwargs)
    hits, totals = defaultdict(int), defaultdict(int)
    for row, prediction in zip(rows, predictions):
        correct = prediction.lower().strip(" .") == row["answer"].lower().strip(" .")
        for kind in (row.get("kind", "all"), "overall"):
            hits[kind] += correct
            totals[kind] += 1
    return {kind: hits[kind] / totals[kind] for kind in totals}


__all__ = ["answer_questions", "exact_match"]
