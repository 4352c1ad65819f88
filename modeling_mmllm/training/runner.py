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

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn import functional as F
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from ..builders.presets import load_processor_preset
from ..configuration_mmllm import MMLLMConfig
from ..data.loading import load_training_data
from ..export.saving import atomic_folder, save_model_folder, write_adapter_card
from ..modeling_mmllm import MMLLMForConditionalGeneration
from ..processing_mmllm import MMLLMProcessor

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
COMPONENTS = ("vision_tower", "multi_modal_projector", "language_model", "output_projector", "modality_generator")
IMAGE_GENERATION_KEYS = ("output_projector_type", "num_signal_tokens", "modality_generator", "output_projector_config")
# What a recipe that adds image generation freezes unless it says otherwise: all but the output projector
# (NExT-GPT's encoding-side alignment; the signal tokens' rows train too, see `train_signal_tokens`).
ALIGNMENT_FREEZE = ["vision_tower", "multi_modal_projector", "language_model", "modality_generator"]
GENERATOR_PRETRAINING = {
    "steps": 600,
    "learning_rate": 2e-3,
    "batch_size": 32,
    "n": 2000,
    "warmup_steps": 20,
    "data": None,
    "seed": 0,
    "logging_steps": 100,
}
# Learning-rate scale of the input embeddings while only their signal rows train: at the output projector's rate the
# new rows grow far beyond the trained ones and drown the prompt in the residual stream at the signal positions.
SIGNAL_EMBEDDING_LR_SCALE = 0.01
# Collated keys that carry generation targets to `MMLLMTrainer.compute_loss` (never model inputs).
GENERATION_TARGETS = ("generation_captions", "generation_pixel_values")
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
HISTORY_FILE = "training_history.json"
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


def build_model(spec: dict) -> tuple[MMLLMForConditionalGeneration, MMLLMProcessor]:
    """The recipe's model and processor: a preset, a saved folder (a previous stage), or pretrained components;
    with `image_generation`, NExT-GPT's output side is added (signal tokens, output projector, generator)."""
    model, processor = load_model(spec)
    if spec.get("image_generation") is not None:
        enable_generation(model, processor, spec["image_generation"], seed=spec.get("seed", 0))
    return model, processor


def enable_generation(
    model: MMLLMForConditionalGeneration, processor: MMLLMProcessor, settings: dict, seed: int = 0
) -> None:
    """`model.enable_image_generation(processor, **settings)` with the recipe's keys checked and a fixed seed; the
    signal tokens' input embeddings start as distinct samples (`sample_signal_embeddings`)."""
    unknown = set(settings) - set(IMAGE_GENERATION_KEYS)
    if unknown:
        raise ValueError(f"Unknown image_generation keys {sorted(unknown)}: use {list(IMAGE_GENERATION_KEYS)}.")
    torch.manual_seed(seed)
    model.enable_image_generation(processor, **settings)
    sample_signal_embeddings(model, model.config.signal_token_ids)


def sample_signal_embeddings(model: nn.Module, token_ids: list[int]) -> None:
    """Input embeddings of new tokens drawn from the distribution of the existing rows (their mean and covariance).

    Mean resizing starts every new row at (nearly) the mean embedding, so the k signal tokens begin identical: a
    frozen LLM then cannot tell `<gen_img_0>` from `<gen_img_1>` and emits the group only once their rows have moved
    far, which shifts the states the output projector reads. Distinct rows of the usual size avoid both.
    """
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        keep = torch.ones(weight.shape[0], dtype=torch.bool)
        keep[token_ids] = False
        rows = weight[keep.to(weight.device)].double().cpu()
        mean = rows.mean(0)
        covariance = torch.cov((rows - mean).T)
        covariance += 1e-6 * covariance.diagonal().mean() * torch.eye(len(mean), dtype=covariance.dtype)
        samples = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance).sample((len(token_ids),))
        weight[token_ids] = samples.to(weight)


