"""Import existing checkpoints into the mmllm family (library side).

Each converter translates the config and renames the state dict, then loads it strictly: any unmatched key is
an error, never a silently random weight. `from_llava` and `from_llava_next` need no renaming (LLaVA's names are
ours); `from_blip2` moves the Q-Former, its queries and the language projection into our `qformer` projector;
`from_idefics` moves IDEFICS's gated cross-attention layers into the decoder layers they precede.
"""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoTokenizer,
    Blip2ForConditionalGeneration,
    CLIPImageProcessorPil,
    IdeficsForVisionText2Text,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

from ..component_settings import GRID_PROJECTORS
from ..configuration_mmllm import MMLLMConfig, backbone_context
from ..modeling_mmllm import MMLLMForConditionalGeneration


def _load(model_or_path, model_class: type[nn.Module]) -> nn.Module:
    if isinstance(model_or_path, model_class):
        return model_or_path
    if isinstance(model_or_path, (str, Path)):
        return model_class.from_pretrained(model_or_path)
    raise TypeError(
        f"Expected a {model_class.__name__} or the path of one saved with save_pretrained, "
        f"got {type(model_or_path).__name__}."
    )


def rename_keys(state_dict: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Rename state-dict keys with the first matching `(regex, replacement)` rule; keys matching none are kept."""
    renamed = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in rules:
            if re.match(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        renamed[key] = tensor
    return renamed


# mPLUG-Owl2's visual abstractor -> our `abstractor` projector (relative to the abstractor module).
ABSTRACTOR_KEY_RULES = [
    (r"^encoder\.layers\.(\d+)\.crossattention\.attention\.(query|key|value)\.", r"layers.\1.\2."),
    (r"^encoder\.layers\.(\d+)\.crossattention\.output\.", r"layers.\1."),
    (r"^encoder\.layers\.(\d+)\.crossattention\.", r"layers.\1."),
    (r"^vit_eos$", "end_token"),
]
# Fixed sin-cos tables that the original stores as buffers and we compute.
ABSTRACTOR_COMPUTED = re.compile(r"\.attention\.(q|k)_pos_embed$")


def convert_abstractor_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original mPLUG-Owl2 abstractor state dict (keys relative to `visual_abstractor.`) in our names."""
    kept = {key: tensor for key, tensor in state_dict.items() if not ABSTRACTOR_COMPUTED.search(key)}
    return rename_keys(kept, ABSTRACTOR_KEY_RULES)


BLIP2_KEY_RULES = [
    (r"^vision_model\.", "model.vision_tower."),
    (r"^(query_tokens|qformer\.|language_projection\.)", r"model.multi_modal_projector.\1"),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
]


def from_blip2(model_or_path) -> MMLLMForConditionalGeneration:
    """Convert a BLIP-2 model with a decoder-only LM (transformers' `Blip2ForConditionalGeneration`, OPT).

    The result is our `qformer` projector over BLIP-2's ViT (post-LayerNorm on every token, CLS kept), with equal
    logits on the same inputs.
    """
    blip2 = _load(model_or_path, Blip2ForConditionalGeneration)
    source = blip2.config
    if not source.use_decoder_only_language_model:
        raise ValueError(
            f"from_blip2 converts BLIP-2 models with a decoder-only language model (OPT); this one uses "
            f"{source.text_config.model_type!r} (encoder-decoder), which mmllm does not support."
        )
    config = MMLLMConfig(
        vision_config=source.vision_config.to_dict(),
        text_config=source.text_config.to_dict(),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_feature_layernorm=True,
        projector_type="qformer",
        projector_config={"num_query_tokens": source.num_query_tokens, **source.qformer_config.to_diff_dict()},
        image_token_id=source.image_token_id,
        tie_word_embeddings=source.text_config.tie_word_embeddings,
        base_models=[source._name_or_path] if source._name_or_path else None,
    )
    model = MMLLMForConditionalGeneration(config).to(blip2.dtype)
    model.load_state_dict(rename_keys(blip2.state_dict(), BLIP2_KEY_RULES), strict=True)
    model.generation_config = blip2.generation_config
    return model.eval()


MPLUG_OWL2_KEY_RULES = [
    (r"^model\.vision_model\.embeddings\.cls_token$", "model.vision_tower.embeddings.class_embedding"),
    (
        r"^model\.vision_model\.embeddings\.position_embedding$",
        "model.vision_tower.embeddings.position_embedding.weight",
    ),
    (r"^model\.vision_model\.embeddings\.patch_embed\.", "model.vision_tower.embeddings.patch_embedding."),
    (r"^model\.vision_model\.embeddings\.pre_layernorm\.", "model.vision_tower.pre_layrnorm."),
    (
        r"^model\.vision_model\.encoder\.layers\.(\d+)\.input_layernorm\.",
        r"model.vision_tower.encoder.layers.\1.layer_norm1.",
    ),
    (
        r"^model\.vision_model\.encoder\.layers\.(\d+)\.post_attention_layernorm\.",
        r"model.vision_tower.encoder.layers.\1.layer_norm2.",
    ),
    (
        r"^model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.dense\.",
        r"model.vision_tower.encoder.layers.\1.self_attn.out_proj.",
    ),
    (r"^model\.vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"model.vision_tower.encoder.layers.\1.mlp."),
    (r"^model\.vision_model\.post_layernorm\.", "model.vision_tower.post_layernorm."),
    (r"^model\.(layers|embed_tokens|norm)\.", r"model.language_model.\1."),
]


IDEFICS_KEY_RULES = [
    (r"^model\.vision_model\.", "model.vision_tower."),
    (r"^model\.perceiver_resampler\.", "model.multi_modal_projector.perceiver."),
    (r"^model\.(layers|embed_tokens|norm)\.", r"model.language_model.\1."),
]


def _idefics_config(source, image_token_id: int | None) -> MMLLMConfig:
    """IDEFICS's config in our terms: a CLIP-style encoder (last layer, CLS kept), the perceiver as the `resampler`
    projector, LLaMA with the additional vocabulary appended, cross-attention fusion with IDEFICS's settings."""
    if not source.use_resampler:
        raise ValueError(
            "from_idefics converts IDEFICS models with the perceiver resampler (use_resampler=True, as IDEFICS-9B and "
            "-80B); without it the cross-attention reads the raw vision features, which mmllm has no projector for."
        )
    vocab_size = source.vocab_size + source.additional_vocab_size
    if image_token_id is None:
        if source.additional_vocab_size < 2:
            raise ValueError(
                "IDEFICS's tokenizer puts <fake_token_around_image> and <image> after the vocabulary "
                f"(additional_vocab_size=2); this model has {source.additional_vocab_size}: pass image_token_id."
            )
        image_token_id = source.vocab_size + 1
    vision, perceiver = source.vision_config, source.perceiver_config
    text_fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "rms_norm_eps")
    text_fields += ("max_position_embeddings", "hidden_act", "pad_token_id", "bos_token_id", "eos_token_id")
    return MMLLMConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=vision.embed_dim,
            intermediate_size=vision.intermediate_size,
            num_hidden_layers=vision.num_hidden_layers,
            num_attention_heads=vision.num_attention_heads,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            num_channels=vision.num_channels,
            hidden_act=vision.hidden_act,
            layer_norm_eps=vision.layer_norm_eps,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=vocab_size,
            num_key_value_heads=source.num_attention_heads,
            rope_parameters=dict(source.rope_parameters),
            tie_word_embeddings=False,
            **{key: getattr(source, key) for key in text_fields},
        ),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_type="resampler",
        projector_config=dict(
            num_latents=perceiver.resampler_n_latents,
            depth=perceiver.resampler_depth,
            num_heads=perceiver.resampler_n_heads,
            head_dim=perceiver.resampler_head_dim,
            qk_layer_norms=perceiver.qk_layer_norms_perceiver,
        ),
        fusion="cross_attention",
        cross_attention_config=dict(
            cross_layer_interval=source.cross_layer_interval,
            qk_layer_norms=source.qk_layer_norms,
            alpha_type=source.alpha_type,
        ),
        image_token_id=image_token_id,
        base_models=[source._name_or_path] if source._name_or_path else None,
    )


