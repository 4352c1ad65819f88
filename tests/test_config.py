"""MMLLMConfig: presets, sub-configs of any encoder/backbone, validation, published parameter counts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import modeling_mmllm
from helpers import make_images, tiny_text_config, tiny_vision_config
from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration, MMLLMProcessor
from modeling_mmllm.builders.presets import preset_names

pytestmark = pytest.mark.hub


def test_llava_tiny_preset_fields():
    config = MMLLMConfig.from_preset("llava-tiny")
    assert config.model_type == "mmllm"
    assert config.vision_config.model_type == "clip_vision_model"
    assert config.text_config.model_type == "llama"
    assert (config.projector_type, config.projector_depth, config.projector_hidden_act) == ("mlp", 2, "gelu")
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.image_seq_length == 16  # (32 / 8)^2 patches, CLS dropped
    assert config.get_text_config(decoder=True) is config.text_config
    assert {"llava-tiny", "llava-1.5-7b"} <= set(preset_names())


def test_preset_overrides_and_json_round_trip(tmp_path):
    config = MMLLMConfig.from_preset("llava-tiny", projector_type="linear", vision_feature_select_strategy="full")
    assert config.image_seq_length == 17
    config.save_pretrained(tmp_path)
    reloaded = MMLLMConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mmllm"


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="Unknown preset 'llava-huge'.*llava-tiny"):
        MMLLMConfig.from_preset("llava-huge")


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_builds_on_the_meta_device(name):
    """Every shipped preset, its `base` chain resolved, is a valid config whose model builds."""
    config = MMLLMConfig.from_preset(name)
    with torch.device("meta"):
        model = MMLLMForConditionalGeneration(config)
    assert model.num_parameters() > 0


def test_a_preset_names_its_base_and_only_what_differs(tmp_path, monkeypatch):
    """`"base"`: sub-configs of the same type merge field by field, other values (a settings dict, a sub-config of
    another type) replace the base's; a cycle is a clear error."""
    from modeling_mmllm.builders import presets

    for name in ("llava-tiny", "llava-next-tiny"):
        (tmp_path / f"{name}.json").write_text((presets.asset_dir("configuration") / f"{name}.json").read_text())
    derived = {
        "base": "llava-next-tiny",
        "text_config": {"num_hidden_layers": 3},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        "vision_feature_select_strategy": "full",  # SigLIP has no CLS token to drop
        "projector_type": "linear",
    }  # fmt: skip
    (tmp_path / "derived.json").write_text(json.dumps(derived))
    (tmp_path / "loop-a.json").write_text(json.dumps({"base": "loop-b"}))
    (tmp_path / "loop-b.json").write_text(json.dumps({"base": "loop-a"}))
    monkeypatch.setattr(presets, "asset_dir", lambda kind: tmp_path)

    config = MMLLMConfig.from_preset("derived")
    base = MMLLMConfig.from_preset("llava-next-tiny")
    assert config.text_config.num_hidden_layers == 3
    assert config.text_config.hidden_size == base.text_config.hidden_size  # merged: the rest is the base's
    assert config.vision_config.model_type == "siglip_vision_model"  # another type: replaced whole
    assert config.image_grid_pinpoints == base.image_grid_pinpoints  # two levels up
    assert config.projector_type == "linear"
    with pytest.raises(ValueError, match="derives from itself.*loop-a -> loop-b -> loop-a"):
        MMLLMConfig.from_preset("loop-a")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"vision_feature_select_strategy": "cls"}, "use 'default'"),
        ({"vision_feature_layer": 7}, "out of range"),
        ({"projector_type": "conv"}, "Unknown projector_type 'conv'"),
        ({"image_seq_length": 99}, "leave image_seq_length unset or set it to 16"),
    ],
)
def test_invalid_fields_are_clear_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        MMLLMConfig.from_preset("llava-tiny", **fields)


