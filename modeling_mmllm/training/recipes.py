"""Training recipes: one YAML file describes a stage, typed as `RecipeConfig` or `DPORecipeConfig` (library side).

The recipe's `trainer` key picks TRL's trainer: `sft` (the default: `RecipeConfig`, TRL's `SFTConfig` with mmllm's
keys added, the pattern of TRL's own configs) or `dpo` (the alignment stage: `DPORecipeConfig`, TRL's `DPOConfig`
with the same keys). Every key has a help text and a default, `mmllm train RECIPE --help` lists them, and a YAML key
that is neither an mmllm key nor a field of the trainer's config is an error that names the nearest valid key.
Sections (`model`, `data`, `eval`, `lora`, ...) are checked the same way (`check_keys`).

The final Hub-ready folder is `<output_dir>/model` (written to a temporary folder, then renamed); checkpoints are
`<output_dir>/checkpoint-N`, and a re-run resumes from the newest complete one. With `push_to_hub: true` the final
folder is uploaded to `hub_model_id` (`hub_private_repo` for a private repo); `hub_strategy: checkpoint` or
`all_checkpoints` also lets the Trainer push checkpoints while it trains.
"""

import difflib
import enum
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser
from trl import DPOConfig, SFTConfig

CHECKPOINT_PUSHES = ("checkpoint", "all_checkpoints")
FLAGS = ("--overwrite",)  # overrides that may stand alone (true)
TYPE_NAMES = {
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    str: "a string",
    dict: "a mapping ({key: value})",
    list: "a list ([a, b])",
}
TRAINERS = ("sft", "dpo")

MODEL_KEYS = {
    "preset": "a preset name (configuration/<name>.json), built with random weights",
    "overrides": "MMLLMConfig fields over the preset's",
    "path": "a saved model folder (a previous stage)",
    "components": "{vision, text, projector, ...}: pretrained encoder and LLM composed (`from_components`)",
    "mplug_owl2": "an original mPLUG-Owl2 folder, converted",
    "attn_implementation": "attention backend of a loaded folder (eager, sdpa, flash_attention_2)",
    "dtype": "dtype of a loaded folder (float32, bfloat16, ...)",
    "device_map": "device map of a loaded folder",
    "quantization": "4bit (QLoRA, with `lora`) or 8bit",
    "image_generation": "{output_projector_type, num_signal_tokens, modality_generator, output_projector_config}",
    "seed": "seed of the new weights (default 0)",
}
DATA_KEYS = {
    "synthetic": "a synthetic task: text, caption, vqa, yes-no, joint, text-eval, audio, detail, generate, "
    "generate-joint; preference pairs (DPO): preference, swatch-preference",
    "n": "number of synthetic rows (default 512)",
    "split": "dataset split, or train / heldout for synthetic data (default train)",
    "image_size": "synthetic image size (default 64)",
    "seed": "synthetic data seed (default 0)",
    "dataset": "a datasets name, a saved dataset folder or a json/jsonl/parquet file",
    "llava_json": "a LLaVA-style conversation file",
    "image_folder": "the folder its image names are relative to",
    "task": "llava_json: chat (the conversations) or generate (captions -> images)",
}


