"""LoRA beyond the LLM (`lora.components`): adapters on the vision tower and the projector as well as the LLM, or the
vision tower trained fully beside LoRA on the LLM (`lora.trained_fully`); a recipe run saves adapters only for the
adapted components, and its merged folder gives the adapter's logits in a fresh process that cannot import mmllm."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from peft import get_peft_model
from safetensors.torch import load_file

from helpers import make_images, seeded_model
from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration, MMLLMProcessor
from modeling_mmllm.saving import save_model_folder
from modeling_mmllm.training import load_recipe, train
from modeling_mmllm.training.model_setup import apply_freeze_policy, build_model, lora_config

ADAPTER_AND_MERGED = """
import json, sys
sys.modules["modeling_mmllm"] = None  # only the folders' own code may run
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
base, adapter, merged, image = sys.argv[1:5]
with_adapter = AutoModelForImageTextToText.from_pretrained(base, trust_remote_code=True)
with_adapter = PeftModel.from_pretrained(with_adapter, adapter)
full = AutoModelForImageTextToText.from_pretrained(merged, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(merged, trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open(image)], text=[prompt], return_tensors="pt")
with torch.no_grad():
    logits = {"adapter": with_adapter(**inputs).logits[0, -1].tolist(), "merged": full(**inputs).logits[0, -1].tolist()}
print(json.dumps(logits))
"""


def _trainable(model, settings: dict, frozen: list[str]) -> set[str]:
    apply_freeze_policy(model, frozen)
    peft_model = get_peft_model(model, lora_config(model, settings))
    return {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}


def test_lora_components_put_adapters_where_named_and_the_rest_trains_as_the_freeze_policy_says():
    model, _ = build_model({"preset": "owl2-tiny"})
    everywhere = _trainable(model, {"components": ["language_model", "vision_tower", "multi_modal_projector"]}, [])
    for component in ("vision_tower.", "multi_modal_projector.", "language_model."):
        assert any(component in name and "lora_A" in name for name in everywhere), component
    assert all("lora_" in name for name in everywhere)  # nothing trains fully: every component has adapters

    model, _ = build_model({"preset": "owl2-tiny"})
    llm_only = _trainable(model, {}, [])  # as before: adapters on the LLM, the projector fully, the encoder frozen
    assert not any(".vision_tower." in name for name in llm_only)
    assert any(".multi_modal_projector.modules_to_save." in name for name in llm_only)
    model, _ = build_model({"preset": "owl2-tiny"})
    full_encoder = _trainable(model, {"trained_fully": ["vision_tower", "multi_modal_projector"]}, [])
    assert any(".vision_tower.modules_to_save." in name for name in full_encoder)
    assert not any(".vision_tower." in name and "lora_" in name for name in full_encoder)

    model, _ = build_model({"preset": "owl2-tiny"})
    clip_names = _trainable(model, {"components": ["vision_tower"], "target_modules": ["fc1", "fc2"]}, [])
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in clip_names if "lora_" in name} == {"fc1", "fc2"}
    with pytest.raises(ValueError, match=r"lora components \['vision'\]: choose from"):
        lora_config(model, {"components": ["vision"]})
    with pytest.raises(ValueError, match=r"lora trained_fully \['vision_tower'\]: name components without adapters"):
        lora_config(model, {"components": ["vision_tower"], "trained_fully": ["vision_tower"]})
    with pytest.raises(ValueError, match="no linear layer of vision_tower has these names"):
        lora_config(model, {"components": ["vision_tower"], "target_modules": ["gate_proj"]})


def test_lora_on_the_vision_tower_trains_adapters_only_and_merges_to_the_same_logits(tmp_path):
    base = save_model_folder(
        seeded_model(MMLLMConfig.from_preset("owl2-tiny")), MMLLMProcessor.from_preset("owl2-tiny"), tmp_path / "base"
    )
    recipe = {
        "model": {"path": str(base)},
        "data": {"synthetic": "vqa", "n": 16, "image_size": 32},
        "freeze": [],
        "lora": {"r": 4, "lora_alpha": 8, "components": ["vision_tower", "language_model"]},
        "merge_lora": True,
        "learning_rate": 5.0e-3,
        "output_dir": str(tmp_path / "run"),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "save_steps": 100,
        "report_to": "none",
        "dataloader_num_workers": 0,
    }
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(recipe))
    adapter = train(load_recipe(str(path)))

    saved = load_file(adapter / "adapter_model.safetensors")
    vision = [key for key in saved if ".vision_tower." in key]
    assert vision and all("lora_" in key for key in vision)  # the encoder's own weights stay the base's
    assert any(".multi_modal_projector." in key and "lora_" not in key for key in saved)  # the projector: fully
    merged = MMLLMForConditionalGeneration.from_pretrained(tmp_path / "run" / "merged")
    original = MMLLMForConditionalGeneration.from_pretrained(base)
    fc1 = "model.vision_tower.encoder.layers.1.mlp.fc1.weight"
    assert not torch.equal(merged.state_dict()[fc1], original.state_dict()[fc1])  # the adapter moved the encoder

    image = tmp_path / "image.png"
    make_images(1)[0].save(image)
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            ADAPTER_AND_MERGED,
            str(base),
            str(adapter),
            str(tmp_path / "run" / "merged"),
            str(image),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    logits = json.loads(run.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(logits["merged"]), torch.tensor(logits["adapter"]), atol=1e-4, rtol=1e-4)