def _idefics_state_dict(idefics: nn.Module, interval: int) -> dict[str, torch.Tensor]:
    """IDEFICS's weights in our names: decoupled embeddings and LM head merged into one table each (the additional
    tokens last), each gated cross-attention layer moved into the decoder layer it runs before."""
    weights = {key: tensor for key, tensor in idefics.state_dict().items() if "rotary_emb" not in key}
    for merged, extra in (
        ("model.embed_tokens.weight", "model.embed_tokens.additional_embedding.weight"),
        ("lm_head.weight", "lm_head.additional_fc.weight"),
    ):
        if extra in weights:
            weights[merged] = torch.cat([weights[merged], weights.pop(extra)])
    state_dict = rename_keys(weights, IDEFICS_KEY_RULES)
    for key in [key for key in state_dict if key.startswith("model.gated_cross_attn_layers.")]:
        index, rest = key[len("model.gated_cross_attn_layers.") :].split(".", 1)
        state_dict[f"model.language_model.layers.{int(index) * interval}.gated_cross_attn.{rest}"] = state_dict.pop(key)
    return state_dict


def from_idefics(model_or_path, image_token_id: int | None = None) -> MMLLMForConditionalGeneration:
    """Convert an IDEFICS model (transformers' `IdeficsForVisionText2Text`, the open Flamingo) into ours.

    Logits are equal on the same inputs (`input_ids`, `pixel_values` as `[batch, images, 3, H, W]` or flattened,
    `image_attention_mask` or the latest-image default). `image_token_id` defaults to IDEFICS's tokenizer's
    `<image>`: the vocabulary size + 1, after `<fake_token_around_image>`.
    """
    idefics = _load(model_or_path, IdeficsForVisionText2Text)
    source = idefics.config
    if source.num_hidden_layers % source.cross_layer_interval:
        raise ValueError(
            f"IDEFICS with {source.num_hidden_layers} layers and cross_layer_interval={source.cross_layer_interval} "
            "has fewer cross-attention layers than the layers it applies them to: it cannot run as it is."
        )
    config = _idefics_config(source, image_token_id)
    config._attn_implementation = source._attn_implementation
    model = MMLLMForConditionalGeneration(config).to(idefics.dtype)
    model.load_state_dict(_idefics_state_dict(idefics, source.cross_layer_interval), strict=True)
    model.generation_config = idefics.generation_config
    return model.eval()