@dataclass
class MMLLMRecipeKeys:
    """mmllm's recipe keys; `RecipeConfig` adds them to `SFTConfig`, `DPORecipeConfig` to `DPOConfig` (listed first
    in `--help`)."""

    trainer: str = field(
        default="sft",
        metadata={
            "help": "TRL's trainer: sft (instruction tuning on `messages`) or dpo (preference tuning on "
            "`prompt` / `chosen` / `rejected` pairs, TRL's DPOTrainer; then every DPOConfig field is a recipe key).",
            "choices": list(TRAINERS),
        },
    )
    model: dict | None = field(
        default=None,
        metadata={
            "help": "The model: {preset: NAME} | {path: FOLDER} | {components: {vision, text, ...}} | "
            "{mplug_owl2: FOLDER}. Keys: " + "; ".join(f"{key}: {text}" for key, text in MODEL_KEYS.items())
        },
    )
    data: dict | None = field(
        default=None,
        metadata={
            "help": "The training data: {synthetic: TASK, n: N} | {dataset: NAME_OR_PATH, split: S} | "
            "{llava_json: FILE, image_folder: DIR, task: chat | generate}. Keys: "
            + "; ".join(f"{key}: {text}" for key, text in DATA_KEYS.items())
        },
    )
    bad_rows: str = field(
        default="stop",
        metadata={
            "help": "Rows whose image is missing or corrupt: stop (report them) or skip.",
            "choices": ["stop", "skip"],
        },
    )
    freeze: list[str] | None = field(
        default=None,
        metadata={
            "help": "Components to freeze: vision_tower, multi_modal_projector, language_model, "
            "output_projector, modality_generator (default: none; a recipe that adds image generation trains the "
            "output projector alone)."
        },
    )
    train_modality_adaptive: bool = field(
        default=False, metadata={"help": "Keep the modality-adaptive branches trainable inside a frozen LLM."}
    )
    train_cross_attention: bool | None = field(
        default=None,
        metadata={
            "help": "Keep the gated cross-attention blocks (gates included) trainable inside a frozen LLM; "
            "default: on for models with fusion='cross_attention' (Flamingo trains the blocks and the resampler)."
        },
    )
    train_signal_tokens: bool | None = field(
        default=None,
        metadata={
            "help": "With the LLM frozen, train the signal tokens' rows of the input embeddings and LM head "
            "(every other row stays bit-identical); default: on for models that generate images, without LoRA."
        },
    )
    signal_embedding_lr_scale: float = field(
        default=0.01,
        metadata={
            "help": "Learning-rate scale of those input-embedding rows (new rows at full rate outgrow the "
            "trained ones and drown the prompt)."
        },
    )
    whiten_signal_states: int | None = field(
        default=None,
        metadata={
            "help": "Start the output projector's input layer as a whitening of the frozen LLM's signal "
            "states, estimated on this many training rows, and keep it fixed."
        },
    )
    generator_pretraining: dict | None = field(
        default=None,
        metadata={
            "help": "{steps, learning_rate, batch_size, n, data, warmup_steps, seed, logging_steps}: train "
            "the built-in image generator on (caption, image) pairs first (a diffusers generator comes pretrained)."
        },
    )
    alignment_loss_weight: float = field(
        default=1.0,
        metadata={
            "help": "MSE between the output projector's conditioning and the generator's encoding of the "
            "row's generation_caption (NExT-GPT)."
        },
    )
    image_loss_weight: float = field(
        default=0.0, metadata={"help": "The generator's own loss against the row's generation_image."}
    )
    vision_lr_decay: float | None = field(
        default=None, metadata={"help": "Layer-wise learning-rate decay on the vision encoder (mPLUG-Owl2: 0.9)."}
    )
    lora: dict | None = field(
        default=None,
        metadata={
            "help": "PEFT LoRA on the LLM and its modality-adaptive branches: {r: 8, lora_alpha: 16, ...} "
            "(any peft.LoraConfig field)."
        },
    )
    merge_lora: bool = field(
        default=False, metadata={"help": "Also write the merged full model (<output_dir>/merged)."}
    )
    eval: dict | None = field(
        default=None,
        metadata={
            "help": "Held-out data (a `data` section) scored after training: exact match per question kind, "
            "judged images for generation rows; for preference pairs the preference rate and the exact match of "
            "the chosen answers, before and after training; written to eval_results.json and the model card."
        },
    )
    eval_tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": "lmms-eval tasks or groups (e.g. [mmllm_pope, mmllm_mme], or mmllm_offline) run on the saved "
            "folder after training (needs mmllm[eval]); scores join eval_results.json and the card's model-index, "
            "lmms-eval's results JSON goes to <output_dir>/lmms_eval."
        },
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "A Jinja chat template file used instead of the model's template."}
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Train from the start even when output_dir holds a finished stage or checkpoints (they are "
            "removed; the final folder is replaced once the new one is complete). Without it a finished stage is "
            "reported and left as it is, and an unfinished one resumes."
        },
    )


class RecipeDefaults:
    """What both recipe configs do on top of TRL's: CPU-safe precision and the runner's own push."""

    def __post_init__(self):
        if self.bad_rows not in ("stop", "skip"):
            raise ValueError(f"bad_rows={self.bad_rows!r}: use stop (report the rows) or skip (leave them out).")
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer={self.trainer!r}: use one of {', '.join(TRAINERS)}.")
        if not torch.cuda.is_available():
            self.use_cpu, self.bf16, self.fp16 = True, False, False
        super().__post_init__()

    def trainer_args(self):
        """These settings as the Trainer gets them: it pushes checkpoints only (the runner pushes the final
        folder itself)."""
        return replace(self, push_to_hub=self.push_to_hub and self.hub_strategy in CHECKPOINT_PUSHES)


@dataclass
class RecipeConfig(RecipeDefaults, SFTConfig, MMLLMRecipeKeys):
    """A training recipe: `SFTConfig` plus mmllm's keys, with defaults that run on a CPU.

    Without a CUDA device the run trains on the CPU in float32 (`bf16`/`fp16` of a GPU recipe are switched off),
    so every shipped recipe also runs on a laptop. `push_to_hub` uploads the final folder once; the Trainer pushes
    checkpoints only with `hub_strategy: checkpoint | all_checkpoints`.
    """

    assistant_only_loss: bool = field(
        default=True, metadata={"help": "Compute the loss on the assistant's answers only."}
    )
    max_length: int | None = field(default=None, metadata={"help": "Truncate rows to this many tokens (no limit)."})
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing (off unless asked for)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator reads the image and generation columns."}
    )

    def __post_init__(self):
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}  # the collator does it
        super().__post_init__()