def load_model(spec: dict) -> tuple[MMLLMForConditionalGeneration, MMLLMProcessor]:
    """The model and processor a recipe's `model` names, as they are stored (no components added)."""
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
        from ..builders.conversion import from_mplug_owl2

        model, processor = from_mplug_owl2(spec["mplug_owl2"])
        if processor is None:
            raise ValueError(f"{spec['mplug_owl2']} has no tokenizer: training needs one.")
        return model, processor
    if "components" in spec:
        components = dict(spec["components"])
        return MMLLMForConditionalGeneration.from_components(
            components.pop("vision"), components.pop("text"), **components
        )
    raise ValueError("The recipe's model needs one of `preset`, `path` or `components`.")


def load_kwargs(spec: dict) -> dict:
    """`from_pretrained` options of a model spec: attention backend, dtype, device map, 4/8-bit quantization."""
    kwargs = {key: spec[key] for key in ("attn_implementation", "dtype", "device_map") if key in spec}
    if spec.get("quantization"):
        from transformers import BitsAndBytesConfig

        bits = {
            "4bit": {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_compute_dtype": torch.bfloat16,
                "bnb_4bit_use_double_quant": True,
            },
            "8bit": {"load_in_8bit": True},
        }
        if spec["quantization"] not in bits:
            raise ValueError(f"quantization={spec['quantization']!r}: use 4bit (QLoRA) or 8bit.")
        # The vision tower and the projector stay in full precision; only the LLM is quantized.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            **bits[spec["quantization"]], llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"]
        )
    return kwargs


def frozen_components(recipe: dict) -> list[str]:
    """The recipe's `freeze` list; a recipe that adds image generation and names none trains the output projector
    alone (`ALIGNMENT_FREEZE`)."""
    if "freeze" in recipe:
        return list(recipe["freeze"] or [])
    model = recipe.get("model")
    return list(ALIGNMENT_FREEZE) if isinstance(model, dict) and model.get("image_generation") is not None else []


def apply_freeze_policy(model: nn.Module, recipe: dict) -> None:
    """Freeze the named components; optionally keep the modality-adaptive branches trainable."""
    frozen = frozen_components(recipe)
    unknown = set(frozen) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"Unknown components to freeze {sorted(unknown)}: choose from {list(COMPONENTS)}.")
    for name in frozen:
        component = getattr(model.model, name)
        if component is None:
            raise ValueError(
                f"The recipe freezes {name!r}, which this model does not have: drop it from `freeze` "
                "(or add image generation with `model: {image_generation: ...}`)."
            )
        if isinstance(component, nn.Module):  # a diffusers generator is no module: it is always frozen
            component.requires_grad_(False)
        if name == "language_model":
            model.lm_head.requires_grad_(False)
    if recipe.get("train_modality_adaptive"):
        for parameter in model.modality_adaptive_parameters():
            parameter.requires_grad_(True)


def signal_rows_train(model: MMLLMForConditionalGeneration, recipe: dict) -> bool:
    """Whether the signal tokens' embedding and LM-head rows train alone (`train_signal_tokens`): by default when
    the model has signal tokens, its LM head is frozen and there is no LoRA (which uses PEFT's trainable tokens)."""
    setting = recipe.get("train_signal_tokens")
    if setting and not model.config.signal_token_ids:
        raise ValueError(
            "train_signal_tokens needs signal tokens: add image generation with `model: {image_generation: ...}` first."
        )
    if setting is not None:
        return bool(setting) and not model.get_output_embeddings().weight.requires_grad
    return (
        bool(model.config.signal_token_ids)
        and recipe.get("lora") is None
        and not (model.get_output_embeddings().weight.requires_grad)
    )


def train_token_rows(model: nn.Module, token_ids: list[int]) -> set[str]:
    """Make rows `token_ids` of the input embeddings and of the LM head trainable while every other row stays
    bit-identical: the weights get gradients, masked to those rows by a hook (keep them out of weight decay).

    A frozen LM head cannot learn to emit new tokens; training only their rows is what teaches a frozen LLM the
    signal tokens. Returns the names of the row-masked parameters (a tied head is one parameter).
    """
    weights = {
        id(weight): weight for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    }
    for weight in weights.values():
        mask_gradient_rows(weight, token_ids)
    return {name for name, parameter in model.named_parameters() if id(parameter) in weights}


