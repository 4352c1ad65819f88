"""Pre-training of the built-in image generator on (caption, image) pairs, and the output projector's whitened input
layer (library side)."""

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from transformers import TrainingArguments

from ..data.loading import load_training_data
from ..modeling_mmllm import MMLLMForConditionalGeneration
from ..processing_mmllm import MMLLMProcessor
from ..utils.logging import get_logger
from .collator import MultimodalCollator, pixel_tensor
from .recipes import check_keys
from .trainer import inner_model

logger = get_logger(__name__)

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


class GeneratorLoss(nn.Module):
    """The built-in generator's `image_loss` of `encode_prompt(captions)` as one forward, so accelerate's wrappers
    (DDP's gradient all-reduce, mixed precision) see the whole step."""

    def __init__(self, generator: nn.Module, tokenizer):
        super().__init__()
        self.generator, self.tokenizer = generator, tokenizer

    def forward(self, captions: list[str], images: torch.Tensor) -> torch.Tensor:
        conditioning = self.generator.encode_prompt(captions, self.tokenizer)
        return self.generator.image_loss(conditioning, images.to(conditioning.device))


def pretrain_generator(
    model: MMLLMForConditionalGeneration,
    processor: MMLLMProcessor,
    settings: dict | None = None,
    args: TrainingArguments | None = None,
) -> dict:
    """Train the built-in image generator (caption encoder + decoder) on (caption, image) pairs: its own
    `image_loss` of `encode_prompt(captions)`, AdamW with warm-up and cosine decay, on accelerate's set-up for `args`
    (the recipe's: device, processes, mixed precision); each process draws its own batches.

    Stable Diffusion comes pretrained; the built-in generator stands in for it and must learn to draw first. Keys of
    `settings` (defaults in `GENERATOR_PRETRAINING`): steps, learning_rate, batch_size, n (synthetic pairs), data (a
    recipe data section instead), warmup_steps, seed, logging_steps. Returns {steps, loss, seconds}.

    DeepSpeed and FSDP shard the whole model, which the Trainer sets up afterwards; this small stage cannot run under
    them (pre-train the generator in a run of its own, then start the sharded run from that folder).
    """
    from transformers import get_cosine_schedule_with_warmup

    options = {**GENERATOR_PRETRAINING, **(settings or {})}
    check_keys("generator_pretraining", options, GENERATOR_PRETRAINING)
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
    accelerator = _accelerator(args)
    generator, tokenizer = model.model.modality_generator, processor.tokenizer
    captions, images = generation_pairs(options["data"], options["n"], tokenizer)
    check_caption_lengths(captions, tokenizer, generator_config)
    source_device = next(generator.parameters()).device
    generator.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(generator.parameters(), lr=options["learning_rate"], weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, options["warmup_steps"], options["steps"])
    step_loss, optimizer = accelerator.prepare(GeneratorLoss(generator, tokenizer), optimizer)
    random = torch.Generator().manual_seed(options["seed"] + accelerator.process_index)
    start, recent = time.time(), []
    for step in range(1, options["steps"] + 1):
        batch = torch.randint(len(captions), (options["batch_size"],), generator=random).tolist()
        loss = step_loss([captions[index] for index in batch], images[batch].to(accelerator.device))
        accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        recent = [*recent[-19:], loss.item()]
        if step % options["logging_steps"] == 0 or step == options["steps"]:
            logger.info(f"generator pre-training: step {step}/{options['steps']}, image loss {np.mean(recent):.4f}")
    generator.to(source_device)
    return {"steps": options["steps"], "loss": float(np.mean(recent)), "seconds": round(time.time() - start, 1)}


def _accelerator(args: TrainingArguments | None) -> Accelerator:
    """accelerate's set-up for the recipe's arguments (the one its Trainer makes: device, processes, precision)."""
    sharded = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" or os.environ.get("ACCELERATE_USE_FSDP") == "true"
    if sharded or (args is not None and (args.deepspeed or args.fsdp)):
        raise ValueError(
            "generator_pretraining cannot run under DeepSpeed or FSDP (they shard the whole model, which the "
            "Trainer sets up afterwards): pre-train the generator in a run of its own on one device or DDP "
            "(no accelerate config, or multi_gpu), then start this recipe from that run's folder (model: {path: ...})."
        )
    if args is None:
        return Accelerator()
    return Accelerator(cpu=args.use_cpu, mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else "no")


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
        logger.warning(
            f"generator_pretraining is now {settings}, but the checkpoint's generator was pre-trained "
            f"with {saved['settings']}; the resumed run keeps it (pass --overwrite to train again from the start)."
        )
    return saved["result"]


__all__ = [
    "GENERATOR_PRETRAINING",
    "GeneratorLoss",
    "check_caption_lengths",
    "generation_pairs",
    "generator_pretraining_record",
    "pretrain_generator",
    "whiten_output_projector",
    "whitened_layer",
]
