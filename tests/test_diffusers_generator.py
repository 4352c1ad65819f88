"""The diffusers modality generator (issue #8): a Stable Diffusion-family pipeline conditioned through `prompt_embeds`.

A tiny random SD pipeline (CLIP text encoder + UNet + VAE + DDIM, 32x32 images) is built from configs offline and
saved once per session; the LLM side is `owl2-tiny` with `enable_image_generation`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from helpers import CONDITION_LENGTH, CONDITION_WIDTH, IMAGE_SIZE, save_tiny_stable_diffusion
from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration, MMLLMProcessor
from modeling_mmllm.modality_generator import (
    PIPELINE_FOLDER,
    DiffusersImageGenerator,
    diffusers_generator_settings,
    resolve_generator_settings,
)
from modeling_mmllm.saving import save_model_folder

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["Draw a red square.", "Paint the sea at night."]
GENERATE = {"max_new_tokens": 4, "do_sample": False, "generator_kwargs": {"seed": 0}}


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    """A tiny random StableDiffusionPipeline saved with diffusers' `save_pretrained` (safetensors)."""
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def any2any(sd_folder):
    """owl2-tiny with signal tokens, a transformer output projector and the tiny SD pipeline as generator."""
    torch.manual_seed(0)
    model = MMLLMForConditionalGeneration(MMLLMConfig.from_preset("owl2-tiny")).eval()
    processor = MMLLMProcessor.from_preset("owl2-tiny")
    model.enable_image_generation(
        processor, modality_generator={"type": "diffusers", "pretrained": str(sd_folder), "num_inference_steps": 2}
    )
    return model, processor


@pytest.fixture(scope="module")
def texts(any2any):
    _, processor = any2any
    return [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": prompt}]}], add_generation_prompt=True
        )
        for prompt in PROMPTS
    ]


@pytest.fixture(scope="module")
def generated(any2any, texts):
    model, processor = any2any
    inputs = processor(text=texts, return_tensors="pt", padding=True)
    return model.generate(**inputs, generation_mode="image", **GENERATE)


@pytest.fixture(scope="module")
def saved_folder(any2any, tmp_path_factory):
    model, processor = any2any
    return save_model_folder(model, processor, tmp_path_factory.mktemp("saved") / "any2any-sd")


def test_generate_returns_a_batch_of_images_in_0_1(generated):
    assert generated.shape == (len(PROMPTS), 3, IMAGE_SIZE, IMAGE_SIZE)
    assert generated.dtype == torch.float32
    assert 0 <= generated.min() <= generated.max() <= 1


def test_conditioning_shape_is_the_pipelines_prompt_embeds(any2any, sd_folder):
    model, _ = any2any
    pipeline = model.model.modality_generator.pipeline
    shape = (pipeline.tokenizer.model_max_length, pipeline.text_encoder.config.hidden_size)
    assert shape == (CONDITION_LENGTH, CONDITION_WIDTH)
    settings = diffusers_generator_settings(str(sd_folder))
    assert (settings["condition_length"], settings["condition_width"]) == shape
    assert (
        model.config.modality_generator["condition_length"],
        model.config.modality_generator["condition_width"],
    ) == shape
    signal_states = torch.randn(3, len(model.config.signal_token_ids), model.config.text_config.hidden_size)
    assert model.model.get_generation_conditioning(signal_states).shape == (3, *shape)


def test_encode_prompt_is_the_pipelines_own(any2any, sd_folder):
    model, processor = any2any
    reference = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder)
    expected, _ = reference.encode_prompt(PROMPTS, "cpu", 1, False)
    encoded = model.model.modality_generator.encode_prompt(PROMPTS, processor.tokenizer)
    assert encoded.shape == (len(PROMPTS), CONDITION_LENGTH, CONDITION_WIDTH)
    torch.testing.assert_close(encoded, expected, rtol=0, atol=0)


