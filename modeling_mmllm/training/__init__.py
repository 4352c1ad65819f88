"""Training (library side): recipes on TRL, one file per job.

`recipes` (`RecipeConfig` for SFT, `DPORecipeConfig` for DPO: the typed keys, loading, overrides, `--help`),
`model_setup` (building or loading the model, freezing, LoRA), `collator`, `trainer` (`MMLLMTrainer`,
`MMLLMDPOTrainer`), `generator_pretraining` (the built-in image generator) and `runner` (a recipe end to end: resume,
evaluation, the final folder, the push).
"""

from .recipes import (
    DPORecipeConfig,
    RecipeConfig,
    load_recipe,
    parse_overrides,
    recipe_help,
    recipe_path,
    recipe_trainer,
)
from .runner import save_stage, train

__all__ = [
    "DPORecipeConfig",
    "RecipeConfig",
    "load_recipe",
    "parse_overrides",
    "recipe_help",
    "recipe_path",
    "recipe_trainer",
    "save_stage",
    "train",
]
