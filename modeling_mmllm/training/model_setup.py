"""The model a recipe trains: building or loading it, image generation, freeze policies, LoRA, learning-rate scales
(library side)."""

from pathlib import Path

import torch
from torch import nn

from ..builders.presets import load_processor_preset
from ..configuration_mmllm import MMLLMConfig
from ..gated_cross_attention import cross_attention_blocks
from ..modeling_mmllm import MMLLMForConditionalGeneration
from ..processing_mmllm import MMLLMProcessor
from .recipe_sections import ModelSection, check_keys

COMPONENTS = ("vision_tower", "multi_modal_projector", "language_model", "output_projector", "modality_generator")
# The modules a parameter can be in (as optimizer groups report them), and what each per-component learning rate
# (`vision_tower_lr`, `projector_lr`) covers.
MODULES = (*COMPONENTS, "audio_tower", "audio_projector", "lm_head")
# Where `lora.components` may put adapters.
LORA_COMPONENTS = ("language_model", "vision_tower", "multi_modal_projector")
LR_COMPONENTS = {"vision_tower": ("vision_tower",), "projector": ("multi_modal_projector", "audio_projector")}


IMAGE_GENERATION_KEYS = ("output_projector_type", "num_signal_tokens", "modality_generator", "output_projector_config")


# Modules QLoRA leaves unquantized: the encoder, the projector, the head and the gated cross-attention blocks (new
# modules that train fully).
FULL_PRECISION = ("vision_tower", "multi_modal_projector", "lm_head", "gated_cross_attn")
# What a recipe that adds image generation freezes unless it says otherwise: all but the output projector
# (NExT-GPT's encoding-side alignment; the signal tokens' rows train too, see `train_signal_tokens`).
ALIGNMENT_FREEZE = ["vision_tower", "multi_modal_projector", "language_model", "modality_generator"]


def build_model(spec: dict | ModelSection) -> tuple[MMLLMForConditionalGeneration, MMLLMProcessor]:
    """The recipe's model and processor (`spec`: its `model` section): a preset, a saved folder (a previous stage),
    or pretrained components; with `image_generation`, NExT-GPT's output side is added (signal tokens, output
    projector, generator)."""
    section = ModelSection.parse("model", spec)
    model, processor = load_model(section)
    if section.image_generation is not None:
        enable_generation(model, processor, section.image_generation, seed=section.seed)
    return model, processor


def enable_generation(
    model: MMLLMForConditionalGeneration, processor: MMLLMProcessor, settings: dict, seed: int = 0
) -> None:
    """`model.enable_image_generation(processor, **settings)` with the recipe's keys checked and a fixed seed; the
    signal tokens' input embeddings start as distinct samples (`sample_signal_embeddings`)."""
    check_keys("image_generation", settings, IMAGE_GENERATION_KEYS)
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


def load_model(spec: dict | ModelSection) -> tuple[MMLLMForConditionalGeneration, MMLLMProcessor]:
    """The model and processor a recipe's `model` names (its one source), as they are stored (no components
    added)."""
    section = ModelSection.parse("model", spec)  # exactly one source
    if section.preset is not None:
        config = MMLLMConfig.from_preset(section.preset, **section.overrides)
        processor = load_processor_preset(MMLLMProcessor, section.preset, config)
        torch.manual_seed(section.seed)
        return MMLLMForConditionalGeneration(config), processor
    if section.path is not None:
        folder = Path(section.path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a model folder (no config.json): train the previous stage first.")
        model = MMLLMForConditionalGeneration.from_pretrained(folder, **load_kwargs(section))
        return model, MMLLMProcessor.from_pretrained(folder)
    if section.mplug_owl2 is not None:
        from ..builders.conversion import from_mplug_owl2

        model, processor = from_mplug_owl2(section.mplug_owl2)
        if processor is None:
            raise ValueError(f"{section.mplug_owl2} has no tokenizer: training needs one.")
        return model, processor
    components = dict(section.components)
    return MMLLMForConditionalGeneration.from_components(components.pop("vision"), components.pop("text"), **components)


def load_kwargs(spec: dict | ModelSection) -> dict:
    """`from_pretrained` options of a model spec: attention backend, dtype, device map, 4/8-bit quantization."""
    section = ModelSection.parse("model", spec)
    kwargs = {
        key: getattr(section, key)
        for key in ("attn_implementation", "dtype", "device_map")
        if getattr(section, key) is not None
    }
    if section.quantization:
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
        if section.quantization not in bits:
            raise ValueError(f"quantization={section.quantization!r}: use 4bit (QLoRA) or 8bit.")
        # The vision tower and the projector stay in full precision; only the LLM is quantized.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            **bits[section.quantization], llm_int8_skip_modules=list(FULL_PRECISION)
        )
    return kwargs


