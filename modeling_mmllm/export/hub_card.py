"""Model cards for saved folders and Hub repos, rendered from `hub_cards/` (library side)."""

import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.dynamic_module_utils import get_relative_import_files

from ..builders.presets import asset_dir
from ..component_settings import cross_attention_settings

DEFAULT_LICENSE = "apache-2.0"


def _projector_line(config) -> str:
    """The input projector's row: its soft tokens, or with cross-attention fusion its latents and the blocks."""
    if config.fusion != "cross_attention":
        return f"`{config.projector_type}` → {config.image_seq_length} tokens per image"
    interval = cross_attention_settings(config)["cross_layer_interval"]
    return (
        f"`{config.projector_type}` → {config.projected_seq_length()} latents per image, read by gated "
        f"cross-attention every {interval} decoder layer(s) (Flamingo fusion; `<image>` stays one token)"
    )


def _component_rows(config) -> dict[str, str]:
    vision, text = config.vision_config, config.text_config
    layers = ", ".join(str(layer) for layer in config.feature_layers)
    return {
        "encoder": (
            f"`{vision.model_type}`: {vision.num_hidden_layers} layers, width {vision.hidden_size}, "
            f"{vision.image_size} px, patch {vision.patch_size}; features of layer {layers} "
            f"(`{config.vision_feature_select_strategy}` selection)"
        ),
        "projector": _projector_line(config),
        "backbone": (
            f"`{text.model_type}`: {text.num_hidden_layers} layers, width {text.hidden_size}, "
            f"vocabulary {text.vocab_size}"
        ),
        "modality_adaptive": (
            f"per-modality K/V and norms for modalities {config.modality_adaptive_modalities} in "
            f"{'all' if config.modality_adaptive_layers is None else config.modality_adaptive_layers} decoder layers"
            if config.modality_adaptive
            else "off"
        ),
        **_output_rows(config),
    }


def _output_rows(config) -> dict[str, str]:
    """The Output Projector and Modality Generator rows: what turns signal-token states into images."""
    if not config.image_generation:
        return {"output_projector": "none", "generator": "none (text output)"}
    generator, k = config.modality_generator, len(config.signal_token_ids)
    shape = f"{generator['condition_length']} × {generator['condition_width']}"
    settings = ", ".join(f"{key} {value}" for key, value in (config.output_projector_config or {}).items())
    projector = (
        f"`{config.output_projector_type}`{f' ({settings})' if settings else ''}: hidden states at the {k} signal "
        f"tokens `<gen_img_0>` … `<gen_img_{k - 1}>` → conditioning of {shape} (condition length × width)"
    )
    if generator["type"] == "builtin":
        size = generator["image_size"]
        return {
            "output_projector": projector,
            "generator": f"built-in image decoder (weights in this checkpoint): {shape} conditioning → "
            f"{size}×{size} RGB images",
        }
    pretrained = str(generator.get("pretrained"))
    # A name without "/" is a sub-folder of the saved model (where save_pretrained writes a local pipeline).
    source = (
        f"the diffusers pipeline in this repository's `{pretrained}/` sub-folder"
        if "/" not in pretrained
        else f"the diffusers pipeline `{pretrained}` (referenced, not copied)"
    )
    steps = generator.get("num_inference_steps")
    return {
        "output_projector": projector,
        "generator": f"{source}, conditioned through `prompt_embeds` of {shape}"
        + (f", {steps} denoising steps" if steps else "")
        + "; generating images needs diffusers: `pip install mmllm[generation]`",
    }


def _any_to_any(config) -> bool:
    """Whether `pipeline("any-to-any")` serves this model: it takes audio or generates images (as its auto_map)."""
    return config.audio_config is not None or config.image_generation


def _any_to_any_usage(config, repo_id: str) -> str:
    """Markdown: how to call the model through `pipeline("any-to-any")` (empty for image-text-to-text models)."""
    if not _any_to_any(config):
        return ""
    uses = [
        use
        for use, on in (
            ("Audio questions", config.audio_config is not None),
            ("generated images", config.image_generation),
        )
        if on
    ]
    lines = [
        "",
        f'{" and ".join(uses).capitalize()} go through `pipeline("any-to-any")`:',
        "",
        "```python",
        f'pipe = pipeline("any-to-any", model="{repo_id}", trust_remote_code=True)',
    ]
    if config.audio_config is not None:
        lines += [
            'messages = [{"role": "user", "content": [{"type": "audio", "path": "question.wav"}, '
            '{"type": "text", "text": "What do you hear?"}]}]',
            'print(pipe(text=messages, generate_kwargs={"max_new_tokens": 32}))',
        ]
    if config.image_generation:
        lines += [
            'messages = [{"role": "user", "content": [{"type": "text", "text": "Draw a red circle."}]}]',
            'image = pipe(text=messages, generation_mode="image")[0]["generated_image"]  # a PIL image',
        ]
    return "\n".join(lines + ["```"])


def _stages(folder: Path | None) -> list[dict]:
    """The training stages recorded in a saved folder (`training_history.json`), oldest first."""
    history = folder / "training_history.json" if folder else None
    return json.loads(history.read_text()) if history and history.is_file() else []


