"""Evaluation of a model on held-out rows (library side): exact match per question kind, and for image
generation an independent judge's reading of the generated images plus how often the signal tokens are emitted."""

from collections import defaultdict

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm

from ..data.synthetic import Scene


def _batched_inputs(model, processor, rows: list[dict], batch_size: int):
    """Processor inputs (prompt = each row's user turn, generation prompt added) per batch of rows."""
    # disable=None: no bar when the output is not a terminal, so a log keeps each result on its own line
    for start in tqdm(range(0, len(rows), batch_size), desc="evaluating", leave=False, disable=None):
        batch = rows[start : start + batch_size]
        prompts = [processor.apply_chat_template(_prompt_messages(row), add_generation_prompt=True) for row in batch]
        images = [image for row in batch for image in row.get("images") or []] or None
        videos = [clip for row in batch for clip in row.get("videos") or []] or None
        clips = [clip for row in batch for clip in row.get("audio") or []] or None
        inputs = processor(images=images, videos=videos, audio=clips, text=prompts, padding=True, return_tensors="pt")
        yield inputs.to(model.device)


def generated_tokens(
    model, processor, rows: list[dict], max_new_tokens: int = 12, batch_size: int = 32
) -> list[torch.Tensor]:
    """Greedy new token ids for the user turn of each row (the assistant turn is dropped)."""
    model.eval()
    tokens = []
    for inputs in _batched_inputs(model, processor, rows, batch_size):
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        tokens += list(output[:, inputs["input_ids"].shape[1] :].cpu())
    return tokens


def answer_questions(model, processor, rows: list[dict], max_new_tokens: int = 12, batch_size: int = 32) -> list[str]:
    """Greedy answers to the user turn of each row (the assistant turn is dropped)."""
    tokens = generated_tokens(model, processor, rows, max_new_tokens, batch_size)
    return [text.strip() for text in processor.batch_decode(tokens, skip_special_tokens=True)]


def generate_images(model, processor, rows: list[dict], batch_size: int = 32, **generator_kwargs) -> torch.Tensor:
    """Images `[n, 3, H, W]` in `[0, 1]` the model draws for the user turn of each row
    (`generate(generation_mode="image")`, greedy)."""
    model.eval()
    k = len(model.config.signal_token_ids)
    images = []
    for inputs in _batched_inputs(model, processor, rows, batch_size):
        images.append(
            model.generate(
                **inputs,
                generation_mode="image",
                max_new_tokens=k + 1,
                do_sample=False,
                generator_kwargs=generator_kwargs or None,
            )
            .float()
            .cpu()
        )
    return torch.cat(images)


def emits_signal(tokens: torch.Tensor, signal_token_ids: list[int]) -> bool:
    """Whether new tokens hold the full signal group `<gen_img_0> ... <gen_img_{k-1}>` in a row."""
    signal, k = torch.tensor(signal_token_ids), len(signal_token_ids)
    return any(torch.equal(tokens[start : start + k], signal) for start in range(len(tokens) - k + 1))


def _prompt_messages(row: dict) -> list[dict]:
    """The row's first user turn (of `messages`, or of a preference pair's `prompt`) with typed parts."""
    user = next(message for message in row.get("messages") or row["prompt"] if message["role"] == "user")
    content = user["content"]
    if isinstance(content, str):
        content = (
            [{"type": "image"}] * len(row.get("images") or [])
            + [{"type": "video"}] * len(row.get("videos") or [])
            + [{"type": "audio"}] * len(row.get("audio") or [])
            + [{"type": "text", "text": content}]
        )
    return [{"role": "user", "content": content}]


def exact_match(model, processor, dataset: Dataset, **kwargs) -> dict[str, float]:
    """Accuracy per `kind` column, plus `overall` (rows need `messages`, `answer`, `kind`; optional `images`,
    `videos`, `audio`)."""
    rows = list(dataset)
    return accuracy_by_kind(rows, answer_questions(model, processor, rows, **kwargs))


def completion_log_probs(model, processor, rows: list[dict], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each preference pair's chosen and of its rejected answer given its prompt (and
    images), as the DPO loss sees them: the batches are made by TRL's own preference collator."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    collator = DataCollatorForVisionPreference(processor=processor)
    model.eval()
    chosen, rejected = [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="scoring pairs", leave=False, disable=None):
        batch = collator([dict(row) for row in rows[start : start + batch_size]])  # copies: it rewrites the rows
        completion = batch.pop("completion_mask")[:, 1:].to(model.device)
        batch = {key: value.to(model.device) for key, value in batch.items()}
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits[:, :-1].float()
        tokens = batch["input_ids"][:, 1:]
        token_log_probs = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        sums = (token_log_probs * completion).sum(dim=1).cpu()
        chosen_sums, rejected_sums = sums.chunk(2)  # the collator stacks [chosen rows, rejected rows]
        chosen.append(chosen_sums)
        rejected.append(rejected_sums)
    return torch.cat(chosen), torch.cat(rejected)