def frozen_components(freeze: list[str] | None, model_spec: dict | ModelSection | None) -> list[str]:
    """The recipe's `freeze` list; a recipe that adds image generation and names none trains the output projector
    alone (`ALIGNMENT_FREEZE`)."""
    if freeze is not None:
        return list(freeze)
    adds_generation = model_spec is not None and ModelSection.parse("model", model_spec).image_generation is not None
    return list(ALIGNMENT_FREEZE) if adds_generation else []


def apply_freeze_policy(
    model: nn.Module,
    frozen: list[str],
    train_modality_adaptive: bool = False,
    train_cross_attention: bool | None = None,
) -> None:
    """Freeze the named components. Freezing `language_model` also freezes the modules added inside the LLM; the
    recipe keeps them trainable with `train_modality_adaptive` (the modality-adaptive branches) and
    `train_cross_attention` (the gated cross-attention blocks, gates included; by default when the model has them:
    Flamingo trains them, and only them, inside its frozen LLM)."""
    unknown = set(frozen) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"Unknown components to freeze {sorted(unknown)}: choose from {list(COMPONENTS)}.")
    kept = llm_extension_parameters(model, train_modality_adaptive, train_cross_attention)  # checked first
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
    for parameter in kept:
        parameter.requires_grad_(True)


def llm_extension_parameters(
    model: nn.Module, modality_adaptive: bool, cross_attention: bool | None
) -> list[nn.Parameter]:
    """The parameters of the modules added inside the LLM that the recipe trains: the modality-adaptive branches
    (`modality_adaptive`) and the gated cross-attention blocks (`cross_attention`; None: when the model has any)."""
    blocks = cross_attention_blocks(model)
    if cross_attention and not blocks:
        raise ValueError(
            "train_cross_attention needs gated cross-attention blocks: use a model with fusion='cross_attention' "
            "(e.g. `model: {preset: flamingo-tiny}`), or drop the key."
        )
    kept = list(model.modality_adaptive_parameters()) if modality_adaptive else []
    if cross_attention is not False:
        kept += [parameter for block in blocks for parameter in block.parameters()]
    return kept


