"""Running a recipe end to end: set-up, training (SFT, DPO or GRPO, with resume), evaluation, the atomic final folder
and the push (library side)."""

import copy
import importlib.util
import json
import shutil
from dataclasses import replace
from pathlib import Path

from trl import SFTTrainer

from ..data.loading import drop_bad_rows, is_preference, load_training_data, prompt_rows
from ..export.hub_card import write_model_card
from ..export.saving import atomic_folder, push_folder, save_model_folder
from ..processing_mmllm import MMLLMProcessor
from ..utils.logging import get_logger
from .collator import MultimodalCollator, row_token_counts, rows_beyond_max_length
from .generator_pretraining import (
    generator_pretraining_record,
    pretrain_generator,
    whiten_output_projector,
    whitened_layer,
)
from .model_setup import (
    apply_freeze_policy,
    build_model,
    embedding_lr_scales,
    frozen_components,
    lora_config,
    mask_peft_head_rows,
    signal_rows_train,
    train_token_rows,
)
from .packing import check_packing, pack_length, pack_rows
from .recipes import DPORecipeConfig, GRPORecipeConfig, RecipeConfig
from .rewards import Rewards, needs_solution, resolve_reward
from .trainer import MMLLMDPOTrainer, MMLLMGRPOTrainer, MMLLMTrainer

HISTORY_FILE = "training_history.json"
logger = get_logger(__name__)


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose files were all written (a killed run can leave a half-written one)."""
    needed = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    for checkpoint in checkpoints:
        has_weights = any(checkpoint.glob("*.safetensors"))
        if has_weights and all((checkpoint / name).is_file() for name in needed):
            logger.info(f"resuming from {checkpoint} (use a new output_dir to start over)")
            return checkpoint
        logger.warning(f"skipping {checkpoint}: incomplete (the run was stopped while writing it)")
    return None


def finished_stage(output_dir: Path, name: str, max_steps: int) -> Path | None:
    """`<output_dir>/model` when a run of recipe `name` already completed it (and, with `max_steps`, took at least
    that many steps): re-running a finished stage must not train on (a resumed Trainer would take one more step)."""
    history = output_dir / "model" / HISTORY_FILE
    if not history.is_file():
        return None
    last = json.loads(history.read_text())[-1]
    if last.get("recipe") != name or (max_steps > 0 and last.get("steps", 0) < max_steps):
        return None
    return output_dir / "model"


def remove_checkpoints(output_dir: Path) -> None:
    """Forget a previous run in `output_dir` (`--overwrite`): its checkpoints go (nothing resumes from them); its
    final folder stays until the new run's replaces it."""
    for checkpoint in output_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)


