"""Training recipes: one YAML file describes a stage, typed as `RecipeConfig`, `DPORecipeConfig` or
`GRPORecipeConfig` (library side).

The recipe's `trainer` key picks TRL's trainer: `sft` (the default: `RecipeConfig`, TRL's `SFTConfig` with mmllm's
keys added, the pattern of TRL's own configs), `dpo` (preference alignment: `DPORecipeConfig`, TRL's `DPOConfig`
with the same keys) or `grpo` (reinforcement learning with verifiable rewards: `GRPORecipeConfig`, TRL's
`GRPOConfig` with the same keys and `reward_funcs`). Every key has a help text and a default, `mmllm train RECIPE
--help` lists them, and a YAML key that is neither an mmllm key nor a field of the trainer's config is an error that
names the nearest valid key.
Sections are checked the same way: `model`, `data` and `eval` are typed (`recipe_sections`: `ModelSection`,
`DataSection`, one field per key with its help and default), `lora` is PEFT's `LoraConfig` (`check_keys`).

The final Hub-ready folder is `<output_dir>/model` (written to a temporary folder, then renamed); checkpoints are
`<output_dir>/checkpoint-N`, and a re-run resumes from the newest complete one. With `push_to_hub: true` the final
folder is uploaded to `hub_model_id` (`hub_private_repo` for a private repo); `hub_strategy: checkpoint` or
`all_checkpoints` also lets the Trainer push checkpoints while it trains.
"""

import copy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser
from trl import DPOConfig, GRPOConfig, SFTConfig

from .recipe_sections import DATA_KEYS, MODEL_KEYS, DataSection, ModelSection, check_keys, check_types

CHECKPOINT_PUSHES = ("checkpoint", "all_checkpoints")
FLAGS = ("--overwrite",)  # overrides that may stand alone (true)
TRAINERS = ("sft", "dpo", "grpo")

SECTIONS = {"model": ModelSection, "data": DataSection, "eval": DataSection}  # typed (recipe_sections)


