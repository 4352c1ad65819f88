"""Shared fixtures: tiny models, processors, images and one saved folder, built once per session."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    SiglipVisionConfig,
)

from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration, MMLLMProcessor
from modeling_mmllm.saving import save_model_folder

VOCAB = 512


def tiny_vision_config(kind: str = "clip", **overrides):
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                  patch_size=8)
    if kind == "clip":
        return CLIPVisionConfig(**{**common, "projection_dim": 32, **overrides})
    if kind == "siglip":
        return SiglipVisionConfig(**{**common, **overrides})
    raise ValueError(kind)


def tiny_text_config(kind: str = "llama", **overrides):
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0,
                  eos_token_id=1, bos_token_id=None)
    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if kind in classes:
        return classes[kind](**{**common, **overrides})
    if kind == "gpt2":
        fields = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256, pad_token_id=0,
                      eos_token_id=1, bos_token_id=None)
        return GPT2Config(**{**fields, **overrides})
    raise ValueError(kind)


def make_images(n: int, seed: int = 0, size=(40, 48)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


def seeded_model(config: MMLLMConfig, seed: int = 0) -> MMLLMForConditionalGeneration:
    torch.manual_seed(seed)
    model = MMLLMForConditionalGeneration(config).eval()
    # Untrained tiny models have near-uniform logits; scale the head so greedy choices are well separated.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


@pytest.fixture(scope="session")
def processor() -> MMLLMProcessor:
    return MMLLMProcessor.from_preset("llava-tiny")


@pytest.fixture(scope="session")
def tiny_model() -> MMLLMForConditionalGeneration:
    return seeded_model(MMLLMConfig.from_preset("llava-tiny"))


@pytest.fixture(scope="session")
def saved_folder(tmp_path_factory, tiny_model, processor):
    """The tiny preset model and its processor saved as a Hub-ready folder."""
    return save_model_folder(tiny_model, processor, tmp_path_factory.mktemp("saved") / "llava-tiny")


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    return make_images(4)


@pytest.fixture(scope="session")
def staged_run(tmp_path_factory):
    """The quickstart's three shipped recipes (stage 0 text, stage 1, stage 2), run once for many tests."""
    from modeling_mmllm.training import load_recipe, train

    root = tmp_path_factory.mktemp("staged")
    folders, model = {}, None
    for stage, recipe_name in enumerate(("quickstart-stage0-text", "quickstart-stage1", "quickstart-stage2")):
        overrides = {"output_dir": str(root / f"stage{stage}"), "report_to": "none"}
        if model is not None:
            overrides["model"] = str(model)
        model = train(load_recipe(recipe_name, overrides), name=recipe_name)
        folders[f"stage{stage}"] = model
    return folders