def preference_rate(model, processor, dataset: Dataset, batch_size: int = 16) -> float:
    """Share of preference pairs (`images` + `prompt` / `chosen` / `rejected`) whose chosen answer has the higher
    log-probability under `model`: what DPO raises (0.5 is a coin toss)."""
    chosen, rejected = completion_log_probs(model, processor, list(dataset), batch_size)
    return float((chosen > rejected).float().mean())


def evaluate_image_generation(model, processor, dataset: Dataset, judge=None, batch_size: int = 32) -> dict[str, float]:
    """Held-out any-to-any figures.

    Rows that ask for an image (`generation_caption`): the judge's shape and colour accuracy on the images the model
    draws (`image/shape`, `image/colour`; `image/colour_pixels` from pixel statistics alone), the same for the
    generator drawing from its own encoding of the caption (`reference/...`: the ceiling the output projector can
    reach), and the rate at which the model emits the signal tokens in text mode (`image/emission`). Other rows: exact
    match per kind and the rate at which signal tokens leak into their answers (`text/signal_rate`, ideally 0).
    `judge` defaults to a freshly trained `image_judge.ShapeColourJudge` (its accuracy on real held-out images is
    reported as `judge/shape`, `judge/colour`).
    """
    from .image_judge import train_judge

    rows = list(dataset)
    drawing = [row for row in rows if row.get("generation_caption")]
    questions = [row for row in rows if not row.get("generation_caption")]
    signal_ids = list(model.config.signal_token_ids)
    results = {}
    if drawing:
        if judge is None:
            judge, scores = train_judge()
            results.update({f"judge/{name}": scores[name] for name in ("shape", "colour")})
        scenes = [Scene.from_description(row["generation_caption"]) for row in drawing]
        results.update(_judged("image", judge, generate_images(model, processor, drawing, batch_size), scenes))
        results.update(_judged("reference", judge, reference_images(model, processor, scenes), scenes))
        tokens = generated_tokens(model, processor, drawing, len(signal_ids) + 1, batch_size)
        results["image/emission"] = float(np.mean([emits_signal(t, signal_ids) for t in tokens]))
    if questions:
        tokens = generated_tokens(model, processor, questions, 12, batch_size)
        answers = [text.strip() for text in processor.batch_decode(tokens, skip_special_tokens=True)]
        results["text/signal_rate"] = float(np.mean([bool(set(t.tolist()) & set(signal_ids)) for t in tokens]))
        results.update(accuracy_by_kind(questions, answers))
    return results


def reference_images(model, processor, scenes: list[Scene], batch_size: int = 64) -> torch.Tensor:
    """What the model's generator draws from its own encoding of each scene's description."""
    generator = next(module for module in model.modules() if hasattr(module, "signal_states")).modality_generator
    images = []
    for start in range(0, len(scenes), batch_size):
        captions = [scene.describe() for scene in scenes[start : start + batch_size]]
        with torch.no_grad():
            images.append(generator.generate(generator.encode_prompt(captions, processor.tokenizer)).float().cpu())
    return torch.cat(images)


def _judged(prefix: str, judge, images: torch.Tensor, scenes: list[Scene]) -> dict[str, float]:
    """Judge's shape and colour accuracy, and the pixel-statistics colour accuracy, of images against scenes."""
    from .image_judge import pixel_colours

    readings = judge.judge(images)
    return {
        f"{prefix}/shape": float(np.mean([r["shape"] == s.shape for r, s in zip(readings, scenes)])),
        f"{prefix}/colour": float(np.mean([r["colour"] == s.colour for r, s in zip(readings, scenes)])),
        f"{prefix}/colour_pixels": float(np.mean([c == s.colour for c, s in zip(pixel_colours(images), scenes)])),
    }


def normalize_answer(text: str) -> str:
    """An answer as exact match compares it: lower case, without surrounding whitespace and full stops."""
    return text.strip().lower().strip(" .")


def accuracy_by_kind(rows: list[dict], predictions: list[str]) -> dict[str, float]:
    """Exact-match accuracy per `kind`, plus `overall`."""
    hits, totals = defaultdict(int), defaultdict(int)
    for row, prediction in zip(rows, predictions):
        correct = normalize_answer(prediction) == normalize_answer(row["answer"])
        for kind in (row.get("kind", "all"), "overall"):
            hits[kind] += correct
            totals[kind] += 1
    return {kind: hits[kind] / totals[kind] for kind in totals}


__all__ = [
    "accuracy_by_kind",
    "answer_questions",
    "completion_log_probs",
    "emits_signal",
    "evaluate_image_generation",
    "exact_match",
    "generate_images",
    "generated_tokens",
    "normalize_answer",
    "preference_rate",
    "reference_images",
]
