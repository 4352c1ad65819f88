"""Training recipes: one YAML file describes a stage; TRL's `SFTTrainer` runs it (library side).

A recipe is flat YAML: the keys below, and any `trl.SFTConfig` field (`output_dir`, `max_steps`, `learning_rate`,
`push_to_hub`, `hub_model_id`, ...), which go to TRL unchanged.

    model:   {preset: NAME, overrides: {...}} | {path: FOLDER} | {components: {vision, text, projector, ...}}
             | {mplug_owl2: ORIGINAL_FOLDER}; with `path`: attn_implementation, dtype, device_map,
             quantization (4bit = QLoRA with `lora`, 8bit)
    data:    {synthetic: TASK, n: N, image_size: S} | {dataset: NAME_OR_PATH, split: train}
             | {llava_json: FILE, image_folder: DIR}
    bad_rows: stop | skip            rows whose image is missing or corrupt (default stop)
    freeze:  [vision_tower, multi_modal_projector, language_model]
    train_modality_adaptive: true    keep the modality-adaptive branches trainable inside a frozen LLM
    vision_lr_decay: 0.9             layer-wise learning-rate decay on the vision encoder
    lora:    {r: 8, lora_alpha: 16, ...}   PEFT LoRA on the LLM (and its modality-adaptive branches)
    merge_lora: true                 also write the merged full model
    eval:    {synthetic: vqa, n: 200, split: heldout}   exact-match accuracy per question kind after training,
             written to the folder (`eval_results.json`) and its model card
    chat_template: FILE              instead of the model's template

The final Hub-ready folder is `<output_dir>/model` (written to a temporary folder, then renamed); checkpoints are
`<output_dir>/checkpoint-N`, and a re-run resumes from the newest complete one. With `push_to_hub: true` the final
folder is uploaded to `hub_model_id` (`hub_private_repo` for a private repo); `hub_strategy: checkpoint` or
`all_checkpoints` also lets the Trainer push checkpoints while it trains.
"""

import json
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from .configuration_mmllm import MMLLMConfig
from .data import load_training_data
from .modeling_mmllm import MMLLMForConditionalGeneration
from .presets import load_processor_preset
from .processing_mmllm import MMLLMProcessor
from .saving import atomic_folder, save_model_folder, write_adapter_card

RECIPE_KEYS = {"model", "data", "bad_rows", "freeze", "train_modality_adaptive", "vision_lr_decay", "lora",
               "merge_lora", "chat_template", "eval"}
SFT_FIELDS = {f.name for f in fields(SFTConfig)}
COMPONENTS = ("vision_tower", "multi_modal_projector", "language_model")
# Defaults that make a recipe run on a CPU unless it says otherwise.
SFT_DEFAULTS = {"report_to": "none", "save_strategy": "steps", "save_steps": 500, "logging_steps": 10,
                "assistant_only_loss": True, "max_length": None, "save_only_model": False}
HISTORY_FILE = "training_history.json"
CHECKPOINT_PUSHES = ("checkpoint", "all_checkpoints")


def recipe_path(name_or_path: str) -> Path:
    """A recipe file, or the name of one that ships in `training_recipes/`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    from .presets import asset_dir

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


def build_model(spec: dict) -> tuple[MMLLMForConditionalGeneration, MMLLMProcessor]:
    """The recipe's model and processor: a preset, a saved folder (a previous stage), or pretrained components."""
    if "preset" in spec:
        config = MMLLMConfig.from_preset(spec["preset"], **spec.get("overrides", {}))
        processor = load_processor_preset(MMLLMProcessor, spec["preset"], config)
        torch.manual_seed(spec.get("seed", 0))
        return MMLLMForConditionalGeneration(config), processor
    if "path" in spec:
        folder = Path(spec["path"])
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a model folder (no config.json): train the previous stage first.")
        model = MMLLMForConditionalGeneration.from_pretrained(folder, **load_kwargs(spec))
        return model, MMLLMProcessor.from_pretrained(folder)
    if "mplug_owl2" in spec:
        from .conversion import from_mplug_owl2

        model, processor = from_mplug_owl2(spec["mplug_owl2"])
        if processor is None:
            raise ValueError(f"{spec['mplug_owl2']} has no tokenizer: training needs one.")
        return model, processor
    if "components" in spec:
        components = dict(spec["components"])
        return MMLLMForConditionalGeneration.from_components(components.pop("vision"), components.pop("text"),
                                                             **components)
    raise ValueError("The recipe's model needs one of `preset`, `path` or `components`.")