def _read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """All weights of an original checkpoint folder: `model*.safetensors` shards, else `pytorch_model*.bin`."""
    files = sorted(folder.glob("model*.safetensors"))
    if files:
        return {key: tensor for file in files for key, tensor in load_file(file).items()}
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"No weights (model*.safetensors or pytorch_model*.bin) in {folder}.")
    return {
        key: tensor for file in files for key, tensor in torch.load(file, map_location="cpu", weights_only=True).items()
    }


def _split_fused_qkv(state_dict: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """The original vision attention fuses q/k/v per head (`heads, 3, head_dim`): split it into q/k/v projections."""
    converted = {}
    for key, tensor in state_dict.items():
        match = re.match(
            r"^model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.query_key_value\.(weight|bias)$", key
        )
        if not match:
            converted[key] = tensor
            continue
        layer, kind = match.groups()
        per_head = tensor.reshape(num_heads, 3, -1, *tensor.shape[1:])
        for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
            converted[f"model.vision_tower.encoder.layers.{layer}.self_attn.{name}.{kind}"] = per_head[
                :, index
            ].reshape(-1, *tensor.shape[1:])
    return converted


def _mplug_owl2_config(raw: dict) -> MMLLMConfig:
    vision, abstractor = raw["visual_config"]["visual_model"], raw["visual_config"]["visual_abstractor"]
    if abstractor["hidden_size"] != vision["hidden_size"] or abstractor["encoder_hidden_size"] != vision["hidden_size"]:
        raise ValueError("The abstractor's hidden_size and encoder_hidden_size must equal the vision hidden_size.")
    text_fields = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "rms_norm_eps",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "hidden_act",
    )
    text_config = {key: raw[key] for key in text_fields if key in raw}
    text_config.update(
        model_type="llama",
        num_key_value_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
        attention_bias=raw.get("attention_bias", False),
        rope_parameters={"rope_type": "default", "rope_theta": raw.get("rope_theta", 10000.0)},
        vocab_size=raw["vocab_size"] + 1,  # the image placeholder token, added after the original vocabulary
    )
    return MMLLMConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=vision["hidden_size"],
            intermediate_size=vision["intermediate_size"],
            num_hidden_layers=vision["num_hidden_layers"],
            num_attention_heads=vision["num_attention_heads"],
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            hidden_act=vision.get("hidden_act", "quick_gelu"),
            layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
            projection_dim=vision.get("projection_dim", 768),
        ),
        text_config=text_config,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_feature_layernorm=True,
        projector_type="abstractor",
        projector_config=dict(
            num_queries=abstractor["num_learnable_queries"],
            num_layers=abstractor["num_hidden_layers"],
            num_heads=abstractor["num_attention_heads"],
            intermediate_size=abstractor["intermediate_size"],
            layer_norm_eps=abstractor.get("layer_norm_eps", 1e-6),
            end_token=True,
        ),
        image_token_id=raw["vocab_size"],
        modality_adaptive=True,
        modality_adaptive_modalities=[1],
    )