def mask_gradient_rows(weight: nn.Parameter, token_ids: list[int]) -> None:
    """Let `weight` train, with its gradient zeroed outside rows `token_ids` (a hook)."""
    rows = torch.zeros(weight.shape[0], 1, dtype=torch.bool, device=weight.device)
    rows[token_ids] = True
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad.masked_fill(~rows.to(grad.device), 0))


def mask_peft_head_rows(model: nn.Module, token_ids: list[int]) -> set[str]:
    """Under LoRA, the trainable copy of an untied LM head (`modules_to_save`) trains its signal rows only; PEFT's
    trainable tokens cannot wrap it (TRL's fused LM head reads the head's `weight` and `bias`). Returns their names."""
    names = set()
    for name, parameter in model.named_parameters():
        if ".lm_head.modules_to_save." in f".{name}" and name.endswith(".weight") and parameter.requires_grad:
            mask_gradient_rows(parameter, token_ids)
            names.add(name)
    return names


def embedding_lr_scales(model: nn.Module, scale: float) -> dict[str, float]:
    """`{name of the input embeddings' weight: scale}` (with a tied LM head, the scale covers its rows too)."""
    weight = model.get_input_embeddings().weight
    return {name: scale for name, parameter in model.named_parameters() if parameter is weight}


def lora_config(model: MMLLMForConditionalGeneration, settings: dict):
    """PEFT LoRA on every linear layer of the LLM (its modality-adaptive branches included); projector trained.

    With image generation, the output projector trains fully too, the signal tokens' input embeddings through PEFT's
    trainable tokens, and an untied LM head as a trainable copy whose other rows `mask_peft_head_rows` keeps fixed
    (both saved with the adapter, merged by `merge_and_unload`).
    """
    from peft import LoraConfig

    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("model.language_model.")
    ]
    defaults = {
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "modules_to_save": ["multi_modal_projector"],
    }
    if model.config.signal_token_ids:
        embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
        name = next(name for name, module in model.named_modules() if module is embeddings)
        defaults["trainable_token_indices"] = {name: list(model.config.signal_token_ids)}
        untied_head = ["lm_head"] if head.weight is not embeddings.weight else []
        defaults["modules_to_save"] = ["multi_modal_projector", "output_projector", *untied_head]
    return LoraConfig(**{**defaults, **settings})


@dataclass
class MultimodalCollator(DataCollatorForVisionLanguageModeling):
    """TRL's vision collator, plus: rows with an `audio` column (clips as `{"array", "sampling_rate"}`) get their
    clips into the first user message, and placeholder tokens (every non-text modality) never count in the loss.

    Image generation: an image part in an assistant turn (an image the model produces) is written as the signal
    tokens, and the `generation_caption` of each row that has one goes to the trainer as `generation_captions` (in
    row order); with `target_images`, their `generation_image`s too, as `generation_pixel_values` `[n, 3, H, W]` in
    `[0, 1]`. Target images are never input images.
    """

    target_images: bool = False

    def torch_call(self, examples):
        captions = [example.get("generation_caption") for example in examples]
        targets = [example.get("generation_image") for example, caption in zip(examples, captions) if caption]
        examples = [self._with_generated_images(self._with_audio_parts(example)) for example in examples]
        batch = super().torch_call(examples)
        batch["labels"][batch["mm_token_type_ids"] != 0] = -100
        if any(captions):
            batch["generation_captions"] = [caption for caption in captions if caption]
            if self.target_images:
                if any(image is None for image in targets):
                    raise ValueError(
                        "image_loss_weight needs the target image of every drawing request: give those rows "
                        "a generation_image, or set image_loss_weight to 0."
                    )
                batch["generation_pixel_values"] = pixel_tensor(targets)
        return batch

    def _with_generated_images(self, example: dict) -> dict:
        """Assistant image parts as text parts holding the signal tokens (what the chat template renders them as):
        TRL would count them as input images to fill."""
        messages = example["messages"]
        produced = any(
            isinstance(message["content"], list)
            and message["role"] == "assistant"
            and any(part["type"] == "image" for part in message["content"])
            for message in messages
        )
        if not produced:
            return example
        signal = "".join(self.processor.signal_tokens)
        if not signal:
            raise ValueError(
                "A row's assistant turn has an image part, but the processor has no signal tokens "
                "<gen_img_i>: add image generation to the model first (`model: {image_generation: ...}`)."
            )
        messages = [
            {
                **message,
                "content": [
                    {"type": "text", "text": signal} if part["type"] == "image" else part for part in message["content"]
                ],
            }
            if message["role"] == "assistant"
            else message
            for message in messages
        ]
        return {**example, "messages": messages}

    def _with_audio_parts(self, example: dict) -> dict:
        """Typed content for the first user message: image placeholders (TRL fills them), then the audio clips."""
        clips = example.get("audio") or []
        if not clips:
            return example
        rate = self.processor.audio_features.sampling_rate
        for clip in clips:
            if clip["sampling_rate"] != rate:
                raise ValueError(
                    f"An audio clip is sampled at {clip['sampling_rate']} Hz but the audio encoder "
                    f"expects {rate} Hz: resample the dataset first (datasets' cast_column)."
                )
        messages = [dict(message) for message in example["messages"]]
        user = next(message for message in messages if message["role"] == "user")
        user["content"] = [
            *({"type": "image"} for _ in example.get("images") or []),
            *({"type": "audio", "audio": np.asarray(clip["array"], dtype=np.float32)} for clip in clips),
            {"type": "text", "text": user["content"]},
        ]
        return {**example, "messages": messages}