def train(
    recipe: RecipeConfig | DPORecipeConfig | GRPORecipeConfig, name: str = "recipe", callbacks: list | None = None
) -> Path:
    """Run one training stage (TRL's SFTTrainer, DPOTrainer for `trainer: dpo`, GRPOTrainer for `trainer: grpo`);
    returns the Hub-ready output folder (`<output_dir>/model`).

    `callbacks` are `transformers.TrainerCallback`s added to the trainer (metrics, early stopping, probes).
    Under torchrun every process returns once the folder is complete; a script then leaves the process group before
    it exits (`PartialState().destroy_process_group()`, as `mmllm train` does), or gloo can abort it.
    """
    output_dir = Path(recipe.output_dir)
    if recipe.overwrite:
        remove_checkpoints(output_dir)
    elif (finished := finished_stage(output_dir, name, recipe.max_steps)) is not None:
        logger.info(f"stage already complete: {finished}; pass --overwrite to train again")
        return finished
    resume = (
        last_complete_checkpoint(output_dir) if recipe.resume_from_checkpoint is None else recipe.resume_from_checkpoint
    )
    model, processor = build_model(recipe.model)
    if recipe.chat_template:
        processor.chat_template = Path(recipe.chat_template).read_text()
    pretraining = None
    if recipe.generator_pretraining is not None:  # a checkpoint holds the trained generator
        pretraining = generator_pretraining_record(
            output_dir,
            recipe.generator_pretraining,
            None if resume else pretrain_generator(model, processor, recipe.generator_pretraining, args=recipe),
        )
    frozen = frozen_components(recipe.freeze, recipe.model)
    apply_freeze_policy(
        model,
        frozen,
        train_modality_adaptive=recipe.train_modality_adaptive,
        train_cross_attention=recipe.train_cross_attention,
    )
    stage = {"recipe": name, "trainer": recipe.trainer, "data": recipe.data, "frozen": frozen}
    before = None
    rewards = reward_functions(recipe) if recipe.trainer == "grpo" else None
    prompts = grpo_prompts(recipe, model) if recipe.trainer == "grpo" else None  # checked before the evaluation runs
    if recipe.trainer in ("dpo", "grpo") and recipe.eval:
        # The starting model's figures: alignment must raise the preference rate or the reward, not wreck the answers.
        before = evaluate_stage(model, processor, recipe.eval, rewards)
    if recipe.trainer == "dpo":
        trainer = dpo_trainer(recipe, model, processor, callbacks)
        stage.update(beta=recipe.beta, loss_type=list(recipe.loss_type))
    elif recipe.trainer == "grpo":
        trainer = grpo_trainer(recipe, model, processor, callbacks, rewards, prompts)
        stage.update(
            beta=recipe.beta,
            loss_type=recipe.loss_type,
            temperature=recipe.temperature,
            reward_funcs=list(recipe.reward_funcs),
            num_generations=recipe.num_generations,
        )
    else:
        trainer = sft_trainer(recipe, model, processor, callbacks, resume)
        if trainer.row_masked_parameters:
            stage["trained_token_rows"] = list(model.config.signal_token_ids)
    rows = f"{len(trainer.train_dataset)} {'packs' if getattr(recipe, 'packing', False) else 'rows'}"
    frozen_names = ", ".join(frozen) or "nothing"
    logger.info(f"training {name}: {rows} ({recipe.trainer}), frozen: {frozen_names}; into {output_dir}")
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    stage.update(
        steps=result.global_step,
        train_loss=result.training_loss,
        lora=recipe.lora is not None,
        losses=[[log["step"], log["loss"]] for log in trainer.state.log_history if "loss" in log],
    )
    if recipe.trainer == "grpo":  # the curves GRPO is judged by: the mean reward and the KL to the starting model
        for key in ("reward", "kl"):
            stage[f"{key}_curve"] = [[log["step"], log[key]] for log in trainer.state.log_history if key in log]
    if pretraining:
        stage["generator_pretraining"] = pretraining
    if trainer.is_world_process_zero():
        metrics = evaluate_stage(trainer.model, processor, recipe.eval, rewards) if recipe.eval else None
        if before:
            metrics = {**metrics, **{f"before/{metric}": value for metric, value in before.items()}}
        final = save_stage(trainer, processor, output_dir, stage, merge_lora=recipe.merge_lora, metrics=metrics)
        if recipe.eval_tasks:
            add_benchmark_scores(final, trainer.model, recipe.eval_tasks, output_dir / "lmms_eval")
        if recipe.push_to_hub:
            push_folder(final, recipe.hub_model_id, private=bool(recipe.hub_private_repo))
    trainer.accelerator.wait_for_everyone()  # every process returns once the folder is whole (and may read it)
    return output_dir / "model"


def sft_trainer(
    recipe: RecipeConfig, model, processor: MMLLMProcessor, callbacks: list | None, resume: Path | None
) -> MMLLMTrainer:
    """TRL's SFTTrainer (`MMLLMTrainer`) on the recipe's conversations, with the output side's losses and the
    signal tokens' rows when the model generates images."""
    signal_rows = signal_rows_train(model, recipe.train_signal_tokens, lora=recipe.lora is not None)
    row_masked = train_token_rows(model, model.config.signal_token_ids) if signal_rows else set()
    dataset = load_training_data(recipe.data, bad_rows=recipe.bad_rows)
    if recipe.packing or recipe.padding_free:
        check_packing(recipe, model.config)
    collator = MultimodalCollator(
        processor=processor,
        max_length=pack_length(recipe, model.config) if recipe.packing else recipe.max_length,
        assistant_only_loss=recipe.assistant_only_loss,
        target_images=recipe.image_loss_weight > 0,
    )
    # (tokens, media end) of each kept row, measured once: truncation must never cut a span of soft tokens, and the
    # packer needs each row's length.
    counts = []
    if collator.max_length is not None:
        counts = row_token_counts(collator, dataset)
        bad = rows_beyond_max_length(counts, collator.max_length)
        dataset = drop_bad_rows(dataset, bad, recipe.bad_rows, "too many tokens")
        counts = [count for index, count in enumerate(counts) if index not in bad]
    if recipe.whiten_signal_states:
        if resume:  # the checkpoint holds the whitened layer: fixed, as in the run being resumed
            whitened_layer(model).requires_grad_(False)
        else:
            whiten_output_projector(model, collator, dataset, rows=recipe.whiten_signal_states)
    # TRL refuses packing and padding-free on vision datasets: the collator does both, TRL sees neither.
    args = replace(recipe.trainer_args(), packing=False, padding_free=False)
    collator.padding_free = recipe.packing or recipe.padding_free
    if recipe.packing:  # packing always has a max_length, so the rows were measured above
        packs = pack_rows([tokens for tokens, _ in counts], collator.max_length, seed=recipe.seed)
        logger.info(f"packing: {len(dataset)} rows into {len(packs)} packs of at most {collator.max_length} tokens")
        collator.packed_rows, dataset = dataset, packs
    if collator.answer_markers is not None or recipe.packing:
        # The collator masks the answers itself (the LLM's template has no markers; TRL would also refuse packs, which
        # are lists of row indices, as not conversational).
        args = replace(args, assistant_only_loss=False)
    trainer = MMLLMTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        data_collator=collator,
        peft_config=lora_config(model, recipe.lora) if recipe.lora is not None else None,
        vision_lr_decay=recipe.vision_lr_decay,
        component_lrs=recipe.component_lrs(),
        callbacks=callbacks,
        alignment_loss_weight=recipe.alignment_loss_weight,
        image_loss_weight=recipe.image_loss_weight,
        row_masked_parameters=row_masked,
        lr_scales=embedding_lr_scales(model, recipe.signal_embedding_lr_scale) if row_masked else None,
    )
    if recipe.lora is not None and model.config.signal_token_ids:
        trainer.row_masked_parameters |= mask_peft_head_rows(trainer.model, model.config.signal_token_ids)
    return trainer


