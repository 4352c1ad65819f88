"""Modality collaboration (mPLUG-Owl2's claim), measured on a real LLM: does the modality-adaptive module, with text
instructions mixed into the joint stage, keep the LLM's text abilities while it learns to see?

SmolLM2-135M-Instruct (fetched once from PyPI) with the vision side the default quickstart trains (its encoder and
abstractor layers; `runs/quickstart`, trained here first if missing). Stage 1, shared by every variant: feature
alignment with the LLM frozen (recipe `collaboration-stage1`: the abstractor learns to talk to SmolLM2). Stage 2, one
run per variant, the same steps (recipe `collaboration-joint`): joint instruction tuning with the LLM unfrozen
(everything but the vision encoder trains), on the quickstart's image questions:
- `llava`: no module (LLaVA);
- `owl2`: mPLUG-Owl2's modality-adaptive module (K/V projections and norms per modality, copies of the text
  branch at the start of stage 2);
- `cogvlm`: CogVLM's visual expert (`modality_adaptive_parts="all"`: every projection, the MLP and the norms);
- `llava+text`, `owl2+text`: a quarter of the rows are text-only instructions (mPLUG-Owl2's joint training): templated
  prompts (none of them held out) answered by SmolLM2 itself.
Each variant is then measured against SmolLM2 alone: held-out image exact match (`image_accuracy`), mean per-token
KL(SmolLM2 ‖ tuned) and the tuned model's perplexity on English prose CPython ships (`pydoc_data.topics`), and the
share of 52 held-out general prompts it answers exactly as SmolLM2 does (`text_agreement`).

    python benchmarks/modality_collaboration.py [--steps N] [--json PATH] [--output DIR]

`--steps N` bounds every stage it runs (the vision side's too, where it must train it); `--steps 2` is a smoke run.
It prints the table and draws image accuracy against text KL per variant (`<output>/collaboration.png`).
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from PIL import Image, ImageDraw

VARIANTS = {  # variant: (modality_adaptive_parts or None, text rows mixed in)
    "llava": (None, False),
    "owl2": ("kv_norms", False),
    "cogvlm": ("all", False),
    "llava+text": (None, True),
    "owl2+text": ("kv_norms", True),
}
TEXT_SHARE = 0.25
TEXT_TEMPLATES = (
    "What is {a} plus {b}?",
    "Write one sentence about {thing}.",
    "What colour is {thing}, usually?",
    "Give me a fun fact about {thing}.",
    "Is {thing} bigger than a house?",
    "Describe {thing} in a few words.",
)
THINGS = ("an apple", "the ocean", "a bicycle", "snow", "a violin", "a volcano", "a library", "an elephant")


def text_prompts() -> list[str]:
    """Training text instructions: templated, none of them among the held-out general prompts."""
    prompts = []
    for index, template in enumerate(TEXT_TEMPLATES):
        for offset, thing in enumerate(THINGS):
            prompts.append(template.format(a=index + 2, b=offset + 3, thing=thing))
    return list(dict.fromkeys(prompts))


def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modeling_mmllm.builders.real_llm import smollm2_folder

    folder = smollm2_folder()
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def cached_json(path: Path, make):
    """`make()`'s JSON-able result, kept in `path` (made once)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(make(), indent=1))
    return json.loads(path.read_text())