def pixel_tensor(images: list) -> torch.Tensor:
    """PIL images -> `[n, 3, H, W]` in `[0, 1]` (all at the first image's size)."""
    size = images[0].size
    arrays = [np.asarray(image.convert("RGB").resize(size), dtype=np.float32) / 255 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def inner_model(model: nn.Module) -> nn.Module:
    """The `MMLLMModel` inside `model`, wherever wrappers put it (PEFT, DDP): the module TRL's fused LM head runs."""
    for module in model.modules():
        if hasattr(module, "signal_states") and hasattr(module, "language_model"):
            return module
    raise ValueError(f"No MMLLMModel inside {type(model).__name__}: the alignment loss needs an mmllm model.")


@contextmanager
def captured_hidden_states(module: nn.Module):
    """Record `last_hidden_state` of the first forward of `module` inside the block (the one with gradients)."""
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _args, output):
        captured.setdefault("hidden_states", output.last_hidden_state)

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


class MMLLMTrainer(SFTTrainer):
    """`SFTTrainer` with layer-wise learning-rate decay on the vision encoder (mPLUG-Owl2, BEiT-style) and
    NExT-GPT's output-side losses.

    TRL's fused LM head runs the inner `MMLLMModel` and never the model's `forward`, so the losses the model owns
    are added here: a forward hook keeps the inner model's last hidden states, the signal tokens' states go through
    the output projector, and the conditioning is compared with the generator's encoding of the captions
    (`alignment_loss_weight`, MSE) and, optionally, scored by the generator against the target images
    (`image_loss_weight`). Both are logged (`alignment_loss`, `image_loss`). `row_masked_parameters` (rows trained
    by `train_token_rows`) get no weight decay, so their frozen rows stay bit-identical.
    """

    def __init__(
        self,
        *args,
        vision_lr_decay: float | None = None,
        alignment_loss_weight: float = 1.0,
        image_loss_weight: float = 0.0,
        row_masked_parameters: set[str] | None = None,
        lr_scales: dict[str, float] | None = None,
        **kwargs,
    ):
        self.vision_lr_decay = vision_lr_decay
        self.alignment_loss_weight = alignment_loss_weight
        self.image_loss_weight = image_loss_weight
        self.row_masked_parameters = set(row_masked_parameters or ())
        self.lr_scales = dict(lr_scales or {})
        super().__init__(*args, **kwargs)

    def get_decay_parameter_names(self, model) -> list[str]:
        return [name for name in super().get_decay_parameter_names(model) if name not in self.row_masked_parameters]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = {key: inputs.pop(key) for key in GENERATION_TARGETS if key in inputs}
        if "generation_captions" not in targets or not (self.alignment_loss_weight or self.image_loss_weight):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inner = inner_model(model)
        with captured_hidden_states(inner) as captured:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        # Like TRL's MoE aux loss: a per-micro-batch mean, averaged over gradient accumulation steps.
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        loss = loss + self.generation_loss(inner, captured["hidden_states"], inputs["input_ids"], targets) / steps
        return (loss, result[1]) if return_outputs else loss

    def generation_loss(
        self, inner: nn.Module, hidden_states: torch.Tensor, input_ids: torch.Tensor, targets: dict
    ) -> torch.Tensor:
        """Weighted alignment (+ image) loss of the signal groups in the batch against the rows' targets."""
        captions = targets["generation_captions"]
        states = inner.signal_states(hidden_states, input_ids)
        if states.shape[0] != len(captions):
            raise ValueError(
                f"{len(captions)} row(s) of the batch have a generation_caption but {states.shape[0]} "
                "signal-token group(s) made it into the batch: every such row needs one assistant image "
                "part, and max_length must not cut the answer (raise max_length or set it to null)."
            )
        conditioning = inner.get_generation_conditioning(states)
        generator = inner.modality_generator
        mode = "train" if self.model.training else "eval"
        loss = conditioning.new_zeros(())
        if self.alignment_loss_weight:
            with torch.no_grad():
                target = generator.encode_prompt(captions, self.processing_class.tokenizer)
            alignment = F.mse_loss(conditioning.float(), target.to(conditioning.device).float())
            self._metrics[mode]["alignment_loss"].append(alignment.item())
            loss = loss + self.alignment_loss_weight * alignment
        if self.image_loss_weight:
            if "generation_pixel_values" not in targets:
                raise ValueError(
                    "image_loss_weight needs the target images: the rows need a generation_image column "
                    "and the collator target_images=True (train() sets it)."
                )
            image = generator.image_loss(conditioning, targets["generation_pixel_values"].to(conditioning.device))
            self._metrics[mode]["image_loss"].append(image.item())
            loss = loss + self.image_loss_weight * image
        return loss

    def create_optimizer(self, model=None):
        model = self.model if model is None else model
        scales = self.learning_rate_scales(model)
        if not scales or self.optimizer is not None:
            return super().create_optimizer(model)
        decay_names = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[float, float], list] = {}
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                key = (scales.get(name, 1.0), self.args.weight_decay if name in decay_names else 0.0)
                groups.setdefault(key, []).append(parameter)
        param_groups = [
            {"params": params, "lr": self.args.learning_rate * scale, "weight_decay": decay}
            for (scale, decay), params in groups.items()
        ]
        optimizer_class, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_class(param_groups, **optimizer_kwargs)
        return self.optimizer

    def learning_rate_scales(self, model: nn.Module) -> dict[str, float]:
        """Learning-rate scale per parameter name: the vision encoder's layer-wise decay and `lr_scales`."""
        scales = vision_lr_scales(model, self.vision_lr_decay) if self.vision_lr_decay is not None else {}
        return {**scales, **self.lr_scales}


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


