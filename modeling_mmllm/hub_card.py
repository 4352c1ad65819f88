"""Model cards for saved folders and Hub repos, rendered from `hub_cards/` (library side)."""

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
        "output_projector": "none",
        "generator": "none (text output)",
    }


def render_model_card(model, repo_id: str | None = None, license: str = DEFAULT_LICENSE) -> ModelCard:
    """The card of `model`: Hub metadata, the five components, how to load it, what remote code runs."""
    config = model.config
    rows = _component_rows(config)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=license,
        base_model=config.base_models or None,
        tags=["mmllm", "multimodal", "image-text-to-text", f"projector-{config.projector_type}", "custom_code"],
    )
    hub_set = sorted(Path(module).name for module in hub_set_files())
    return ModelCard.from_template(
        card_data,
        template_path=str(asset_dir("hub_cards") / "model_card.md"),
        model_name=repo_id or "mmllm model",
        repo_id=repo_id or "path/to/this/folder",
        architecture_line=f"{config.vision_config.model_type} encoder + {config.projector_type} projector + "
        f"{config.text_config.model_type} backbone",
        parameters=f"Parameters: {model.num_parameters():,}.",
        code_files=", ".join(f"`{name}`" for name in hub_set),
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
    render_model_card(model, repo_id=repo_id).save(Path(save_directory) / "README.md")


__all__ = ["hub_set_files", "render_model_card", "write_model_card"]
