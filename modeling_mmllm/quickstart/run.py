"""`mmllm quickstart`: the whole system on the embedded default, on a CPU, in minutes (library side).

Stage 0 (text) -> stage 1 (captions, LLM frozen) -> stage 2 (joint image + text instructions) through the shipped
recipes, held-out exact match per question kind and on the text-only facts, a Hub-ready folder, a fresh-process
reload through `pipeline(..., trust_remote_code=True)` answering a question about a new image, and a PNG with the
loss curves and held-out predictions. `--audio` and `--video` also train a tiny model of that modality from scratch
(recipes `audio-tiny-sft`, `video-tiny-sft`) and report its held-out exact match. With `--any2any`, the stage-2
model then learns to draw (NExT-GPT's output side, recipe `quickstart-any2any`): the images it draws for held-out
requests are judged by an independent classifier and shown in the PNG. With `--dpo`, the alignment stage (recipe
`quickstart-dpo`, TRL's DPOTrainer) starts from the stage-2 model: its held-out preference rate and exact match,
before and after, join the report. With `--grpo`, the reinforcement-learning stage (recipe `quickstart-grpo`, TRL's
GRPOTrainer, a verifiable reward) starts from the stage-2 model: held-out exact match and mean reward before and
after join the report, its reward and KL curves the PNG.
"""

import json
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..data.synthetic import QUESTIONS, make_dataset, random_scene, render
from ..evaluation.metrics import answer_questions, exact_match
from ..modeling_mmllm import MMLLMForConditionalGeneration
from ..processing_mmllm import MMLLMProcessor
from ..training import load_recipe, train
from ..training.recipe_sections import DataSection
from ..training.runner import HISTORY_FILE
from .any2any import run_any2any

STAGES = ("quickstart-stage0-text", "quickstart-stage1", "quickstart-stage2")
FAST = {"max_steps": 6, "save_steps": 100, "logging_steps": 2, "data.n": 64}
PASS_MARK = 0.90
FRESH_PROCESS = """
import json, sys
sys.modules["modeling_mmllm"] = None  # only the folder's own code may run
from PIL import Image
from transformers import pipeline
folder, image_path, question = sys.argv[1:4]
pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(image_path)},
                                         {"type": "text", "text": question}]}]
out = pipe(text=messages, generate_kwargs={"max_new_tokens": 12, "do_sample": False}, return_full_text=False)
print(json.dumps({"answer": out[0]["generated_text"].strip()}))
"""


def stage_losses(folder: Path) -> list[list[float]]:
    """The (step, loss) pairs of the stage that wrote `folder` (its training history: a stage finished by an earlier
    run, or resumed after a kill, keeps its whole curve)."""
    return json.loads((folder / HISTORY_FILE).read_text())[-1].get("losses", [])


def run_stage(
    name: str,
    output_dir: Path,
    fast: bool,
    curves: dict,
    model: Path | str | None = None,
    overwrite: bool = False,
    steps: int | None = None,
    overrides: dict | None = None,
) -> Path:
    """Train one shipped recipe into `output_dir` (a stage an earlier run finished is kept, unless `overwrite`);
    records its loss curve in `curves`. `steps` bounds the stage (and its synthetic data to what those steps
    read); `overrides` are further recipe keys."""
    overrides = {"output_dir": str(output_dir), "overwrite": overwrite, **(FAST if fast else {}), **(overrides or {})}
    if model is not None:
        overrides["model"] = str(model)
    if steps is not None:
        overrides["max_steps"] = steps
    recipe = load_recipe(name, overrides)
    if (fast or steps is not None) and recipe.eval:
        recipe.eval = asdict(replace(DataSection.parse("eval", recipe.eval), n=16))
    data = DataSection.parse("data", recipe.data)
    if steps is not None and data.synthetic is not None:
        recipe.data = asdict(replace(data, n=min(data.n, max(64, steps * recipe.per_device_train_batch_size))))
    folder = train(recipe, name=name)
    curves[name] = stage_losses(folder)
    return folder