@dataclass
class DPORecipeConfig(RecipeDefaults, DPOConfig, MMLLMRecipeKeys):
    """A preference-tuning recipe (`trainer: dpo`): `DPOConfig` plus mmllm's keys, with the same CPU defaults.

    The reference model is the starting model: a frozen copy, or with `lora` the base model under the adapter (no
    copy). `beta`, `loss_type` (sigmoid, ipo, apo_zero, ...), `max_length`, `precompute_ref_log_probs` and every
    other `DPOConfig` field are recipe keys.
    """

    trainer: str = field(
        default="dpo", metadata={"help": "TRL's trainer: dpo here (see `trainer` above).", "choices": list(TRAINERS)}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Truncate prompt + answer to this many tokens (no limit)."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing (off unless asked for)."}
    )


RECIPE_KEYS = {f.name for f in fields(MMLLMRecipeKeys)}
# mmllm keys of the SFT stages only: the output side's losses and token rows (DPO scores text answers).
SFT_ONLY_KEYS = {
    "alignment_loss_weight",
    "image_loss_weight",
    "generator_pretraining",
    "signal_embedding_lr_scale",
    "train_signal_tokens",
    "whiten_signal_states",
}
CONFIGS = {"sft": RecipeConfig, "dpo": DPORecipeConfig}


def trl_config_name(config_class: type) -> str:
    """The TRL config a recipe config extends (`SFTConfig`, `DPOConfig`)."""
    return next(base.__name__ for base in config_class.__mro__ if base.__module__.startswith("trl."))


def check_keys(section: str, given, valid, listing: str | None = None, elsewhere: dict | None = None) -> None:
    """A clear error for keys of `given` that are not in `valid`, with the nearest valid key as the fix (and
    `listing`, or every valid key, as the menu); `elsewhere` maps keys valid in another setting to the hint that
    names it."""
    unknown = sorted(set(given) - set(valid))
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
        if key in (elsewhere or {}):
            hints.append(f"{key!r} {elsewhere[key]}")
        else:
            hints.append(f"{key!r} -> did you mean {close[0]!r}?" if close else f"{key!r} is no {section} key")
    menu = listing or f"Valid keys: {', '.join(sorted(valid))}."
    hint = "; ".join(hints)
    raise ValueError(f"Unknown {section} keys {unknown}: {hint}{'' if hint.endswith('?') else '.'} {menu}")


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


def read_yaml(path: Path) -> dict:
    """A recipe file's mapping, or a clear error naming the file and the line of a YAML mistake."""
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{path} is not valid YAML{where}: {problem}.") from None
    if recipe is not None and not isinstance(recipe, dict):
        raise ValueError(f"{path} is not a recipe: it must be a YAML mapping (model:, data:, output_dir:, ...).")
    return recipe or {}


def check_types(config_class: type, recipe: dict) -> dict:
    """The recipe with each value checked against its field's type: a value of the wrong kind
    (`learning_rate: fast`) is a clear error, and a number YAML reads as a string (`3e-3`) becomes a number."""
    hints = typing.get_type_hints(config_class)
    defaults = {f.name: f.default for f in fields(config_class)}
    return {key: _typed(key, value, hints.get(key), defaults.get(key)) for key, value in recipe.items()}


def _typed(key: str, value, hint, default):
    allowed = _plain_types(hint)
    if allowed is None or value is None and type(None) in allowed:
        return value
    if isinstance(value, bool):  # a bool is an int to Python, not to a recipe
        if bool in allowed:
            return value
    elif isinstance(value, tuple(allowed)):
        return value
    elif isinstance(value, str) and list in allowed:  # `--freeze vision_tower`: a list of one
        return [value]
    elif isinstance(value, (int, float, str)):
        for kind in (int, float, str):
            if kind in allowed and (converted := _convert(value, kind)) is not None:
                return converted
    names = " or ".join(TYPE_NAMES[kind] for kind in allowed if kind in TYPE_NAMES)
    example = f" (default: {default})" if default is not None and not isinstance(default, (dict, list)) else ""
    raise ValueError(f"{key}: {value!r} is not {names}: give {names}{example}.")


