"""Training recipes: one YAML file describes a stage; TRL's `SFTTrainer` runs it (library side).

A recipe is flat YAML: the keys below, and any `trl.SFTConfig` field (`output_dir`, `max_steps`, `learning_rate`,
`push_to_hub`, `hub_model_id`, ...), which go to TRL unchanged.

    model:   {preset: NAME, overrides: {...}} | {path: FOLDER} | {components: {vision, text, projector, ...}}
             | {mplug_owl2: ORIGINAL_FOLDER}; with `path`: attn_implementation, dtype, device_map,
             quantization (4bit = QLoRA with `lora`, 8bit); any of them with
             image_generation: {output_projector_type, num_signal_tokens, modality_generator, output_projector_config}
             (NExT-GPT's output side added to the loaded model: `enable_image_generation`)
    data:    {synthetic: TASK, n: N, image_size: S} | {dataset: NAME_OR_PATH, split: train}
             | {llava_json: FILE, image_folder: DIR, task: chat | generate (captions -> images)}
    bad_rows: stop | skip            rows whose image is missing or corrupt (default stop)
    freeze:  [vision_tower, multi_modal_projector, language_model, output_projector, modality_generator]
             (a recipe that enables image generation and names no `freeze` trains the output projector alone)
    train_modality_adaptive: true    keep the modality-adaptive branches trainable inside a frozen LLM
    train_signal_tokens: true        with `language_model` frozen, the signal tokens' rows of the input embeddings
                                     and the LM head still train, every other row stays bit-identical (the default
                                     for models that generate images; LoRA runs use PEFT's trainable tokens)
    signal_embedding_lr_scale: 0.01  learning-rate scale of those input-embedding rows (new rows trained at full rate
                                     outgrow the trained ones and drown the prompt at the signal positions)
    whiten_signal_states: 512        the output projector's input layer starts as a whitening of the frozen LLM's
                                     signal-token states (estimated on that many training rows) and stays fixed
    generator_pretraining: {steps, learning_rate, batch_size, n, data}   train the built-in image generator on
                                     (caption, image) pairs first (a diffusers generator comes pretrained)
    alignment_loss_weight: 1.0       MSE between the output projector's conditioning at the signal tokens and the
                                     generator's encoding of the row's `generation_caption` (NExT-GPT)
    image_loss_weight: 0.0           the generator's own loss against the row's `generation_image`
    vision_lr_decay: 0.9             layer-wise learning-rate decay on the vision encoder
    lora:    {r: 8, lora_alpha: 16, ...}   PEFT LoRA on the LLM (and its modality-adaptive branches)
    merge_lora: true                 also write the merged full model
    eval:    {synthetic: vqa, n: 200, split: heldout}   exact-match accuracy per question kind after training,
             written to the folder (`eval_results.json`) and its model card; rows that ask for an image
             (`synthetic: generate-joint`) are judged by an independent classifier (`image_judge`) instead
    chat_template: FILE              instead of the model's template

The final Hub-ready folder is `<output_dir>/model` (written to a temporary folder, then renamed); checkpoints are
`<output_dir>/checkpoint-N`, and a re-run resumes from the newest complete one. With `push_to_hub: true` the final
folder is uploaded to `hub_model_id` (`hub_private_repo` for a private repo); `hub_strategy: checkpoint` or
`all_checkpoints` also lets the Trainer push checkpoints while it trains.
"""

from dataclasses import fields
from pathlib import Path

import torch
import yaml
from trl import SFTConfig

RECIPE_KEYS = {
    "model",
    "data",
    "bad_rows",
    "freeze",
    "train_modality_adaptive",
    "vision_lr_decay",
    "lora",
    "merge_lora",
    "chat_template",
    "eval",
    "train_signal_tokens",
    "generator_pretraining",
    "alignment_loss_weight",
    "image_loss_weight",
    "signal_embedding_lr_scale",
    "whiten_signal_states",
}