def generation_pairs(spec: dict | None, n: int, tokenizer) -> tuple[list[str], torch.Tensor]:
    """(caption, image) pairs: `spec` is a recipe `data` section whose rows have `generation_caption` and
    `generation_image` (default: `n` synthetic `generate` rows of the train split)."""
    dataset = load_training_data(spec or {"synthetic": "generate", "n": n, "image_size": 64})
    missing = {"generation_caption", "generation_image"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"generator_pretraining data needs {sorted(missing)} columns (e.g. `synthetic: generate`).")
    dataset = dataset.filter(lambda caption: bool(caption), input_columns="generation_caption")
    return list(dataset["generation_caption"]), pixel_tensor(list(dataset["generation_image"]))


def check_caption_lengths(captions: list[str], tokenizer, settings: dict) -> None:
    """The built-in generator cuts captions at `condition_length` tokens: refuse captions it would cut."""
    longest = max(len(tokenizer(caption, add_special_tokens=False)["input_ids"]) for caption in set(captions))
    if longest > settings["condition_length"]:
        raise ValueError(
            f"Captions run to {longest} tokens but the built-in generator reads "
            f"condition_length={settings['condition_length']}: raise modality_generator.condition_length "
            f"to at least {longest}."
        )


def whitened_layer(model: MMLLMForConditionalGeneration) -> nn.Linear:
    """The output projector's input layer (a Linear on the LLM's hidden states), which `whiten_signal_states`
    fits and then keeps fixed."""
    hidden_size = model.config.text_config.hidden_size
    layer = next(
        (
            module
            for module in inner_model(model).output_projector.modules()
            if isinstance(module, nn.Linear) and module.in_features == hidden_size
        ),
        None,
    )
    if layer is None:
        raise ValueError(
            "whiten_signal_states needs an output projector whose first layer is a Linear on the LLM's "
            "hidden states (the mlp and transformer types); drop the key for this one."
        )
    return layer