def run_stages(
    output: Path, fast: bool, overwrite: bool = False, steps: int | None = None
) -> tuple[Path, dict[str, list]]:
    """Train the three stages (each bounded by `steps`, if given); returns the final folder and each stage's loss
    curve."""
    model, curves = None, {}
    for index, name in enumerate(STAGES):
        print(f"\n== stage {index}: {name} ==", flush=True)
        model = run_stage(name, output / f"stage{index}", fast, curves, model, overwrite, steps)
    return model, curves


# The other input modalities the quickstart can add (`--audio`, `--video`): the recipe, and what its task asks.
MODALITIES = {
    "audio": ("audio-tiny-sft", "beep counts and pitch"),
    "video": ("video-tiny-sft", "which colour appears first or second in a clip"),
}


def run_modality(name: str, output: Path, fast: bool, curves: dict) -> dict[str, float]:
    """A tiny model of another input modality (`MODALITIES`) trained from scratch by its recipe; returns its
    held-out exact match per question kind (the recipe's own evaluation)."""
    recipe, task = MODALITIES[name]
    print(f"\n== {name}: {recipe} ({task}) ==", flush=True)
    folder = run_stage(recipe, output / name, fast, curves)
    metrics = json.loads((folder / "eval_results.json").read_text())
    return {key.removeprefix("accuracy/"): value for key, value in metrics.items() if key.startswith("accuracy/")}


def run_anyres(output: Path, fast: bool) -> dict[str, float]:
    """The `anyres-detail` recipe twice on the same budget: llava-next-tiny (AnyRes tiles) and llava-tiny (one
    view); held-out accuracy on the colour of a small square in a wide image, for each."""
    accuracy = {}
    for label, preset in (("anyres", "llava-next-tiny"), ("single_view", "llava-tiny")):
        print(f"\n== resolution: anyres-detail on {preset} ==", flush=True)
        folder = run_stage("anyres-detail", output / "anyres" / label, fast, {}, model=preset)
        accuracy[label] = json.loads((folder / "eval_results.json").read_text())["accuracy/detail"]
    return accuracy


def write_summary(output: Path, summary: dict, demo: dict, folder: Path, image_accuracy: dict) -> None:
    """`summary.json` (the figures, the fresh-process demo and the model folder's absolute path), then the summary's
    first lines: the held-out image accuracy per question kind."""
    (output / "summary.json").write_text(
        json.dumps({**summary, "demo": demo, "folder": str(folder.resolve())}, indent=2)
    )
    print("\n== summary ==")
    for kind, value in sorted(image_accuracy.items()):
        print(f"  image questions, {kind:<9} {value * 100:6.1f}%")


def reload_and_answer(folder: Path, output: Path, script: str = FRESH_PROCESS) -> dict:
    """A new image, then a fresh Python process that knows nothing of mmllm answers a question about it (`script`
    prints a JSON object with the `answer`, and anything else it asked)."""
    rng = np.random.default_rng(20261122)
    scene = random_scene(rng)
    image_path = output / "new_image.png"
    render(scene, rng).save(image_path)
    question = QUESTIONS["colour"]
    run = subprocess.run(
        [sys.executable, "-c", script, str(folder), str(image_path), question],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if run.returncode != 0:
        raise RuntimeError(f"Reloading {folder} in a fresh process failed:\n{run.stderr[-2000:]}")
    reply = json.loads(run.stdout.strip().splitlines()[-1])
    return {
        "description": scene.describe(),
        "question": question,
        **reply,
        "expected": scene.answer("colour"),
        "image": str(image_path),
    }


def run_drawing(output: Path, folder: Path, fast: bool, curves: dict) -> dict[str, float]:
    """The any-to-any stage from the stage-2 folder; returns its held-out figures (judged drawings, emission)."""
    print("\n== any-to-any: quickstart-any2any (the stage-2 model learns to draw) ==", flush=True)
    results = run_any2any(output / "any2any", model=folder, fast=fast)
    curves["quickstart-any2any"] = stage_losses(Path(results["folder"]))
    return results


def run_preference(output: Path, folder: Path, fast: bool, curves: dict) -> dict[str, float]:
    """The DPO stage from the stage-2 folder; returns its held-out figures (`before/...` for the stage-2 model)."""
    print("\n== alignment: quickstart-dpo (preference pairs, TRL's DPOTrainer) ==", flush=True)
    aligned = run_stage("quickstart-dpo", output / "dpo", fast, curves, model=folder)
    return json.loads((aligned / "eval_results.json").read_text())


def run_reinforcement(output: Path, folder: Path, fast: bool, curves: dict) -> dict[str, float]:
    """The GRPO stage from the stage-2 folder; returns its held-out figures (`before/...` for the stage-2 model) and
    puts its reward and KL curves (not its loss, which GRPO keeps near zero) in `curves`."""
    print("\n== reinforcement learning: quickstart-grpo (verifiable rewards, TRL's GRPOTrainer) ==", flush=True)
    trained = run_stage("quickstart-grpo", output / "grpo", fast, curves, model=folder)
    stage = json.loads((trained / HISTORY_FILE).read_text())[-1]
    del curves["quickstart-grpo"]
    for key in ("reward", "kl"):
        curves[f"quickstart-grpo: {key}"] = stage[f"{key}_curve"]
    return json.loads((trained / "eval_results.json").read_text())


def append_panel(path: Path, panel: Path) -> None:
    """Put the image at `panel` under the one at `path` (the report grows by the drawings)."""
    with Image.open(path) as top, Image.open(panel) as bottom:
        canvas = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), "white")
        canvas.paste(top, (0, 0))
        canvas.paste(bottom, (0, top.height))
    canvas.save(path)


