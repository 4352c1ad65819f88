"""Shared fixtures: tiny models, processors, images and one saved folder, built once per session."""

import os
import subprocess
import sys
from pathlib import Path

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
ROOT = Path(__file__).parent.parent


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


def perturb_branches(model, modality: int = 1, seed: int = 0) -> None:
    """Move one modality's modality-adaptive branches away from the text branch (so routing shows in outputs)."""
    from modeling_mmllm.modality_adaptive import Multiway

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Multiway) and str(modality) in module.multiway:
                for parameter in module.multiway[str(modality)].parameters():
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)


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
def quickstart_run(tmp_path_factory) -> dict:
    """The README's first command, `./run quickstart`, run once (about 4.5 minutes) and shared by many tests.

    It runs in a working folder that later README commands also use (`runs/quickstart` is its output).
    """
    workdir = tmp_path_factory.mktemp("readme")
    output = workdir / "runs" / "quickstart"
    env = {**os.environ, "MMLLM_VENV": sys.prefix, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run([str(ROOT / "run"), "quickstart", "--output", str(output)], capture_output=True, text=True,
                         timeout=1200, env=env)
    return {"workdir": workdir, "output": output, "returncode": run.returncode, "stdout": run.stdout,
            "stderr": run.stderr, **{f"stage{index}": output / f"stage{index}" / "model" for index in range(3)}}


@pytest.fixture(scope="session")
def staged_run(quickstart_run) -> dict:
    """The quickstart's three stage folders (stage 0 text, stage 1, stage 2), trained by the shipped recipes."""
    assert quickstart_run["returncode"] == 0, quickstart_run["stderr"][-3000:]
    return quickstart_run