def load_kwargs(spec: dict) -> dict:
    """`from_pretrained` options of a model spec: attention backend, dtype, device map, 4/8-bit quantization."""
    kwargs = {key: spec[key] for key in ("attn_implementation", "dtype", "device_map") if key in spec}
    if spec.get("quantization"):
        from transformers import BitsAndBytesConfig

        bits = {"4bit": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16,
                         "bnb_4bit_use_double_quant": True}, "8bit": {"load_in_8bit": True}}
        if spec["quantization"] not in bits:
            raise ValueError(f"quantization={spec['quantization']!r}: use 4bit (QLoRA) or 8bit.")
        # The vision tower and the projector stay in full precision; only the LLM is quantized.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            **bits[spec["quantization"]], llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"])
    return kwargs


def apply_freeze_policy(model: nn.Module, recipe: dict) -> None:
    """Freeze the named components; optionally keep the modality-adaptive branches trainable."""
    frozen = recipe.get("freeze") or []
    unknown = set(frozen) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"Unknown components to freeze {sorted(unknown)}: choose from {list(COMPONENTS)}.")
    for name in frozen:
        getattr(model.model, name).requires_grad_(False)
        if name == "language_model":
            model.lm_head.requires_grad_(False)
    if recipe.get("train_modality_adaptive"):
        for parameter in model.modality_adaptive_parameters():
            parameter.requires_grad_(True)


def lora_config(model: MMLLMForConditionalGeneration, settings: dict):
    """PEFT LoRA on every linear layer of the LLM (its modality-adaptive branches included); projector trained."""
    from peft import LoraConfig

    targets = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.startswith("model.language_model.")]
    return LoraConfig(**{"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": targets,
                         "modules_to_save": ["multi_modal_projector"], **settings})


class MultimodalCollator(DataCollatorForVisionLanguageModeling):
    """TRL's vision collator, plus: rows with an `audio` column (clips as `{"array", "sampling_rate"}`) get their
    clips into the first user message, and placeholder tokens (every non-text modality) never count in the loss."""

    def torch_call(self, examples):
        examples = [self._with_audio_parts(example) for example in examples]
        batch = super().torch_call(examples)
        batch["labels"][batch["mm_token_type_ids"] != 0] = -100
        return batch

    def _with_audio_parts(self, example: dict) -> dict:
        """Typed content for the first user message: image placeholders (TRL fills them), then the audio clips."""
        clips = example.get("audio") or []
        if not clips:
            return example
        rate = self.processor.audio_features.sampling_rate
        for clip in clips:
            if clip["sampling_rate"] != rate:
                raise ValueError(f"An audio clip is sampled at {clip['sampling_rate']} Hz but the audio encoder "
                                 f"expects {rate} Hz: resample the dataset first (datasets' cast_column).")
        messages = [dict(message) for message in example["messages"]]
        user = next(message for message in messages if message["role"] == "user")
        user["content"] = [*({"type": "image"} for _ in example.get("images") or []),
                           *({"type": "audio", "audio": np.asarray(clip["array"], dtype=np.float32)} for clip in clips),
                           {"type": "text", "text": user["content"]}]
        return {**example, "messages": messages}


class MMLLMTrainer(SFTTrainer):
    """`SFTTrainer` with layer-wise learning-rate decay on the vision encoder (mPLUG-Owl2, BEiT-style)."""

    def __init__(self, *args, vision_lr_decay: float | None = None, **kwargs):
        self.vision_lr_decay = vision_lr_decay
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.vision_lr_decay is None or self.optimizer is not None:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        scales = vision_lr_scales(model, self.vision_lr_decay)
        decay_names = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[float, float], list] = {}
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                key = (scales.get(name, 1.0), self.args.weight_decay if name in decay_names else 0.0)
                groups.setdefault(key, []).append(parameter)
        param_groups = [{"params": params, "lr": self.args.learning_rate * scale, "weight_decay": decay}
                        for (scale, decay), params in groups.items()]
        optimizer_class, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_class(param_groups, **optimizer_kwargs)
        return self.optimizer