def whiten_output_projector(
    model: MMLLMForConditionalGeneration,
    collator: MultimodalCollator,
    dataset,
    rows: int = 512,
    batch_size: int = 32,
    eps: float = 1e-3,
) -> nn.Linear:
    """Fold a whitening of the signal-token states into the output projector's input layer, then freeze that layer.

    A trained LLM's last hidden states are ill-conditioned for a fresh projector: what tells prompts apart lies in
    low-variance directions, which gradient descent learns slowly (a frozen tiny LLM's states are linearly enough
    for the conditioning, yet Adam on the raw states barely moves in a few hundred steps). The states of up to
    `rows` drawing requests of `dataset` (collated as in training) give their mean and covariance `C` (ridge `eps`
    times the mean variance); the layer then maps `x` to `W L^T (x - mean) + b` with `L L^T = C^-1`, and stays fixed
    so the layers after it learn on whitened inputs. Returns the layer.
    """
    inner = inner_model(model)
    layer = whitened_layer(model)
    drawing = (
        dataset.filter(lambda caption: bool(caption), input_columns="generation_caption")
        if "generation_caption" in dataset.column_names
        else []
    )
    if not len(drawing):
        raise ValueError("whiten_signal_states needs rows that ask for an image (a generation_caption column).")
    drawing = drawing.select(range(min(rows, len(drawing))))
    states = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(drawing), batch_size):
            batch = collator.torch_call(
                [dict(row) for row in drawing.select(range(start, min(start + batch_size, len(drawing))))]
            )
            inputs = {
                key: value.to(layer.weight.device)
                for key, value in batch.items()
                if key in ("input_ids", "attention_mask", "mm_token_type_ids")
            }
            hidden = inner(**inputs).last_hidden_state
            states.append(inner.signal_states(hidden, inputs["input_ids"]).flatten(0, 1).double().cpu())
    model.train(was_training)
    flat = torch.cat(states)
    mean = flat.mean(0)
    covariance = torch.cov((flat - mean).T)
    covariance += eps * covariance.diagonal().mean() * torch.eye(len(mean), dtype=covariance.dtype)
    whitening = torch.linalg.cholesky(torch.linalg.inv(covariance))
    with torch.no_grad():
        weight = layer.weight.double().cpu() @ whitening.T
        layer.weight.copy_(weight.to(layer.weight))
        if layer.bias is not None:
            layer.bias.sub_((weight @ mean).to(layer.bias))
    layer.requires_grad_(False)
    return layer


