"""The any-to-any stage of the embedded default (NExT-GPT, issue #8): the quickstart's model learns to draw
(library side).

`run_any2any` trains the `quickstart-any2any` recipe (built-in generator pre-training, then output-projector
alignment with the LLM frozen) from a stage-2 folder, evaluates on held-out scenes with the independent judge of
`image_judge`, and writes a PNG of held-out requests with the images the model drew.
"""

import json
import time
from pathlib import Path

from PIL import Image, ImageDraw

from ..data.synthetic import make_dataset
from ..evaluation.image_judge import CHANCE
from ..evaluation.metrics import generate_images
from ..modeling_mmllm import MMLLMForConditionalGeneration
from ..processing_mmllm import MMLLMProcessor
from ..training import load_recipe, train

RECIPE = "quickstart-any2any"
FAST = {
    "max_steps": 6,
    "save_steps": 100,
    "logging_steps": 2,
    "data.n": 64,
    "generator_pretraining.steps": 10,
    "generator_pretraining.n": 64,
    "eval.n": 16,
}


def run_any2any(
    output: Path,
    model: Path | str | None = None,
    fast: bool = False,
    overrides: dict | None = None,
) -> dict:
    """Train `quickstart-any2any` into `output` (from `model`, default the recipe's stage-2 folder); returns the
    held-out figures (`eval_results.json`: judged shape/colour of the drawn images, emission rates, exact match),
    the folder and the time taken. `fast` is a few-step smoke run."""
    start = time.time()
    settings = {"output_dir": str(output), **(FAST if fast else {}), **(overrides or {})}
    if model is not None:
        settings["model.path"] = str(model)
    folder = train(load_recipe(RECIPE, settings), name=RECIPE)
    metrics = json.loads((folder / "eval_results.json").read_text())
    model, processor = MMLLMForConditionalGeneration.from_pretrained(folder), MMLLMProcessor.from_pretrained(folder)
    draw_generations(model, processor, output / "any2any.png")
    return {
        **metrics,
        "folder": str(folder),
        "report": str(output / "any2any.png"),
        "seconds": round(time.time() - start, 1),
    }


def draw_generations(model, processor, path: Path, n: int = 12) -> None:
    """PNG: `n` held-out drawing requests, each with the image the model drew."""
    rows = list(make_dataset("generate", n, split="heldout"))
    images = processor.post_process_multimodal_output(generate_images(model, processor, rows), generation_mode="image")
    tile, columns = 128, 6
    canvas = Image.new("RGB", (columns * tile, ((n + columns - 1) // columns) * (tile + 34)), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (row, image) in enumerate(zip(rows, images)):
        x, y = (index % columns) * tile, (index // columns) * (tile + 34)
        canvas.paste(image.resize((tile - 8, tile - 8), Image.Resampling.NEAREST), (x + 4, y + 4))
        words = row["generation_caption"].split()
        draw.text((x + 4, y + tile - 2), " ".join(words[:3]), fill=(0, 0, 0))
        draw.text((x + 4, y + tile + 12), " ".join(words[3:]), fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def summary_lines(metrics: dict) -> list[str]:
    """The held-out figures of an any-to-any run as report lines (accuracy against chance)."""
    lines = []
    for name in ("shape", "colour"):
        lines.append(
            f"  drawn images, {name:<7} {metrics.get(f'image/{name}', 0) * 100:6.1f}%  "
            f"(chance {CHANCE[name] * 100:.0f}%, generator from the caption "
            f"{metrics.get(f'reference/{name}', 0) * 100:.1f}%, judge on real images "
            f"{metrics.get(f'judge/{name}', 0) * 100:.1f}%)"
        )
    lines.append(f"  colour by pixels         {metrics.get('image/colour_pixels', 0) * 100:6.1f}%")
    lines.append(
        f"  signal tokens emitted    {metrics.get('image/emission', 0) * 100:6.1f}% of drawing requests, "
        f"{metrics.get('text/signal_rate', 0) * 100:.1f}% of questions"
    )
    lines.append(f"  questions, exact match   {metrics.get('accuracy/overall', 0) * 100:6.1f}%")
    return lines


__all__ = ["draw_generations", "run_any2any", "summary_lines"]