def vision_lr_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """Learning-rate scale per vision parameter: `decay ** (depth from the top)`; embeddings get the smallest."""
    vision_config = model.config.vision_config
    num_layers = vision_config.num_hidden_layers
    scales = {}
    for name, _ in model.named_parameters():
        if ".vision_tower." not in f".{name}":
            continue
        marker = ".layers."
        if marker in name:
            layer = int(name.split(marker)[1].split(".")[0])
            scales[name] = decay ** (num_layers - layer)
        elif "embeddings" in name or "pre_layrnorm" in name:
            scales[name] = decay ** (num_layers + 1)
    return scales


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose files were all written (a killed run can leave a half-written one)."""
    needed = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    for checkpoint in checkpoints:
        has_weights = any(checkpoint.glob("*.safetensors"))
        if has_weights and all((checkpoint / name).is_file() for name in needed):
            return checkpoint
    return None


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


def train(recipe: dict, name: str = "recipe", callbacks: list | None = None) -> Path:
    """Run one training stage; returns the Hub-ready output folder (`<output_dir>/model`).

    `callbacks` are `transformers.TrainerCallback`s added to the trainer (metrics, early stopping, probes).
    """
    args = sft_config(recipe)
    model, processor = build_model(recipe["model"])
    if recipe.get("chat_template"):
        processor.chat_template = Path(recipe["chat_template"]).read_text()
    apply_freeze_policy(model, recipe)
    dataset = load_training_data(recipe["data"], bad_rows=recipe.get("bad_rows", "stop"))
    collator = MultimodalCollator(processor=processor, max_length=args.max_length,
                                  assistant_only_loss=args.assistant_only_loss)
    trainer = MMLLMTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=processor, data_collator=collator,
        peft_config=lora_config(model, recipe["lora"]) if recipe.get("lora") is not None else None,
        vision_lr_decay=recipe.get("vision_lr_decay"), callbacks=callbacks,
    )
    output_dir = Path(args.output_dir)
    resume = last_complete_checkpoint(output_dir) if args.resume_from_checkpoint is None else args.resume_from_checkpoint
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    stage = {"recipe": name, "data": recipe["data"], "steps": result.global_step, "train_loss": result.training_loss,
             "frozen": recipe.get("freeze") or [], "lora": recipe.get("lora") is not None}
    if trainer.is_world_process_zero():
        metrics = evaluate_stage(trainer.model, processor, recipe["eval"]) if recipe.get("eval") else None
        final = save_stage(trainer, processor, output_dir, stage, merge_lora=recipe.get("merge_lora", False),
                           metrics=metrics)
        if recipe.get("push_to_hub"):
            push_folder(final, recipe.get("hub_model_id"), private=bool(recipe.get("hub_private_repo")))
    return output_dir / "model"


def evaluate_stage(model, processor: MMLLMProcessor, spec: dict) -> dict[str, float]:
    """Exact-match accuracy per question kind on the recipe's `eval` data (rows with `kind` and `answer`)."""
    from .evaluation import exact_match

    return {f"accuracy/{kind}": value for kind, value in exact_match(model, processor, load_training_data(spec)).items()}


def save_stage(trainer: SFTTrainer, processor: MMLLMProcessor, output_dir: Path, stage: dict,
               merge_lora: bool = False, metrics: dict | None = None) -> Path:
    """Write `<output_dir>/model` (and `/merged` for LoRA) atomically, with the training history and card.

    `trainer.save_model` gathers sharded weights (DeepSpeed ZeRO-3, FSDP) before writing.
    """
    model = trainer.model
    history = json.dumps(_history(model) + [stage], indent=2)
    target = output_dir / "model"
    _replace(target)
    with atomic_folder(target) as staging:
        (staging / HISTORY_FILE).write_text(history)  # before the save, so the model card lists the stages
        if metrics:
            (staging / "eval_results.json").write_text(json.dumps(metrics, indent=2))
        trainer.save_model(str(staging))  # weights, code and card; the processor too (the trainer's processing_class)
        (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle: not part of a Hub-ready folder
        write_adapter_card(model, staging)
    if merge_lora and hasattr(model, "merge_and_unload"):
        _replace(output_dir / "merged")
        save_model_folder(model.merge_and_unload(), processor, output_dir / "merged", extra_files={HISTORY_FILE: history})
    return target


def _replace(folder: Path) -> None:
    """A re-run replaces the previous run's final folder."""
    if folder.exists():
        shutil.rmtree(folder)


def _history(model) -> list:
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    path = Path(source) / HISTORY_FILE
    return json.loads(path.read_text()) if source and path.is_file() else []


def push_folder(folder: Path, repo_id: str | None, private: bool = False) -> str:
    """Upload a Hub-ready folder (weights, code, processor, card) to `repo_id`."""
    from huggingface_hub import HfApi

    if not repo_id:
        raise ValueError("push_to_hub needs hub_model_id (the Hub repo to create or update).")
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload mmllm model")
    return repo_id


__all__ = ["MultimodalCollator", "MMLLMTrainer", "load_recipe", "parse_overrides", "push_folder", "train"]
