"""`mmllm train`: run a training recipe (a YAML file or the name of a shipped one) with `--key value` overrides."""

import argparse
import json
from pathlib import Path

NAME = "train"
HELP = "train with a recipe (TRL's SFTTrainer, DPOTrainer or GRPOTrainer)"
DESCRIPTION = (
    "Run a recipe; any recipe key or field of the trainer's config (SFTConfig, DPOConfig, GRPOConfig) can be "
    "overridden: "
    "--max_steps 10 --output_dir runs/x --model FOLDER_OR_PRESET --data.synthetic TASK --data.n 64 (a source named "
    "on the command line replaces the recipe file's). `mmllm train RECIPE --help` lists every key with its help text "
    "and default, and every synthetic task."
)


def add_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("recipe", help="recipe YAML file, or the name of one in training_recipes/")
    command.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value pairs")


def run(args: argparse.Namespace) -> None:
    """Run a training recipe (a YAML file or the name of a shipped one) with `--key value` overrides."""
    from accelerate import PartialState

    from ..training import load_recipe, parse_overrides, recipe_help, recipe_trainer
    from ..training import train as run_recipe

    if {"-h", "--help"} & set(args.overrides):
        print(recipe_help(recipe_trainer(args.recipe)))
        return
    recipe = load_recipe(args.recipe, parse_overrides(args.overrides))
    folder = run_recipe(recipe, name=Path(args.recipe).stem)
    state = PartialState()  # the trainer's: one process, or this rank of a torchrun
    state.destroy_process_group()  # a rank that exits still in its group can abort (gloo: "terminate called")
    if not state.is_main_process:  # the main process reports, once
        return
    results = folder / "eval_results.json"
    if results.is_file():  # the recipe's held-out evaluation (also in the model card), "before -> after" for DPO, GRPO
        metrics = json.loads(results.read_text())
        for name, value in metrics.items():
            if not name.startswith("before/"):
                shown = "{:.3f}" if name.startswith("reward/") else "{:.1%}"  # rewards are no fractions
                before = metrics.get(f"before/{name}")
                change = f"{shown.format(before)} -> " if before is not None else ""
                print(f"{name:<26}{change}{shown.format(value)}")
    print(f"model folder: {folder}")
