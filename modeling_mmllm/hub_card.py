"""Model cards for saved folders and Hub repos, rendered from `hub_cards/` (library side)."""

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from transformers.dynamic_module_utils import get_relative_import_files

from .presets import asset_dir

DEFAULT_LICENSE = "apache-2.0"


def _component_rows(config) -> dict[str, str]:
    vision, text = config.vision_config, config.text_config
    layers = ", ".join(str(layer) for layer in config.feature_layers)
    return {
        "encoder": (
            f"`{vision.model_type}`: {vision.num_hidden_layers} layers, width {vision.hidden_size}, "
            f"{vision.image_size} px, patch {vision.patch_size}; features of layer {layers} "
            f"(`{config.vision_feature_select_strategy}` selection)"
        ),
        "projector": f"`{config.projector_type}` → {config.image_seq_length} tokens per image",
        "backbone": (
            f"`{text.model_type}`: {text.num_hidden_layers} layers, width {text.hidden_size}, "
            f"vocabulary {text.vocab_size}"
        ),
        "modality_adaptive": (
            f"per-modality K/V and norms for modalities {config.modality_adaptive_modalities} in "
            f"{'all' if config.modality_adaptive_layers is None else config.modality_adaptive_layers} decoder layers"
            if config.modality_adaptive else "off"
        ),
        "output_projector": "none",
        "generator": "none (text output)",
    }


def _training_section(folder: Path | None) -> str:
    """Markdown for the training stages and metrics recorded in a saved folder (if any)."""
    lines = []
    history = folder / "training_history.json" if folder else None
    if history and history.is_file():
        lines += ["## Training", "", "| stage | data | steps | final train loss | frozen | LoRA |", "|---|---|---|---|---|---|"]
        for stage in json.loads(history.read_text()):
            data = ", ".join(f"{k}={v}" for k, v in stage["data"].items())
            frozen = ", ".join(stage["frozen"]) or "nothing"
            lines.append(f"| {stage['recipe']} | {data} | {stage['steps']} | {stage['train_loss']:.4f} | {frozen} | "
                         f"{'yes' if stage['lora'] else 'no'} |")
        lines.append("")
    metrics = folder / "eval_results.json" if folder else None
    if metrics and metrics.is_file():
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in json.loads(metrics.read_text()).items()]
        lines.append("")
    return "\n".join(lines)


def render_model_card(model, repo_id: str | None = None, license: str = DEFAULT_LICENSE,
                      folder: Path | None = None) -> ModelCard:
    """The card of `model` (or of a PEFT adapter over it): Hub metadata, the five components, training stages and
    metrics recorded in `folder`, how to load it, what remote code runs."""
    adapter = hasattr(model, "get_base_model")
    base = model.get_base_model() if adapter else model
    config = base.config
    rows = _component_rows(config)
    base_models = config.base_models or ([config._name_or_path] if adapter and config._name_or_path else None)
    tags = ["mmllm", "multimodal", "image-text-to-text", f"projector-{config.projector_type}", "custom_code"]
    if config.modality_adaptive:
        tags.append("modality-adaptive")
    if adapter:
        tags.append("lora")
    card_data = ModelCardData(
        library_name="peft" if adapter else "transformers",
        pipeline_tag="image-text-to-text",
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
        f"{config.text_config.model_type} backbone" + (" with the modality-adaptive module" if
                                                        config.modality_adaptive else ""),
        parameters=f"Parameters: {base.num_parameters():,}." + (" This folder holds a LoRA adapter: load the base "
                                                                "model, then `PeftModel.from_pretrained(base, folder)`."
                                                                if adapter else ""),
        code_files=", ".join(f"`{name}`" for name in hub_set),
        training=_training_section(folder),
        **rows,
    )


def hub_set_files() -> list[str]:
    """The files `save_pretrained` copies next to a checkpoint: the model and processor modules and their imports."""
    package = Path(__file__).parent
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