def from_mplug_owl2(path):
    """Convert an original mPLUG-Owl2 checkpoint folder into `(model, processor)`.

    The vision tower becomes a CLIP vision model (fused q/k/v split per head, post-LayerNorm on every token), the
    abstractor our `abstractor` projector, the LLaMA backbone keeps its multiway K/V/norms as our
    modality-adaptive module (branch 0 text, 1 image). The image token is appended after the original vocabulary
    and never generated. `processor` is None when the folder has no tokenizer.
    """
    from ..modality_adaptive import module_tree_key
    from ..processing_mmllm import MMLLMProcessor
    from .presets import chat_template

    folder = Path(path)
    raw = json.loads((folder / "config.json").read_text())
    if "visual_config" not in raw:
        raise ValueError(f"{folder} is not an original mPLUG-Owl2 checkpoint (its config.json has no visual_config).")
    config = _mplug_owl2_config(raw)
    weights = _split_fused_qkv(_read_checkpoint(folder), config.vision_config.num_attention_heads)
    abstractor = {
        k[len("model.visual_abstractor.") :]: v for k, v in weights.items() if k.startswith("model.visual_abstractor.")
    }
    state_dict = {
        k: v for k, v in weights.items() if not k.startswith("model.visual_abstractor.") and "rotary_emb" not in k
    }
    state_dict = rename_keys(state_dict, MPLUG_OWL2_KEY_RULES)
    state_dict.update(
        {f"model.multi_modal_projector.{k}": v for k, v in convert_abstractor_state_dict(abstractor).items()}
    )
    state_dict["model.vision_tower.embeddings.class_embedding"] = state_dict[
        "model.vision_tower.embeddings.class_embedding"
    ].reshape(-1)
    position = state_dict["model.vision_tower.embeddings.position_embedding.weight"]
    state_dict["model.vision_tower.embeddings.position_embedding.weight"] = position.reshape(-1, position.shape[-1])
    embeddings = state_dict["model.language_model.embed_tokens.weight"]
    state_dict["model.language_model.embed_tokens.weight"] = torch.cat([embeddings, embeddings.mean(0, keepdim=True)])
    head = state_dict["lm_head.weight"]
    state_dict["lm_head.weight"] = torch.cat([head, head.new_zeros(1, head.shape[1])])

    model = MMLLMForConditionalGeneration(config)
    model.load_state_dict({module_tree_key(key): tensor for key, tensor in state_dict.items()}, strict=True)
    model.generation_config.suppress_tokens = [config.image_token_id]
    model.generation_config.bos_token_id = raw.get("bos_token_id")
    model.generation_config.eos_token_id = raw.get("eos_token_id")
    processor = None
    if any((folder / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(
            folder, extra_special_tokens={"image_token": "<image>"}, padding_side="left"
        )
        if tokenizer.image_token_id != config.image_token_id:
            raise ValueError(
                f"The tokenizer has {tokenizer.image_token_id} tokens before <image>, but the checkpoint's vocabulary "
                f"has {raw['vocab_size']}: the tokenizer does not belong to these weights."
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        size = config.vision_config.image_size
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        processor = MMLLMProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=chat_template(),
            image_seq_length=config.image_seq_length,
            context_length=backbone_context(config),
            pad_to_square=True,
        )
    return model.eval(), processor


def _dict_image_processor(image_processor):
    """IDEFICS's image processor returns a bare tensor; the same steps (a square resize, rescale, normalise) as a CLIP
    processor, which returns `pixel_values` as processors do. Others are kept."""
    if type(image_processor).__name__ not in ("IdeficsImageProcessor", "IdeficsImageProcessorPil"):
        return image_processor
    return CLIPImageProcessorPil(
        size=dict(image_processor.size),
        do_center_crop=False,
        resample=image_processor.resample,
        image_mean=image_processor.image_mean,
        image_std=image_processor.image_std,
    )


def convert_processor(source, config: MMLLMConfig):
    """An `MMLLMProcessor` from a converted checkpoint folder's own processor (None when it has none)."""
    from transformers import AutoProcessor

    from ..processing_mmllm import MMLLMProcessor
    from .presets import chat_template

    try:
        original = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError):
        return None
    tokenizer = original.tokenizer
    if getattr(tokenizer, "image_token", None) is None:
        token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        tokenizer = AutoTokenizer.from_pretrained(source, extra_special_tokens={"image_token": token})
    tokenizer.padding_side = "left"
    return MMLLMProcessor(
        image_processor=_dict_image_processor(original.image_processor),
        tokenizer=tokenizer,
        chat_template=getattr(original, "chat_template", None) or chat_template(),
        image_seq_length=config.image_seq_length,
        context_length=backbone_context(config),
        grid_packing=config.image_grid_pinpoints is not None and config.projector_type in GRID_PROJECTORS,
    )


def from_llava(model_or_path) -> MMLLMForConditionalGeneration:
    """Convert a LLaVA model (transformers' `LlavaForConditionalGeneration`) into `MMLLMForConditionalGeneration`.

    Logits are equal on the same inputs (the LLaVA projector is our `mlp` projector of depth 2).
    """
    return _from_llava_family(_load(model_or_path, LlavaForConditionalGeneration))


def from_llava_next(model_or_path) -> MMLLMForConditionalGeneration:
    """Convert a LLaVA-NeXT model (transformers' `LlavaNextForConditionalGeneration`): LLaVA plus AnyRes tiling
    (`image_grid_pinpoints`) and the learned `image_newline`. Logits are equal on `LlavaNextProcessor`'s outputs."""
    llava_next = _load(model_or_path, LlavaNextForConditionalGeneration)
    return _from_llava_family(llava_next, image_grid_pinpoints=llava_next.config.image_grid_pinpoints)


def _from_llava_family(llava: nn.Module, **fields) -> MMLLMForConditionalGeneration:
    """LLaVA's names are ours: translate the config, then load the state dict strictly."""
    source = llava.config
    config = MMLLMConfig(
        vision_config=source.vision_config.to_dict(),
        text_config=source.text_config.to_dict(),
        vision_feature_layer=source.vision_feature_layer,
        vision_feature_select_strategy=source.vision_feature_select_strategy,
        projector_type="mlp",
        projector_depth=2,
        projector_hidden_act=source.projector_hidden_act,
        multimodal_projector_bias=source.multimodal_projector_bias,
        image_token_id=source.image_token_id,
        tie_word_embeddings=source.tie_word_embeddings,
        base_models=[source._name_or_path] if source._name_or_path else None,
        **fields,
    )
    model = MMLLMForConditionalGeneration(config).to(llava.dtype)
    model.load_state_dict(llava.state_dict(), strict=True)
    model.generation_config = llava.generation_config
    return model.eval()


__all__ = [
    "convert_abstractor_state_dict",
    "convert_processor",
    "from_blip2",
    "from_idefics",
    "from_llava",
    "from_llava_next",
    "from_mplug_owl2",
    "rename_keys",
]
