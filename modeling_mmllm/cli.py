"""The `mmllm` command line (library side)."""

import argparse
import sys
from pathlib import Path


def build(args: argparse.Namespace) -> None:
    """Build a randomly initialised model of a preset, with its processor, into a Hub-ready folder."""
    from .configuration_mmllm import MMLLMConfig
    from .modeling_mmllm import MMLLMForConditionalGeneration
    from .processing_mmllm import MMLLMProcessor
    from .saving import save_model_folder

    config = MMLLMConfig.from_preset(args.preset)
    model = MMLLMForConditionalGeneration(config)
    save_model_folder(model, MMLLMProcessor.from_preset(args.preset), args.output)
    print(f"saved {args.preset} ({model.num_parameters():,} parameters) to {args.output}")


def train(args: argparse.Namespace) -> None:
    """Run a training recipe (a YAML file or the name of a shipped one) with `--key value` overrides."""
    from .training import load_recipe, parse_overrides
    from .training import train as run_recipe

    recipe = load_recipe(args.recipe, parse_overrides(args.overrides))
    folder = run_recipe(recipe, name=Path(args.recipe).stem)
    print(f"model saved to {folder}")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="mmllm", description="Multimodal LLMs as Hub-native transformers models.")
    commands = root.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="build a preset into a Hub-ready model folder")
    build_parser.add_argument("--preset", required=True, help="preset name (configuration/<name>.json)")
    build_parser.add_argument("output", type=Path, help="folder to write (must not exist)")
    build_parser.set_defaults(run=build)
    train_parser = commands.add_parser("train", help="train with a recipe (TRL SFTTrainer)",
                                       description="Run a recipe; any recipe key or SFTConfig field can be "
                                       "overridden: --max_steps 10 --output_dir runs/x --model FOLDER_OR_PRESET")
    train_parser.add_argument("recipe", help="recipe YAML file, or the name of one in training_recipes/")
    train_parser.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value pairs")
    train_parser.set_defaults(run=train)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"mmllm {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