def _convert(value, kind: type):
    """`value` as `kind` when nothing is lost (`"3e-3"` -> 0.003, `4.0` -> 4, `7` -> "7"), else None."""
    try:
        converted = kind(value)
    except ValueError:
        return None
    if kind is int and isinstance(value, (float, str)) and float(value) != converted:
        return None
    return converted


def _plain_types(hint) -> set | None:
    """The plain types (None, bool, int, float, str, dict, list) a field's annotation admits; None when it admits
    something else too (checked by the config itself). An enum admits its string values."""
    if hint is None:
        return None
    kinds = set()
    for option in typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,):
        option = typing.get_origin(option) or option
        if isinstance(option, type) and issubclass(option, enum.Enum):
            option = str
        if option not in TYPE_NAMES and option is not type(None):
            return None
        kinds.add(option)
    return kinds


def load_recipe(name_or_path: str, overrides: dict | None = None) -> RecipeConfig | DPORecipeConfig:
    """Read a recipe, apply `overrides` (`{"max_steps": 10, "model": "path"}`, dotted keys for nesting) and type
    it as the config of its `trainer` (HfArgumentParser); unknown keys, top-level or inside a section, are errors."""
    recipe = read_yaml(recipe_path(name_or_path))
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
    trainer = recipe.setdefault("trainer", "sft")
    if trainer not in CONFIGS:
        raise ValueError(f"trainer: {trainer!r} is no trainer: use one of {', '.join(TRAINERS)}.")
    config_class = CONFIGS[trainer]
    if trainer == "dpo" and SFT_ONLY_KEYS & set(recipe):
        raise ValueError(
            f"{sorted(SFT_ONLY_KEYS & set(recipe))} apply to the SFT stages (image generation) only: drop them "
            "from this `trainer: dpo` recipe."
        )
    listing = (
        f"mmllm's keys are {', '.join(sorted(RECIPE_KEYS))}; any {trl_config_name(config_class)} field too "
        "(see `mmllm train R --help`)."
    )
    valid = RECIPE_KEYS | {f.name for f in fields(config_class)}
    elsewhere = {
        key: f"is a {trl_config_name(other)} key: set `trainer: {name}`"
        for name, other in CONFIGS.items()
        if other is not config_class
        for key in {f.name for f in fields(other)} - valid
    }
    check_keys("recipe", recipe, valid, listing, elsewhere)
    for required in ("model", "data", "output_dir"):
        if required not in recipe:
            raise ValueError(f"The recipe has no {required!r}: add it to the YAML or pass --{required}.")
    check_keys("model", recipe["model"], MODEL_KEYS)
    for section in ("data", "eval"):
        if recipe.get(section) is not None:
            check_keys(section, recipe[section], DATA_KEYS)
    if recipe.get("lora") is not None:
        from peft import LoraConfig

        check_keys("lora", recipe["lora"], {f.name for f in fields(LoraConfig)})
    (config,) = HfArgumentParser(config_class).parse_dict(check_types(config_class, recipe))
    return config


def recipe_help(trainer: str = "sft") -> str:
    """The `--help` of `mmllm train RECIPE`: every recipe key of the recipe's trainer with its help text and default
    (mmllm's first)."""
    config_class = CONFIGS[trainer]
    parser = HfArgumentParser(
        config_class,
        prog="mmllm train RECIPE",
        description="Recipe keys (in the YAML file, or as `--key value` overrides; `--section.key value` inside a "
        f"section). mmllm's keys come first, then TRL's {trl_config_name(config_class)} fields.",
    )
    return parser.format_help()


def recipe_trainer(name_or_path: str) -> str:
    """The `trainer` a recipe names (sft when it names none), read without checking the rest."""
    return read_yaml(recipe_path(name_or_path)).get("trainer", "sft")


def parse_overrides(arguments: list[str]) -> dict:
    """`["--max_steps", "10", "--model.preset", "owl2-tiny"]` -> `{"max_steps": 10, "model.preset": "owl2-tiny"}`;
    `--overwrite` may stand alone."""
    overrides, index = {}, 0
    while index < len(arguments):
        key = arguments[index]
        if key in FLAGS and (index + 1 == len(arguments) or arguments[index + 1].startswith("--")):
            overrides[key[2:]], index = True, index + 1  # `--overwrite` alone
            continue
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


__all__ = [
    "CHECKPOINT_PUSHES",
    "CONFIGS",
    "DATA_KEYS",
    "MODEL_KEYS",
    "RECIPE_KEYS",
    "SFT_ONLY_KEYS",
    "TRAINERS",
    "DPORecipeConfig",
    "MMLLMRecipeKeys",
    "RecipeConfig",
    "RecipeDefaults",
    "check_keys",
    "load_recipe",
    "parse_overrides",
    "recipe_help",
    "recipe_path",
    "recipe_trainer",
]