def pretrain_generator(
    model: MMLLMForConditionalGeneration,
    processor: MMLLMProcessor,
    settings: dict | None = None,
    device: str | torch.device | None = None,
) -> dict:
    """Train the built-in image generator (caption encoder + decoder) on (caption, image) pairs: its own
    `image_loss` of `encode_prompt(captions)`, a plain AdamW loop with warm-up and cosine decay.

    Stable Diffusion comes pretrained; the built-in generator stands in for it and must learn to draw first. Keys of
    `settings` (defaults in `GENERATOR_PRETRAINING`): steps, learning_rate, batch_size, n (synthetic pairs), data (a
    recipe data section instead), warmup_steps, seed, logging_steps. Returns {steps, loss, seconds}.
    """
    from transformers import get_cosine_schedule_with_warmup

    options = {**GENERATOR_PRETRAINING, **(settings or {})}
    unknown = set(options) - set(GENERATOR_PRETRAINING)
    if unknown:
        raise ValueError(f"Unknown generator_pretraining keys {sorted(unknown)}: use {sorted(GENERATOR_PRETRAINING)}.")
    generator_config = model.config.modality_generator
    if generator_config is None:
        raise ValueError(
            "generator_pretraining needs a model that generates images: add "
            "`model: {image_generation: {...}}` to the recipe (or start from an any-to-any model)."
        )
    if generator_config["type"] != "builtin":
        raise ValueError(
            f"generator_pretraining trains the built-in generator; a {generator_config['type']!r} "
            "generator comes pretrained: remove generator_pretraining from the recipe."
        )
    generator, tokenizer = model.model.modality_generator, processor.tokenizer
    captions, images = generation_pairs(options["data"], options["n"], tokenizer)
    check_caption_lengths(captions, tokenizer, generator_config)
    source_device = next(generator.parameters()).device
    generator.to(device or source_device).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(generator.parameters(), lr=options["learning_rate"], weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, options["warmup_steps"], options["steps"])
    random = torch.Generator().manual_seed(options["seed"])
    start, recent = time.time(), []
    for step in range(1, options["steps"] + 1):
        batch = torch.randint(len(captions), (options["batch_size"],), generator=random).tolist()
        conditioning = generator.encode_prompt([captions[index] for index in batch], tokenizer)
        loss = generator.image_loss(conditioning, images[batch].to(conditioning.device))
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        recent = [*recent[-19:], loss.item()]
        if step % options["logging_steps"] == 0 or step == options["steps"]:
            print(
                f"generator pre-training: step {step}/{options['steps']}, image loss {np.mean(recent):.4f}", flush=True
            )
    generator.to(source_device)
    return {"steps": options["steps"], "loss": float(np.mean(recent)), "seconds": round(time.time() - start, 1)}