@pytest.mark.parametrize("vision", ["clip", "siglip"])
@pytest.mark.parametrize("text", ["llama", "mistral", "qwen2", "gpt2"])
def test_any_encoder_and_backbone(vision, text):
    strategy = "full" if vision == "siglip" else "default"
    config = MMLLMConfig(
        vision_config=tiny_vision_config(vision).to_dict(),
        text_config=tiny_text_config(text).to_dict(),
        vision_feature_select_strategy=strategy,
        image_token_id=5,
    )
    assert config.image_seq_length == 16
    torch.manual_seed(0)
    model = MMLLMForConditionalGeneration(config).eval()
    # A backbone that ties its head (GPT-2) keeps it tied to its own embeddings, whatever their name.
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    assert tied == (text == "gpt2") == config.tie_word_embeddings
    processor = MMLLMProcessor.from_preset("llava-tiny")
    processor.image_seq_length = config.image_seq_length
    batch = processor(images=make_images(1), text=["<image>What is it?"], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (*batch["input_ids"].shape, 512)
    assert torch.isfinite(out.loss)
    assert out.image_hidden_states.shape == (1, 16, config.text_config.hidden_size)


def test_llava_1_5_7b_parameter_count_matches_transformers():
    config = MMLLMConfig.from_preset("llava-1.5-7b")
    with torch.device("meta"):
        model = MMLLMForConditionalGeneration(config)
    assert model.num_parameters() == 7_063_427_072
    assert config.image_seq_length == 576


def test_whisper_llava_7b_is_llava_1_5_plus_a_whisper_large_v3_branch():
    """LLaVA-1.5-7B's 7,063,427,072 + Whisper-large-v3's encoder + the audio projector + two new token rows."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    with torch.device("meta"):
        config = MMLLMConfig.from_preset("whisper-llava-7b")
        model = MMLLMForConditionalGeneration(config)
        encoder = WhisperEncoder(config.audio_config).num_parameters()
    assert encoder == 636_968_960  # Whisper-large-v3's encoder (32 layers x 1280, 128 mel bins)
    projector = 1280 * 4096 + 4096 + 4096 * 4096 + 4096
    assert model.num_parameters() == 7_063_427_072 + encoder + projector + 2 * 2 * 4096 == 7_722_440_704
    assert config.video_seq_length == 4 * 576 and config.audio_config.max_source_positions == 1500


LIGHT_IMPORT = """
import json, sys
from modeling_mmllm import MMLLMConfig
config = MMLLMConfig.from_preset("any2any-tiny", modality_generator={"type": "diffusers", "pretrained": "someone/sd"})
shape = [config.modality_generator[key] for key in ("condition_length", "condition_width")]
imported = {"modeling_utils": "transformers.modeling_utils" in sys.modules,
            "ours": sorted(name for name in sys.modules if name.startswith("modeling_mmllm."))}
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
from modeling_mmllm import MMLLMForConditionalGeneration, MMLLMProcessor  # loads and registers them
config = MMLLMConfig.from_preset("llava-tiny")
auto = {cls.__name__: type(cls.from_config(config)).__name__
        for cls in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText)}
MMLLMProcessor.from_preset("llava-tiny").save_pretrained("processor")
auto["AutoProcessor"] = type(AutoProcessor.from_pretrained("processor")).__name__
print(json.dumps({**imported, "shape": shape, "auto": auto}))
"""


def test_the_config_is_light_and_offline_and_the_model_classes_register_as_they_load(tmp_path):
    """Importing the package and building a config load no modeling code, and building one whose generator is a Hub
    pipeline reads nothing (offline here): the pipeline's conditioning shape is read when the generator is attached to
    a model. Once the model and processor classes are imported, transformers' Auto classes resolve a local config
    (and a saved processor) to them without remote code."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", LIGHT_IMPORT], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert not report["modeling_utils"] and report["shape"] == [None, None]
    assert (
        "modeling_mmllm.modeling_mmllm" not in report["ours"] and "modeling_mmllm.input_projector" not in report["ours"]
    )
    assert report["auto"] == {
        "AutoModel": "MMLLMModel",
        "AutoModelForCausalLM": "MMLLMForConditionalGeneration",
        "AutoModelForImageTextToText": "MMLLMForConditionalGeneration",
        "AutoProcessor": "MMLLMProcessor",
    }


def test_the_package_uses_no_private_auto_mapping():
    """transformers' auto mappings' internals (`_model_mapping`, `_extra_content`) change without notice: the package
    registers through the public `register` methods only."""
    package = Path(modeling_mmllm.__file__).parent
    users = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if any(name in path.read_text() for name in ("_model_mapping", "_extra_content"))
    ]
    assert users == []