def draw_report(curves: dict[str, list], rows: list[dict], predictions: list[str], path: Path) -> None:
    """PNG: one curve per stage on top (its loss, or the figure its name gives after a colon: `NAME: reward`),
    held-out images with their predicted answers below."""
    width, plot_height, tile = 960, 220, 120
    columns = width // tile
    grid_rows = (len(rows) + columns - 1) // columns
    canvas = Image.new("RGB", (width, plot_height + grid_rows * (tile + 30) + 10), "white")
    draw = ImageDraw.Draw(canvas)
    colours = ((31, 119, 180), (255, 127, 14), (44, 160, 44))
    panel = width // len(curves)
    for index, (name, losses) in enumerate(curves.items()):
        left, top, right, bottom = index * panel + 30, 25, (index + 1) * panel - 10, plot_height - 20
        draw.rectangle((left, top, right, bottom), outline=(180, 180, 180))
        draw.text((left, 5), name if ":" in name else f"{name}: loss", fill=(0, 0, 0))
        if len(losses) > 1:
            steps, values = zip(*losses)
            top_value = max(values) or 1.0  # a KL curve starts at 0
            points = [
                (
                    left + (s - steps[0]) / max(1, steps[-1] - steps[0]) * (right - left),
                    bottom - v / top_value * (bottom - top),
                )
                for s, v in losses
            ]
            draw.line(points, fill=colours[index % 3], width=2)
            draw.text((left + 2, top + 2), f"{top_value:.2f}", fill=(90, 90, 90))
            draw.text((right - 60, bottom - 14), f"{values[-1]:.3f}", fill=(90, 90, 90))
    for index, (row, prediction) in enumerate(zip(rows, predictions)):
        x, y = (index % columns) * tile, plot_height + (index // columns) * (tile + 30)
        canvas.paste(row["images"][0].resize((tile - 10, tile - 10)), (x + 5, y))
        correct = prediction.lower() == row["answer"].lower()
        draw.text(
            (x + 5, y + tile - 8), f"{row['kind']}: {prediction}"[:20], fill=(0, 130, 0) if correct else (200, 0, 0)
        )
    canvas.save(path)


def run_quickstart(
    output: Path,
    fast: bool = False,
    audio: bool = False,
    video: bool = False,
    any2any: bool = False,
    anyres: bool = False,
    dpo: bool = False,
    grpo: bool = False,
    overwrite: bool = False,
) -> dict:
    """Run the main job; raises SystemExit(2) when held-out image (or audio, or video) accuracy is below the pass
    mark. The three stages an earlier run into `output` finished are kept (`overwrite`: trained again)."""
    start = time.time()
    output.mkdir(parents=True, exist_ok=True)
    folder, curves = run_stages(output, fast, overwrite)
    asked = {"audio": audio, "video": video}
    modalities = {name: run_modality(name, output, fast, curves) for name in MODALITIES if asked[name]}
    drawing = run_drawing(output, folder, fast, curves) if any2any else {}
    resolution = run_anyres(output, fast) if anyres else {}
    preference = run_preference(output, folder, fast, curves) if dpo else {}
    reinforcement = run_reinforcement(output, folder, fast, curves) if grpo else {}
    print("\n== evaluation on held-out data (no image shared with training) ==", flush=True)
    model, processor = MMLLMForConditionalGeneration.from_pretrained(folder), MMLLMProcessor.from_pretrained(folder)
    heldout = make_dataset("vqa", 40 if fast else 300, split="heldout")
    image_accuracy = exact_match(model, processor, heldout)
    text_accuracy = exact_match(model, processor, make_dataset("text-eval"))["overall"]
    sample = list(heldout.select(range(16)))
    draw_report(curves, sample, answer_questions(model, processor, sample), output / "quickstart.png")
    if drawing:
        append_panel(output / "quickstart.png", Path(drawing["report"]))
    print("\n== reload in a fresh process through pipeline(trust_remote_code=True) ==", flush=True)
    demo = reload_and_answer(folder, output)
    print(f"new image:   {demo['image']} ({demo['description']})")
    print(f"question:    {demo['question']}")
    print(f"answer:      {demo['answer']}")
    drawn = {name: value for name, value in drawing.items() if isinstance(value, float)}
    summary = {
        **{f"image/{k}": v for k, v in image_accuracy.items()},
        "text/facts": text_accuracy,
        **{f"{name}/{k}": v for name, accuracy in modalities.items() for k, v in accuracy.items()},
        **{f"any2any/{k}": v for k, v in drawn.items()},
        **{f"detail/{k}": v for k, v in resolution.items()},
        **{f"dpo/{k}": v for k, v in preference.items()},
        **{f"grpo/{k}": v for k, v in reinforcement.items()},
    }
    write_summary(output, summary, demo, folder, image_accuracy)
    print(f"  text-only facts           {text_accuracy * 100:6.1f}%")
    for name, accuracy in modalities.items():
        for kind, value in sorted(accuracy.items()):
            print(f"  {name} questions, {kind:<9} {value * 100:6.1f}%")
    for name, value in sorted(drawn.items()):
        print(f"  any-to-any, {name:<14} {value * 100:6.1f}%")
    for name, value in resolution.items():
        print(f"  small detail, {name:<12} {value * 100:6.1f}%")
    for name in ("preference_rate", "accuracy/overall") if preference else ():
        before, after = preference[f"before/{name}"] * 100, preference[name] * 100
        print(f"  dpo, {name:<21} {before:6.1f}% -> {after:.1f}%")
    if reinforcement:
        before, after = reinforcement["before/accuracy/overall"] * 100, reinforcement["accuracy/overall"] * 100
        print(f"  grpo, accuracy/overall     {before:6.1f}% -> {after:.1f}%")
        before, after = reinforcement["before/reward/mean"], reinforcement["reward/mean"]
        print(f"  grpo, reward/mean          {before:6.3f} -> {after:.3f}")
    print(f"  model folder              {folder}")
    print(f"  report                    {output / 'quickstart.png'}")
    print(f"  time                      {time.time() - start:.0f} s")
    print(f"accuracy: {image_accuracy['overall'] * 100:.1f}%")
    for name, accuracy in modalities.items():
        print(f"{name} accuracy: {accuracy['overall'] * 100:.1f}%")
    if drawing:
        print(
            f"drawing accuracy: shape {drawing['image/shape'] * 100:.1f}%, colour {drawing['image/colour'] * 100:.1f}%"
        )
    overall = {"images": image_accuracy["overall"], **{name: acc["overall"] for name, acc in modalities.items()}}
    if min(overall.values()) < PASS_MARK and not fast:
        figures = ", ".join(f"{name} {value * 100:.1f}%" for name, value in overall.items())
        print(
            f"error: held-out accuracy ({figures}) is below {PASS_MARK * 100:.0f}%: the run did not learn well enough.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return summary


__all__ = ["run_quickstart"]