def signal_rows_train(model: MMLLMForConditionalGeneration, setting: bool | None, lora: bool = False) -> bool:
    """Whether the signal tokens' embedding and LM-head rows train alone (`train_signal_tokens`): by default when
    the model has signal tokens, its LM head is frozen and there is no LoRA (which uses PEFT's trainable tokens)."""
    if setting and not model.config.signal_token_ids:
        raise ValueError(
            "train_signal_tokens needs signal tokens: add image generation with `model: {image_generation: ...}` first."
        )
    head_frozen = not model.get_output_embeddings().weight.requires_grad
    if setting is not None:
        return bool(setting) and head_frozen
    return bool(model.config.signal_token_ids) and not lora and head_frozen


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
    """PEFT LoRA on every linear layer of the components named in `components` (default: the LLM, its
    modality-adaptive branches included; also `vision_tower` and `multi_modal_projector`), or on those of their layers
    named in `target_modules` (`[q_proj, k_proj, v_proj, o_proj]`: short names inside those components, never another
    component's layers of the same name; a string such as a regex goes to PEFT as it is). The components in
    `trained_fully` (default: the projector, unless it has adapters; `[vision_tower, multi_modal_projector]` trains
    the encoder fully beside LoRA on the LLM) and the gated cross-attention blocks (new modules, gates included: LoRA
    on a block behind a closed gate would get no gradient) train fully; PEFT freezes everything else.

    With image generation, the output projector trains fully too, the signal tokens' input embeddings through PEFT's
    trainable tokens, and an untied LM head as a trainable copy whose other rows `mask_peft_head_rows` keeps fixed
    (both saved with the adapter, merged by `merge_and_unload`).
    """
    from peft import LoraConfig

    settings = dict(settings)
    components = settings.pop("components", None) or ["language_model"]
    unknown = sorted(set(components) - set(LORA_COMPONENTS))
    if unknown:
        raise ValueError(f"lora components {unknown}: choose from {list(LORA_COMPONENTS)}.")
    blocks = {id(module) for block in cross_attention_blocks(model) for module in block.modules()}
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and component_of(name) in components and id(module) not in blocks
    ]
    if isinstance(settings.get("target_modules"), list):  # short names pick the components' layers of that name
        names = set(settings["target_modules"])
        settings["target_modules"] = [target for target in targets if target.rsplit(".", 1)[-1] in names]
        if not settings["target_modules"]:
            raise ValueError(
                f"lora target_modules {sorted(names)}: no linear layer of {', '.join(components)} has these names "
                "(LLaMA-style names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; CLIP's: q_proj, "
                "k_proj, v_proj, out_proj, fc1, fc2)."
            )
    trained_fully = settings.pop("trained_fully", None)
    if trained_fully is None:
        trained_fully = [] if "multi_modal_projector" in components else ["multi_modal_projector"]
    unknown = sorted(set(trained_fully) - set(LORA_COMPONENTS) | set(trained_fully) & set(components))
    if unknown:
        raise ValueError(
            f"lora trained_fully {unknown}: name components without adapters, from {list(LORA_COMPONENTS)}."
        )
    new_modules = [*trained_fully, *(["gated_cross_attn"] if blocks else [])]
    defaults = {
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "modules_to_save": new_modules,
    }
    if model.config.signal_token_ids:
        embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
        name = next(name for name, module in model.named_modules() if module is embeddings)
        defaults["trainable_token_indices"] = {name: list(model.config.signal_token_ids)}
        untied_head = ["lm_head"] if head.weight is not embeddings.weight else []
        defaults["modules_to_save"] = [*new_modules, "output_projector", *untied_head]
    return LoraConfig(**{**defaults, **settings})


def component_of(name: str) -> str:
    """The module (`MODULES`) a parameter or module name is in, wherever wrappers put it (PEFT, DDP); "other" for the
    rest."""
    return next((module for module in MODULES if f".{module}." in f".{name}."), "other")


def component_parameter_names(model: nn.Module, component: str) -> list[str]:
    """The names of the parameters a per-component learning rate covers (`LR_COMPONENTS`: `vision_tower`, or
    `projector` for every input projector); a clear error when the model has none."""
    modules = LR_COMPONENTS[component]
    names = [name for name, _ in model.named_parameters() if component_of(name) in modules]
    if not names:
        raise ValueError(f"{component}_lr is set, but this model has no {' or '.join(modules)}.")
    return names


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


__all__ = [
    "ALIGNMENT_FREEZE",
    "COMPONENTS",
    "LORA_COMPONENTS",
    "LR_COMPONENTS",
    "MODULES",
    "component_of",
    "component_parameter_names",
    "IMAGE_GENERATION_KEYS",
    "apply_freeze_policy",
    "build_model",
    "embedding_lr_scales",
    "enable_generation",
    "frozen_components",
    "llm_extension_parameters",
    "load_kwargs",
    "load_model",
    "lora_config",
    "mask_gradient_rows",
    "mask_peft_head_rows",
    "sample_signal_embeddings",
    "signal_rows_train",
    "train_token_rows",
    "vision_lr_scales",
]