def _training_section(folder: Path | None) -> str:
    """Markdown for the training stages and metrics recorded in a saved folder (if any)."""
    lines = []
    stages = _stages(folder)
    if stages:
        lines += [
            "## Training",
            "",
            "| stage | trainer | data | steps | final train loss | frozen | LoRA |",
            "|---|---|---|---|---|---|---|",
        ]
        for stage in stages:
            data = ", ".join(f"{k}={v}" for k, v in stage["data"].items() if v is not None)
            frozen = ", ".join(stage["frozen"]) or "nothing"
            lines.append(
                f"| {stage['recipe']} | {stage.get('trainer', 'sft')} | {data} | {stage['steps']} | "
                f"{stage['train_loss']:.4f} | {frozen} | {'yes' if stage['lora'] else 'no'} |"
            )
        lines.append("")
    metrics = folder / "eval_results.json" if folder else None
    if metrics and metrics.is_file():
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in json.loads(metrics.read_text()).items()]
        lines.append("")
    return "\n".join(lines)


def _benchmark_results(folder: Path | None) -> list[EvalResult] | None:
    """The lmms-eval scores of a folder's eval_results.json (`lmms_eval/<task>/<metric>`) as model-index entries."""
    path = folder / "eval_results.json" if folder else None
    if not (path and path.is_file()):
        return None
    results = [
        EvalResult(
            task_type="image-text-to-text",
            dataset_type=task,
            dataset_name=task,
            dataset_split="test",
            metric_type=metric,
            metric_value=value,
            source_name="lmms-eval",
            source_url="https://github.com/EvolvingLMMs-Lab/lmms-eval",
        )
        for name, value in json.loads(path.read_text()).items()
        if name.startswith("lmms_eval/")
        for _, task, metric in [name.split("/", 2)]
    ]
    return results or None


def render_model_card(
    model, repo_id: str | None = None, license: str = DEFAULT_LICENSE, folder: Path | None = None
) -> ModelCard:
    """The card of `model` (or of a PEFT adapter over it): Hub metadata, the five components, training stages and
    metrics recorded in `folder`, how to load it, what remote code runs."""
    adapter = hasattr(model, "get_base_model")
    base = model.get_base_model() if adapter else model
    config = base.config
    rows = _component_rows(config)
    base_models = config.base_models or ([config._name_or_path] if adapter and config._name_or_path else None)
    tags = ["mmllm", "multimodal", "image-text-to-text", f"projector-{config.projector_type}", "custom_code"]
    if _any_to_any(config):
        tags.append("any-to-any")
    if config.image_generation:
        tags.append("text-to-image")
    if config.modality_adaptive:
        tags.append("modality-adaptive")
    if adapter:
        tags.append("lora")
    aligned = sorted({stage.get("trainer") for stage in _stages(folder)} & {"dpo", "grpo"})
    if aligned:
        tags += ["trl", *aligned]
    card_data = ModelCardData(
        model_name=repo_id or ("mmllm LoRA adapter" if adapter else "mmllm model"),
        eval_results=_benchmark_results(folder),
        library_name="peft" if adapter else "transformers",
        pipeline_tag="any-to-any" if _any_to_any(config) else "image-text-to-text",
        license=license,
        base_model=base_models,
        tags=tags,
    )
    hub_set = sorted(Path(module).name for module in hub_set_files())
    return ModelCard.from_template(
        card_data,
        template_path=str(asset_dir("hub_cards") / "model_card.md"),
        model_name=repo_id or ("mmllm LoRA adapter" if adapter else "mmllm model"),
        repo_id=repo_id or "path/to/this/folder",
        architecture_line=f"{config.vision_config.model_type} encoder + {config.projector_type} projector + "
        f"{config.text_config.model_type} backbone"
        + (" with the modality-adaptive module" if config.modality_adaptive else "")
        + (
            f", generating images through a {config.output_projector_type} output projector and the "
            f"{config.modality_generator['type']} image generator"
            if config.image_generation
            else ""
        ),
        parameters=f"Parameters: {base.num_parameters():,}."
        + (
            " This folder holds a LoRA adapter: load the base model, then `PeftModel.from_pretrained(base, folder)`."
            if adapter
            else ""
        ),
        code_files=", ".join(f"`{name}`" for name in hub_set),
        training=_training_section(folder),
        any_to_any_usage=_any_to_any_usage(config, repo_id or "path/to/this/folder"),
        **rows,
    )


def hub_set_files() -> list[str]:
    """The files `save_pretrained` copies next to a checkpoint: the model and processor modules and their imports."""
    package = Path(__file__).parents[1]  # the hub set sits at the package root
    entries = [str(package / "modeling_mmllm.py"), str(package / "processing_mmllm.py")]
    files = set(entries)
    for entry in entries:
        files.update(get_relative_import_files(entry))
    return sorted(files)


def write_model_card(model, save_directory, repo_id: str | None = None) -> None:
    """Write `README.md` into a saved model folder."""
    folder = Path(save_directory)
    render_model_card(model, repo_id=repo_id, folder=folder).save(folder / "README.md")


__all__ = ["hub_set_files", "render_model_card", "write_model_card"]