def dpo_trainer(recipe: DPORecipeConfig, model, processor: MMLLMProcessor, callbacks: list | None) -> MMLLMDPOTrainer:
    """TRL's DPOTrainer (`MMLLMDPOTrainer`) on the recipe's preference pairs. The reference is the starting model:
    a frozen copy of it, or with LoRA the base model under the adapter (TRL disables the adapter)."""
    dataset = load_training_data(recipe.data, bad_rows=recipe.bad_rows, layout="preference")
    reference = None if recipe.lora is not None else copy.deepcopy(model).eval().requires_grad_(False)
    return MMLLMDPOTrainer(
        model=model,
        ref_model=reference,
        train_dataset=dataset,
        **alignment_settings(recipe, model, processor, callbacks),
    )


def alignment_settings(recipe, model, processor: MMLLMProcessor, callbacks: list | None) -> dict:
    """The keyword arguments the DPO and GRPO trainers share: the settings, the processor, LoRA, the learning rates
    per component and the callbacks."""
    return {
        "args": recipe.trainer_args(),
        "processing_class": processor,
        "peft_config": lora_config(model, recipe.lora) if recipe.lora is not None else None,
        "vision_lr_decay": recipe.vision_lr_decay,
        "component_lrs": recipe.component_lrs(),
        "callbacks": callbacks,
    }


def grpo_trainer(
    recipe: GRPORecipeConfig, model, processor: MMLLMProcessor, callbacks: list | None, rewards: Rewards, prompts
) -> MMLLMGRPOTrainer:
    """TRL's GRPOTrainer (`MMLLMGRPOTrainer`) on the recipe's prompts (`grpo_prompts`), scored by `reward_funcs`. With
    `beta` > 0 the KL term's reference is the starting model: TRL loads it again from its folder, or with LoRA it is
    the base model under the adapter."""
    return MMLLMGRPOTrainer(
        model=model,
        reward_funcs=rewards.functions,
        train_dataset=prompts,
        **alignment_settings(recipe, model, processor, callbacks),
    )


def grpo_prompts(recipe: GRPORecipeConfig, model):
    """The recipe's prompt rows, after the checks a GRPO stage needs (a reference for the KL term, vLLM when asked
    for); when the built-in rewards read `solution`, rows without one are bad rows and data without the column is an
    error."""
    check_reference(recipe, model)
    if recipe.use_vllm and importlib.util.find_spec("vllm") is None:
        raise ValueError("use_vllm: true needs vLLM (pip install vllm, on a GPU machine); or set use_vllm: false.")
    dataset = load_training_data(recipe.data, bad_rows=recipe.bad_rows, layout="prompt")
    bad = {index: "no prompt" for index, prompt in enumerate(dataset["prompt"]) if not prompt}
    if needs_solution(recipe.reward_funcs):
        if "solution" not in dataset.column_names:
            raise ValueError(
                f"reward_funcs {list(recipe.reward_funcs)} read each row's `solution`: the data has no such column "
                f"(columns: {dataset.column_names}); add it, or give conversations (their answer becomes it)."
            )
        solutions = enumerate(dataset["solution"])
        bad |= {index: "empty solution" for index, text in solutions if text is None or not str(text).strip()}
    return drop_bad_rows(dataset, dict(sorted(bad.items())), recipe.bad_rows, "empty prompts or solutions")


