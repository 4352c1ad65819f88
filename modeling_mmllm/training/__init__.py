"""Training (library side): recipes on TRL, one file per job.

`recipes` (the keys, loading, overrides, the SFTConfig), `model_setup` (building or loading the model, freezing,
LoRA), `collator`, `trainer` (`MMLLMTrainer`), `generator_pretraining` (the built-in image generator) and `runner`
(a recipe end to end: resume, evaluation, the final folder, the push).
"""

from .recipes import load_recipe, parse_overrides, recipe_path
from .runner import push_folder, save_stage, train

__all__ = ["load_recipe", "parse_overrides", "push_folder", "recipe_path", "save_stage", "train"]
