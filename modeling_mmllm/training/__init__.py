"""Training (library side): recipes on TRL, one file per job.

`recipes` (`RecipeConfig` for SFT, `DPORecipeConfig` for DPO, `GRPORecipeConfig` for GRPO: the typed keys,
loading, overrides, `--help`), `model_setup` (building or loading the model, freezing, LoRA), `collator`, `rewards`
(GRPO's verifiable rewards), `trainer` (`MMLLMTrainer`, `MMLLMDPOTrainer`, `MMLLMGRPOTrainer`),
`generator_pretraining` (the built-in image generator) and `runner` (a recipe end to end: resume, evaluation, the
final folder, the push).
"""

from .recipes import (
    DPORecipeConfig,
    GRPORecipeConfig,
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
    "GRPORecipeConfig",
    "RecipeConfig",
    "load_recipe",
    "parse_overrides",
    "recipe_help",
    "recipe_path",
    "recipe_trainer",
    "save_stage",
    "train",
]