@dataclass
class MMLLMRecipeKeys:
    """mmllm's recipe keys; `RecipeConfig` adds them to `SFTConfig`, `DPORecipeConfig` to `DPOConfig` (listed first
    in `--help`)."""

    trainer: str = field(
        default="sft",
        metadata={
            "help": "TRL's trainer: sft (instruction tuning on `messages`), dpo (preference tuning on "
            "`prompt` / `chosen` / `rejected` pairs, TRL's DPOTrainer; then every DPOConfig field is a recipe key) or "
            "grpo (reinforcement learning on prompts scored by `reward_funcs`, TRL's GRPOTrainer; then every "
            "GRPOConfig field is a recipe key).",
            "choices": list(TRAINERS),
        },
    )
    model: dict | None = field(
        default=None,
        metadata={
            "help": "The model, from exactly one source: {preset: NAME} | {path: FOLDER} | "
            "{components: {vision, text, ...}} | {mplug_owl2: FOLDER}; `--model FOLDER_OR_PRESET` replaces the "
            "section. Keys: " + "; ".join(f"{key}: {text}" for key, text in MODEL_KEYS.items())
        },
    )
    data: dict | None = field(
        default=None,
        metadata={
            "help": "The training data, from exactly one source: {synthetic: TASK, n: N} | "
            "{dataset: NAME_OR_PATH, split: S} | {llava_json: FILE, image_folder: DIR, task: chat | generate}. Keys: "
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
        default=None,
        metadata={
            "help": "Layer-wise learning-rate decay on the vision encoder (mPLUG-Owl2: 0.9), applied on top of "
            "vision_tower_lr."
        },
    )
    vision_tower_lr: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the vision encoder (ms-swift's vit_lr); default: learning_rate."},
    )
    projector_lr: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the input projectors (image and audio; ms-swift's aligner_lr); default: "
            "learning_rate."
        },
    )
    lora: dict | None = field(
        default=None,
        metadata={
            "help": "PEFT LoRA: {r: 8, lora_alpha: 16, ...} (any peft.LoraConfig field), on the linear layers of "
            "`components` (default [language_model], its modality-adaptive branches included; also vision_tower, "
            "multi_modal_projector); `trained_fully` lists the components that train fully beside the adapters "
            "(default [multi_modal_projector]); the rest is frozen."
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

    def component_lrs(self) -> dict[str, float]:
        """The learning rates set per component (`vision_tower_lr`, `projector_lr`), by component name."""
        rates = {"vision_tower": self.vision_tower_lr, "projector": self.projector_lr}
        return {component: rate for component, rate in rates.items() if rate is not None}

    def trainer_args(self):
        """These settings as the Trainer gets them: it pushes checkpoints only (the runner pushes the final
        folder itself). A copy, not `replace`: TRL's `__post_init__` derives fields (GRPO's `generation_batch_size`)
        that it refuses to see set twice."""
        args = copy.copy(self)
        args.push_to_hub = self.push_to_hub and self.hub_strategy in CHECKPOINT_PUSHES
        return args


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


@dataclass
class GRPORecipeConfig(RecipeDefaults, GRPOConfig, MMLLMRecipeKeys):
    """A reinforcement-learning recipe (`trainer: grpo`): `GRPOConfig` plus mmllm's keys and `reward_funcs`, with
    the same CPU defaults.

    Each prompt gets `num_generations` sampled completions, scored by the rewards (`reward_weights` weigh them);
    GRPO raises the likelihood of the completions that score above their group's mean. The data is TRL's prompt
    format (`prompt` + `images` + `solution`, or any column a reward reads), or conversations, whose last
    assistant turn (or `answer` column) becomes the `solution`. `beta` > 0 adds a KL term to the starting model
    (TRL loads it again from its folder, or with LoRA it is the base model under the adapter).
    `num_generations`, `max_completion_length`, `temperature`, `loss_type`, `use_vllm` and every other
    `GRPOConfig` field are recipe keys.
    """

    trainer: str = field(
        default="grpo", metadata={"help": "TRL's trainer: grpo here (see `trainer` above).", "choices": list(TRAINERS)}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["exact_match"],
        metadata={
            "help": "The rewards, summed (weighted by reward_weights): exact_match (the answer equals the row's "
            "`solution`), numeric (the answer's number equals the solution's), format (<answer>...</answer>, "
            "optionally after <think>...</think>), or `package.module:function` (TRL's reward signature)."
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing (off unless asked for)."}
    )

    def __post_init__(self):
        from .rewards import resolve_reward

        if not self.reward_funcs:
            raise ValueError("reward_funcs is empty: name at least one reward (exact_match, numeric, format).")
        for name in self.reward_funcs:
            resolve_reward(name)
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} weight(s) for {len(self.reward_funcs)} reward(s) "
                f"({', '.join(self.reward_funcs)}): give one weight per reward."
            )
        super().__post_init__()


RECIPE_KEYS = {f.name for f in fields(MMLLMRecipeKeys)}
# mmllm keys of the SFT stages only: the output side's losses and token rows (DPO and GRPO score text answers).
SFT_ONLY_KEYS = {
    "alignment_loss_weight",
    "image_loss_weight",
    "generator_pretraining",
    "signal_embedding_lr_scale",
    "train_signal_tokens",
    "whiten_signal_states",
}
CONFIGS = {"sft": RecipeConfig, "dpo": DPORecipeConfig, "grpo": GRPORecipeConfig}


def trl_config(config_class: type) -> type:
    """The TRL config a recipe config extends (`SFTConfig`, `DPOConfig`, `GRPOConfig`)."""
    return next(base for base in config_class.__mro__ if base.__module__.startswith("trl."))


def trl_config_name(config_class: type) -> str:
    return trl_config(config_class).__name__


def mmllm_keys(config_class: type) -> set[str]:
    """mmllm's keys of a recipe config: the shared ones and the trainer's own (GRPO's `reward_funcs`)."""
    return RECIPE_KEYS | ({f.name for f in fields(config_class)} - {f.name for f in fields(trl_config(config_class))})


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


def drop_replaced_sources(recipe: dict, overrides: dict) -> None:
    """A source an override names (`--data.synthetic joint`, `--model.path FOLDER`) replaces the source the recipe
    file names for that section (its `llava_json`, its `preset`): a file names one source, the command line may pick
    another. Two sources in the file, or two in the overrides, remain an error."""
    for name, section in SECTIONS.items():
        named = {key.split(".")[1] for key in overrides if key.startswith(f"{name}.")} & set(section.SOURCES)
        if named and isinstance(recipe.get(name), dict):
            replaced = set(section.SOURCES) - named
            recipe[name] = {key: value for key, value in recipe[name].items() if key not in replaced}


def load_recipe(name_or_path: str, overrides: dict | None = None) -> RecipeConfig | DPORecipeConfig | GRPORecipeConfig:
    """Read a recipe, apply `overrides` (`{"max_steps": 10, "model": "path"}`, dotted keys for nesting) and type
    it as the config of its `trainer` (HfArgumentParser); unknown keys, top-level or inside a section, are errors."""
    recipe = read_yaml(recipe_path(name_or_path))
    drop_replaced_sources(recipe, overrides or {})
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
    if trainer != "sft" and SFT_ONLY_KEYS & set(recipe):
        raise ValueError(
            f"{sorted(SFT_ONLY_KEYS & set(recipe))} apply to the SFT stages (image generation) only: drop them "
            f"from this `trainer: {trainer}` recipe."
        )
    listing = (
        f"mmllm's keys are {', '.join(sorted(mmllm_keys(config_class)))}; any {trl_config_name(config_class)} "
        "field too (see `mmllm train R --help`)."
    )
    valid = RECIPE_KEYS | {f.name for f in fields(config_class)}
    owners: dict[str, list[str]] = {}  # a key of the other trainers' configs -> those trainers
    for name, other in CONFIGS.items():
        for key in {f.name for f in fields(other)} - valid if other is not config_class else ():
            owners.setdefault(key, []).append(name)
    elsewhere = {
        key: f"is a {' or '.join(trl_config_name(CONFIGS[name]) for name in names)} key: set "
        + " or ".join(f"`trainer: {name}`" for name in names)
        for key, names in owners.items()
    }
    check_keys("recipe", recipe, valid, listing, elsewhere)
    for required in ("model", "data", "output_dir"):
        if required not in recipe:
            raise ValueError(f"The recipe has no {required!r}: add it to the YAML or pass --{required}.")
    # The sections typed, checked and stored as plain dicts (TRL's to_dict() and to_json_string() need JSON values):
    # `data` and `eval` with every default filled in; `model` with the keys the recipe gives (it reads back as
    # written: `{preset: NAME}`), which `ModelSection.parse` completes where it is read.
    model = ModelSection.parse("model", recipe["model"])
    recipe["model"] = {key: getattr(model, key) for key in recipe["model"]}
    for section in ("data", "eval"):
        if recipe.get(section) is not None:
            recipe[section] = asdict(SECTIONS[section].parse(section, recipe[section]))
    if recipe.get("lora") is not None:
        from peft import LoraConfig

        check_keys("lora", recipe["lora"], {"components", "trained_fully"} | {f.name for f in fields(LoraConfig)})
    (config,) = HfArgumentParser(config_class).parse_dict(check_types(config_class, recipe))
    return config


def recipe_help(trainer: str = "sft") -> str:
    """The `--help` of `mmllm train RECIPE`: every recipe key of the recipe's trainer with its help text and default
    (mmllm's first)."""
    if trainer not in CONFIGS:
        raise ValueError(f"trainer: {trainer!r} is no trainer: use one of {', '.join(TRAINERS)}.")
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
    "SECTIONS",
    "SFT_ONLY_KEYS",
    "TRAINERS",
    "DPORecipeConfig",
    "DataSection",
    "GRPORecipeConfig",
    "MMLLMRecipeKeys",
    "ModelSection",
    "RecipeConfig",
    "RecipeDefaults",
    "check_keys",
    "check_types",
    "drop_replaced_sources",
    "load_recipe",
    "parse_overrides",
    "recipe_help",
    "recipe_path",
    "recipe_trainer",
]