def training_data(output: Path, rows: int, with_text: bool, text_answers: dict[str, str]) -> Path:
    """The joint stage's rows as a parquet file: image questions, and with `with_text` a quarter text-only."""
    from datasets import concatenate_datasets

    from modeling_mmllm.data.synthetic import make_dataset

    path = output / "data" / f"joint-{rows}{'-text' if with_text else ''}.parquet"
    if path.is_file():
        return path
    texts = round(rows * TEXT_SHARE) if with_text else 0
    images = make_dataset("vqa", rows - texts).select_columns(["images", "messages"])
    parts = [images]
    if texts:
        prompts = list(text_answers)
        chats = [
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": text_answers[prompt]}]
            for prompt in (prompts[index % len(prompts)] for index in range(texts))
        ]
        text_rows = images.select(range(texts)).map(
            lambda row, index: {"images": [], "messages": chats[index]}, with_indices=True
        )
        parts.append(text_rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    concatenate_datasets(parts).shuffle(seed=0).to_parquet(path)
    return path


def variant_start(stage1: Path, output: Path, parts: str | None) -> Path:
    """The stage-1 model, with the module switched on (branches copied from the text branch) for `parts`."""
    from modeling_mmllm import MMLLMForConditionalGeneration, MMLLMProcessor
    from modeling_mmllm.saving import save_model_folder

    if parts is None:
        return stage1
    folder = output / f"start-{parts}"
    if not (folder / "model.safetensors").is_file():
        model, processor = MMLLMForConditionalGeneration.from_pretrained(stage1), MMLLMProcessor.from_pretrained(stage1)
        model.config.modality_adaptive_parts = parts
        model.enable_modality_adaptive()
        save_model_folder(model, processor, folder, replace=True)
    return folder


def drop_checkpoints(folder: Path) -> Path:
    """Remove the trainer checkpoints beside a finished stage's model folder (the optimizer state of a 135M LLM is
    1 GB per variant; a finished stage is recognised by its model folder, so nothing resumes from them)."""
    for checkpoint in folder.parent.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    return folder


def measure(folder: Path, original, tokenizer, reference: list[str], prompts: list[str], args) -> dict:
    from modeling_mmllm import MMLLMForConditionalGeneration, MMLLMProcessor
    from modeling_mmllm.data.synthetic import make_dataset
    from modeling_mmllm.evaluation.metrics import exact_match
    from modeling_mmllm.evaluation.text_retention import (
        agreement,
        english_passages,
        greedy_chat_answers,
        text_divergence,
    )

    model, processor = (
        MMLLMForConditionalGeneration.from_pretrained(folder).eval(),
        MMLLMProcessor.from_pretrained(folder),
    )
    heldout = make_dataset("vqa", args.heldout, split="heldout")
    accuracy = exact_match(model, processor, heldout, batch_size=16)["overall"]
    divergence = text_divergence(original, model, tokenizer, english_passages(args.passages))
    answers = greedy_chat_answers(model, processor, prompts, max_new_tokens=args.answer_tokens)
    return {
        "image_accuracy": accuracy,
        "text_kl": divergence["kl"],
        "text_agreement": agreement(reference, answers),
        "perplexity": divergence["perplexity"],
    }


def draw(results: list[dict], path: Path) -> None:
    """Image accuracy (up) against text KL (right), one labelled point per variant."""
    width, height, margin = 640, 420, 60
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    top_kl = max(max(result["text_kl"] for result in results), 1e-6) * 1.15
    box = (margin, 30, width - 30, height - margin)
    draw.rectangle(box, outline=(150, 150, 150))
    draw.text((margin, 8), "modality collaboration on SmolLM2-135M-Instruct: image accuracy vs text KL", fill=(0, 0, 0))
    draw.text((width // 2 - 80, height - 25), f"text KL (nats/token), 0 .. {top_kl:.3g}", fill=(0, 0, 0))
    draw.text((5, 30), "image\naccuracy\n1.0", fill=(0, 0, 0))
    draw.text((5, height - margin - 12), "0.0", fill=(0, 0, 0))
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    for index, (result, colour) in enumerate(zip(results, colours)):
        x = box[0] + result["text_kl"] / top_kl * (box[2] - box[0])
        y = box[3] - result["image_accuracy"] * (box[3] - box[1])
        draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill=colour)
        draw.text((x + 8, y - 6), result["variant"], fill=colour)
        legend = f"{result['variant']}: {result['image_accuracy']:.2f} / {result['text_kl']:.4f}"
        draw.text((box[2] - 190, box[1] + 8 + 14 * index), legend, fill=colour)  # where labels would overlap
    canvas.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="bound every training stage to N steps (default: the recipes')")
    parser.add_argument("--json", type=Path, help="write the results as a JSON array of one object per variant")
    parser.add_argument("--output", type=Path, default=Path("runs/modality-collaboration"))
    parser.add_argument("--vision-from", type=Path, default=Path("runs/quickstart"), help="the default quickstart")
    parser.add_argument("--heldout", type=int, default=100, help="held-out image questions per variant")
    parser.add_argument("--passages", type=int, default=16, help="English passages for KL and perplexity")
    parser.add_argument("--prompts", type=int, default=52, help="held-out general prompts for text agreement")
    parser.add_argument("--answer-tokens", type=int, default=16, help="greedy tokens per text answer")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()

    from modeling_mmllm.evaluation.text_retention import GENERAL_PROMPTS, greedy_chat_answers
    from modeling_mmllm.quickstart.run import run_stage, run_stages
    from modeling_mmllm.quickstart.smollm2 import compose_base
    from modeling_mmllm.training import load_recipe

    start = time.time()
    output, steps = args.output, args.steps
    stage2, _ = run_stages(args.vision_from, fast=False, steps=steps)
    base = output / "base"
    if not (base / "model.safetensors").is_file():
        compose_base(stage2, base, modality_adaptive=False)
    print("\n== stage 1 (shared): collaboration-stage1, the LLM frozen ==", flush=True)
    stage1 = drop_checkpoints(run_stage("collaboration-stage1", output / "stage1", False, {}, model=base, steps=steps))

    original, tokenizer = smollm2()
    prompts = list(GENERAL_PROMPTS[: args.prompts])
    reference = cached_json(
        output / f"smollm2-answers-{len(prompts)}-{args.answer_tokens}.json",
        lambda: greedy_chat_answers(original, tokenizer, prompts, max_new_tokens=args.answer_tokens),
    )
    joint = load_recipe("collaboration-joint", {"max_steps": steps} if steps else {})
    rows = joint.max_steps * joint.per_device_train_batch_size
    instructions = text_prompts()[: max(1, round(rows * TEXT_SHARE))]  # as many as the text rows (repeated beyond)
    text_answers = cached_json(
        output / "data" / f"text-instructions-{len(instructions)}.json",
        lambda: dict(zip(instructions, greedy_chat_answers(original, tokenizer, instructions, 48))),
    )
    results = []
    for variant in args.variants:
        parts, with_text = VARIANTS[variant]
        print(f"\n== stage 2: {variant} (collaboration-joint, the LLM unfrozen) ==", flush=True)
        began = time.time()
        data = training_data(output, rows, with_text, text_answers)
        folder = run_stage(
            "collaboration-joint",
            output / variant,
            False,
            {},
            model=variant_start(stage1, output, parts),
            steps=steps,
            overrides={"data": {"dataset": str(data)}},
        )
        drop_checkpoints(folder)
        results.append({"variant": variant, **measure(folder, original, tokenizer, reference, prompts, args)})
        results[-1]["seconds"] = time.time() - began
        print(json.dumps(results[-1]), flush=True)

    print(f"\nmodality collaboration | SmolLM2-135M-Instruct | joint stage: {joint.max_steps} steps x "
          f"{joint.per_device_train_batch_size} rows | {args.heldout} held-out image questions, {len(prompts)} "
          f"general prompts, {args.passages} English passages | {time.time() - start:.0f} s in all")  # fmt: skip
    columns = ("image_accuracy", "text_kl", "text_agreement", "perplexity", "seconds")
    print(f"{'variant':<12}" + "".join(f"{column:>16}" for column in columns))
    for result in results:
        print(f"{result['variant']:<12}" + "".join(f"{result[column]:>16.4f}" for column in columns))
    draw(results, output / "collaboration.png")
    print(f"trade-off plot: {output / 'collaboration.png'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
