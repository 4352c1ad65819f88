"""Training (library side): recipes on TRL, one file per job.

`recipes` (`RecipeConfig`: the typed keys, loading, overrides, `--help`), `model_setup` (building or loading the
model, freezing, LoRA), `collator`, `trainer` (`MMLLMTrainer`), `generator_pretraining` (the built-in image
generator) and `runner` (a recipe end to end: resume, evaluation, the final folder, the push).
"""

from .recipes import RecipeConfig, load_recipe, parse_overrides, recipe_help, recipe_path
from .runner import save_stage, train

__all__ = ["RecipeConfig", "load_recipe", "parse_overrides", "recipe_help", "recipe_path", "save_stage", "train"]