def check_reference(recipe: GRPORecipeConfig, model) -> None:
    """With `beta` > 0 and no LoRA, TRL loads the KL term's reference from the starting model's folder: the model
    must come from a folder, as it is saved there (no generator added, no quantization)."""
    if not recipe.beta or recipe.lora is not None:
        return
    source = model.config._name_or_path
    if not (source and Path(source).is_dir()):
        raise ValueError(
            f"beta={recipe.beta} needs a reference model, which TRL loads from the starting model's folder: start "
            "from a saved folder (model: {path: FOLDER}), use lora, or set beta: 0."
        )
    changed = [key for key in ("image_generation", "quantization") if recipe.model.get(key)]
    if changed:
        raise ValueError(
            f"beta={recipe.beta} with model.{changed[0]}: TRL would load the KL term's reference from {source} as it "
            "is saved there, which is not the model this stage trains; use lora (the reference is then the base "
            "model under the adapter) or set beta: 0."
        )


def reward_functions(recipe: GRPORecipeConfig) -> Rewards:
    """The recipe's reward functions, their weights and the answer length they score."""
    return Rewards(
        [resolve_reward(name) for name in recipe.reward_funcs], recipe.reward_weights, recipe.max_completion_length
    )


def evaluate_stage(model, processor: MMLLMProcessor, spec: dict, rewards: Rewards | None = None) -> dict[str, float]:
    """Exact-match accuracy per question kind on the recipe's `eval` data (rows with `kind` and `answer`); with
    image-generation rows (a `generation_caption` column), the judged images and signal-token rates as well; for
    preference pairs, the preference rate (chosen more likely than rejected) and the exact match of the answers;
    with `rewards` (a GRPO stage's), also the mean reward of the greedy answers (`reward/mean`), as long as the
    stage's completions."""
    from ..evaluation.metrics import accuracy_by_kind, answer_questions, evaluate_image_generation, preference_rate

    dataset = load_training_data(spec, layout="any")
    if "generation_caption" in dataset.column_names:
        results = evaluate_image_generation(model, processor, dataset)
        return {name if "/" in name else f"accuracy/{name}": value for name, value in results.items()}
    results = {"preference_rate": preference_rate(model, processor, dataset)} if is_preference(dataset) else {}
    if {"kind", "answer"} <= set(dataset.column_names):
        rows = list(dataset)
        answers = answer_questions(
            model, processor, rows, **({"max_new_tokens": rewards.max_new_tokens} if rewards else {})
        )
        results.update({f"accuracy/{kind}": value for kind, value in accuracy_by_kind(rows, answers).items()})
        if rewards is not None:
            prompts = prompt_rows(dataset) if "prompt" not in dataset.column_names else dataset
            columns = {name: prompts[name] for name in prompts.column_names if name not in ("prompt", "images")}
            results["reward/mean"] = rewards.mean(prompts["prompt"], answers, columns)
    return results


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
        trainer.save_model(str(staging))  # weights and code; the processor too (the trainer's processing_class)
        (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle: not part of a Hub-ready folder
        write_model_card(model, staging)
    if merge_lora and hasattr(model, "merge_and_unload"):
        save_model_folder(
            model.merge_and_unload(),
            processor,
            output_dir / "merged",
            extra_files={HISTORY_FILE: history},
            replace=True,
        )
    return target


def add_benchmark_scores(folder: Path, model, tasks: list[str], output_path: Path) -> dict[str, float]:
    """Run lmms-eval `tasks` on a saved folder and add the scores (`lmms_eval/<task>/<metric>`) to its
    eval_results.json and model card (whose model-index lists them)."""
    from ..evaluation.lmms_eval_runner import run_lmms_eval, task_scores

    results = run_lmms_eval(folder, list(tasks), output_path)
    scores = {
        f"lmms_eval/{task}/{metric}": value
        for task, metrics in task_scores(results).items()
        for metric, value in metrics.items()
    }
    path = folder / "eval_results.json"
    metrics = {**(json.loads(path.read_text()) if path.is_file() else {}), **scores}
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(metrics, indent=2))
    staging.replace(path)
    write_model_card(model, folder)
    return scores


def _history(model) -> list:
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    path = Path(source) / HISTORY_FILE
    return json.loads(path.read_text()) if source and path.is_file() else []


__all__ = [
    "HISTORY_FILE",
    "add_benchmark_scores",
    "check_reference",
    "alignment_settings",
    "dpo_trainer",
    "evaluate_stage",
    "finished_stage",
    "grpo_prompts",
    "grpo_trainer",
    "last_complete_checkpoint",
    "remove_checkpoints",
    "reward_functions",
    "save_stage",
    "sft_trainer",
    "train",
]