SFT_FIELDS = {f.name for f in fields(SFTConfig)}


# Defaults that make a recipe run on a CPU unless it says otherwise.
SFT_DEFAULTS = {
    "report_to": "none",
    "save_strategy": "steps",
    "save_steps": 500,
    "logging_steps": 10,
    "assistant_only_loss": True,
    "max_length": None,
    "save_only_model": False,
}


CHECKPOINT_PUSHES = ("checkpoint", "all_checkpoints")


def recipe_path(name_or_path: str) -> Path:
    """A recipe file, or the name of one that ships in `training_recipes/`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    from ..builders.presets import asset_dir

    shipped = asset_dir("training_recipes") / f"{Path(name_or_path).stem}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in asset_dir("training_recipes").glob("*.yaml"))
    raise FileNotFoundError(f"No recipe {name_or_path!r}: give a YAML file or one of {', '.join(names)}.")


def load_recipe(name_or_path: str, overrides: dict | None = None) -> dict:
    """Read a recipe and apply `overrides` (`{"max_steps": 10, "model": "path"}`, dotted keys for nesting)."""
    recipe = yaml.safe_load(recipe_path(name_or_path).read_text()) or {}
    for key, value in (overrides or {}).items():
        if key == "model" and isinstance(value, str):
            value = {"path": value} if Path(value).is_dir() else {"preset": value}
        target, *rest = key.split(".")
        if rest:
            node = recipe.setdefault(target, {})
            for part in rest[:-1]:
                node = node.setdefault(part, {})
            node[rest[-1]] = value
        else:
            recipe[key] = value
    unknown = set(recipe) - RECIPE_KEYS - SFT_FIELDS
    if unknown:
        raise ValueError(f"Unknown recipe keys {sorted(unknown)}: use {sorted(RECIPE_KEYS)} or SFTConfig fields.")
    for required in ("model", "data", "output_dir"):
        if required not in recipe:
            raise ValueError(f"The recipe has no {required!r}: add it to the YAML or pass --{required}.")
    return recipe


def parse_overrides(arguments: list[str]) -> dict:
    """`["--max_steps", "10", "--model.preset", "owl2-tiny"]` -> `{"max_steps": 10, "model.preset": "owl2-tiny"}`."""
    overrides, index = {}, 0
    while index < len(arguments):
        key = arguments[index]
        if not key.startswith("--") or index + 1 >= len(arguments):
            raise ValueError(f"Expected `--key value` pairs after the recipe, got {arguments[index:]}.")
        overrides[key[2:]] = _parse_value(arguments[index + 1])
        index += 2
    return overrides


def _parse_value(text: str):
    """Numbers (`3e-3` too, which YAML reads as a string), booleans, lists and dicts; anything else is a string."""
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def sft_config(recipe: dict) -> SFTConfig:
    settings = {**SFT_DEFAULTS, **{k: v for k, v in recipe.items() if k in SFT_FIELDS}}
    if not torch.cuda.is_available():
        settings.update(use_cpu=True, bf16=False, fp16=False)
    if "gradient_checkpointing" not in settings:
        settings.setdefault("activation_checkpointing", False)  # SFTConfig turns it on by default; recipes opt in
    settings["dataset_kwargs"] = {**(settings.get("dataset_kwargs") or {}), "skip_prepare_dataset": True}
    settings["remove_unused_columns"] = False
    # The runner pushes the final Hub-ready folder itself; the Trainer pushes only checkpoints, when asked to.
    settings["push_to_hub"] = bool(settings.get("push_to_hub")) and settings.get("hub_strategy") in CHECKPOINT_PUSHES
    return SFTConfig(**settings)


__all__ = [
    "CHECKPOINT_PUSHES",
    "RECIPE_KEYS",
    "SFT_DEFAULTS",
    "SFT_FIELDS",
    "load_recipe",
    "parse_overrides",
    "recipe_path",
    "sft_config",
]