def test_image_loss_trains_the_conditioning_only(any2any):
    generator = any2any[0].model.modality_generator
    conditioning = torch.randn(2, CONDITION_LENGTH, CONDITION_WIDTH, requires_grad=True)
    images = torch.rand(2, 3, 40, 40)  # resized to the pipeline's 32x32
    loss = generator.image_loss(conditioning, images, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert conditioning.grad is not None and conditioning.grad.abs().sum() > 0
    for name, component in generator.pipeline.components.items():
        if isinstance(component, torch.nn.Module):
            assert all(not p.requires_grad and p.grad is None for p in component.parameters()), name


def test_settings_are_explicit_and_checked(sd_folder):
    settings = resolve_generator_settings({"type": "diffusers", "pretrained": str(sd_folder)})
    assert set(settings) == {"type", *DiffusersImageGenerator.DEFAULTS}
    assert settings["condition_length"] == CONDITION_LENGTH and settings["condition_width"] == CONDITION_WIDTH
    with pytest.raises(ValueError, match="does not use"):
        resolve_generator_settings({"type": "diffusers", "pretrained": str(sd_folder), "height": 64})
    with pytest.raises(ValueError, match="needs 'pretrained'"):
        resolve_generator_settings({"type": "diffusers"})
    with pytest.raises(ValueError, match="'/no/such/sd': no such pipeline folder"):
        resolve_generator_settings({"type": "diffusers", "pretrained": "/no/such/sd"})
    wrong = DiffusersImageGenerator({**settings, "condition_width": 48})
    with pytest.raises(ValueError, match="diffusers_generator_settings"):
        _ = wrong.pipeline


def test_a_hub_pipeline_stays_a_reference(tmp_path):
    generator = DiffusersImageGenerator(
        {"pretrained": "someone/tiny-sd", "condition_length": 77, "condition_width": 768}
    )
    assert generator.save_pretrained(tmp_path) == "someone/tiny-sd"
    assert not list(tmp_path.iterdir())


def test_saved_folder_carries_the_pipeline(any2any, saved_folder, sd_folder):
    model, _ = any2any
    pipeline_folder = saved_folder / PIPELINE_FOLDER
    weights = sorted(p.relative_to(pipeline_folder).as_posix() for p in pipeline_folder.rglob("*.safetensors"))
    assert weights == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert not [p for p in saved_folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth")]
    config = json.loads((saved_folder / "config.json").read_text())
    assert config["modality_generator"]["pretrained"] == PIPELINE_FOLDER
    assert "AutoModelForMultimodalLM" in config["auto_map"]
    assert model.config.modality_generator["pretrained"] == str(sd_folder)  # the live model keeps its source
    with safe_open(saved_folder / "model.safetensors", "pt") as weights_file:  # the pipeline is not model weights
        assert not [key for key in weights_file.keys() if "modality_generator" in key or "unet" in key]
    reloaded = MMLLMForConditionalGeneration.from_pretrained(saved_folder)
    assert os.path.samefile(reloaded.model.modality_generator.source, pipeline_folder)


def test_save_pretrained_pushes_the_complete_folder(any2any, tmp_path, monkeypatch):
    """`save_pretrained(push_to_hub=True)` uploads after the pipeline sub-folder and the card are written."""
    model, _ = any2any
    calls = {}
    monkeypatch.setattr(
        "huggingface_hub.HfApi.create_repo",
        lambda self, repo_id, private=None, exist_ok=False: (
            calls.update(repo=(repo_id, private)) or SimpleNamespace(repo_id=repo_id)
        ),
    )

    def upload_folder(self, repo_id, folder_path, allow_patterns, **kwargs):
        calls["files"] = set(allow_patterns)
        calls["card"] = (Path(folder_path) / "README.md").read_text()

    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", upload_folder)
    folder = tmp_path / "any2any-sd"
    model.save_pretrained(folder, push_to_hub=True, repo_id="me/any2any-sd", private=True)
    assert calls["repo"] == ("me/any2any-sd", True)
    assert calls["files"] == {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {
        "README.md",
        "model.safetensors",
        f"{PIPELINE_FOLDER}/unet/diffusion_pytorch_model.safetensors",
        f"{PIPELINE_FOLDER}/model_index.json",
    } <= calls["files"]
    assert "Modality Generator" in calls["card"]
    (folder / "notes.txt").write_text("not part of the model")
    model.save_pretrained(folder, push_to_hub=True, repo_id="me/any2any-sd")  # the same weights, rewritten
    assert "notes.txt" not in calls["files"] and "model.safetensors" in calls["files"]


FRESH_PROCESS = """
import json, sys
sys.modules["modeling_mmllm"] = None  # only the folder's code may run
import torch
from transformers import AutoModelForMultimodalLM, AutoProcessor
folder, out, texts, generate = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
model = AutoModelForMultimodalLM.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
inputs = processor(text=texts, return_tensors="pt", padding=True)
torch.save({"images": model.generate(**inputs, generation_mode="image", **generate),
            "module": type(model).__module__}, out)
"""


@pytest.mark.slow
def test_fresh_process_without_the_package_generates_the_same_images(saved_folder, generated, texts, tmp_path):
    out = tmp_path / "images.pt"
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(saved_folder), str(out), json.dumps(texts), json.dumps(GENERATE)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reported = torch.load(out)
    assert reported["module"].startswith("transformers_modules.")
    # Measured: the pipeline is bit-identical for the same conditioning, and two fresh processes agree bit for bit;
    # the reloaded LLM side differs from the in-memory one by float rounding (conditioning ~6e-7, pixels ~1.3e-6).
    torch.testing.assert_close(reported["images"], generated, rtol=0, atol=1e-5)


WITHOUT_DIFFUSERS = """
import json, sys
sys.modules["modeling_mmllm"] = None
sys.modules["diffusers"] = None  # not installed
from transformers import AutoModelForMultimodalLM, AutoProcessor
folder, texts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForMultimodalLM.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
inputs = processor(text=texts, return_tensors="pt", padding=True)
ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
try:
    model.generate(**inputs, generation_mode="image", max_new_tokens=4, do_sample=False)
    error = None
except ImportError as caught:
    error = str(caught)
print(json.dumps({"text_shape": list(ids.shape), "error": error}))
"""


@pytest.mark.slow
def test_without_diffusers_text_works_and_images_name_the_install(saved_folder, texts):
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_DIFFUSERS, str(saved_folder), json.dumps(texts)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reported = json.loads(result.stdout.strip().splitlines()[-1])
    assert reported["text_shape"][0] == len(texts)
    assert reported["error"] and "pip install mmllm[generation]" in reported["error"]