def generator_pretraining_record(output_dir: Path, settings: dict, record: dict | None) -> dict | None:
    """Keep the generator pre-training's figures beside the checkpoints (`record`), or read them back on resume
    (`record=None`), so a resumed stage's history still reports them. A resumed run keeps the checkpoint's
    generator: changed pre-training `settings` are reported, not silently dropped."""
    path = output_dir / "generator_pretraining.json"
    if record is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"settings": settings, "result": record}))
        return record
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved["settings"] != settings:
        print(
            f"warning: generator_pretraining is now {settings}, but the checkpoint's generator was pre-trained "
            f"with {saved['settings']}; the resumed run keeps it (start a new output_dir to pre-train again).",
            file=sys.stderr,
            flush=True,
        )
    return saved["result"]


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose files were all written (a killed run can leave a half-written one)."""
    needed = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    for checkpoint in checkpoints:
        has_weights = any(checkpoint.glob("*.safetensors"))
        if has_weights and all((checkpoint / name).is_file() for name in needed):
            print(f"resuming from {checkpoint} (use a new output_dir to start over)", flush=True)
            return checkpoint
        print(f"skipping {checkpoint}: incomplete (the run was stopped while writing it)", flush=True)
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
    output_dir = Path(args.output_dir)
    resume = (
        last_complete_checkpoint(output_dir) if args.resume_from_checkpoint is None else args.resume_from_checkpoint
    )
    model, processor = build_model(recipe["model"])
    if recipe.get("chat_template"):
        processor.chat_template = Path(recipe["chat_template"]).read_text()
    pretraining = None
    if recipe.get("generator_pretraining") is not None:  # a checkpoint holds the trained generator
        pretraining = generator_pretraining_record(
            output_dir,
            recipe["generator_pretraining"],
            None
            if resume
            else pretrain_generator(model, processor, recipe["generator_pretraining"], device=args.device),
        )
    apply_freeze_policy(model, recipe)
    row_masked = train_token_rows(model, model.config.signal_token_ids) if signal_rows_train(model, recipe) else set()
    dataset = load_training_data(recipe["data"], bad_rows=recipe.get("bad_rows", "stop"))
    image_loss_weight = float(recipe.get("image_loss_weight", 0.0))
    collator = MultimodalCollator(
        processor=processor,
        max_length=args.max_length,
        assistant_only_loss=args.assistant_only_loss,
        target_images=image_loss_weight > 0,
    )
    if recipe.get("whiten_signal_states"):
        if resume:  # the checkpoint holds the whitened layer: fixed, as in the run being resumed
            whitened_layer(model).requires_grad_(False)
        else:
            whiten_output_projector(model, collator, dataset, rows=int(recipe["whiten_signal_states"]))
    trainer = MMLLMTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        data_collator=collator,
        peft_config=lora_config(model, recipe["lora"]) if recipe.get("lora") is not None else None,
        vision_lr_decay=recipe.get("vision_lr_decay"),
        callbacks=callbacks,
        alignment_loss_weight=float(recipe.get("alignment_loss_weight", 1.0)),
        image_loss_weight=image_loss_weight,
        row_masked_parameters=row_masked,
        lr_scales=embedding_lr_scales(model, recipe.get("signal_embedding_lr_scale", SIGNAL_EMBEDDING_LR_SCALE))
        if row_masked
        else None,
    )
    if recipe.get("lora") is not None and model.config.signal_token_ids:
        trainer.row_masked_parameters |= mask_peft_head_rows(trainer.model, model.config.signal_token_ids)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    stage = {
        "recipe": name,
        "data": recipe["data"],
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "frozen": frozen_components(recipe),
        "lora": recipe.get("lora") is not None,
    }
    if pretraining:
        stage["generator_pretraining"] = pretraining
    if row_masked:
        stage["trained_token_rows"] = list(model.config.signal_token_ids)
    if trainer.is_world_process_zero():
        metrics = evaluate_stage(trainer.model, processor, recipe["eval"]) if recipe.get("eval") else None
        final = save_stage(
            trainer, processor, output_dir, stage, merge_lora=recipe.get("merge_lora", False), metrics=metrics
        )
        if recipe.get("push_to_hub"):
            push_folder(final, recipe.get("hub_model_id"), private=bool(recipe.get("hub_private_repo")))
    return output_dir / "model"


def evaluate_stage(model, processor: MMLLMProcessor, spec: dict) -> dict[str, float]:
    """Exact-match accuracy per question kind on the recipe's `eval` data (rows with `kind` and `answer`); with
    image-generation rows (a `generation_caption` column), the judged images and signal-token rates as well."""
    from ..evaluation.metrics import evaluate_image_generation, exact_match

    dataset = load_training_data(spec)
    if "generation_caption" not in dataset.column_names:
        return {f"accuracy/{kind}": value for kind, value in exact_match(model, processor, dataset).items()}
    results = evaluate_image_generation(model, processor, dataset)
    return {name if "/" in name else f"accuracy/{name}": value for name, value in results.items()}


def save_stage(
    trainer: SFTTrainer,
    processor: MMLLMProcessor,
    output_dir: Path,
    stage: dict,
    merge_lora: bool = False,
    metrics: dict | None = None,
) -> Path:
    """Write `<output_dir>/model` (and `/merged` for LoRA) atomically, with the training history and card.

    `trainer.save_model` gathers sharded weights (DeepSpeed ZeRO-3, FSDP) before writing.
    """
    model = trainer.model
    history = json.dumps(_history(model) + [stage], indent=2)
    target = output_dir / "model"
    with atomic_folder(target, replace=True) as staging:  # a re-run's previous folder stays until this one is whole
        (staging / HISTORY_FILE).write_text(history)  # before the save, so the model card lists the stages
        if metrics:
            (staging / "eval_results.json").write_text(json.dumps(metrics, indent=2))
        trainer.save_model(str(staging))  # weights, code and card; the processor too (the trainer's processing_class)
        (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle: not part of a Hub-ready folder
        write_adapter_card(model, staging)
    if merge_lora and hasattr(model, "merge_and_unload"):
        save_model_folder(
            model.merge_and_unload(),
            processor,
            output_dir / "merged",
            extra_files={HISTORY_FILE: history},
            replace=True,
        )
    return target


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


__all__ = [
    "MultimodalCollator",
    "MMLLMTrainer",
    "enable_generation",
    "load_recipe",
    "parse_overrides",
    "pretrain_generator",
    "push_folder",
    "train",
    "train_token_rows",
    "whiten_output_projector",
]
