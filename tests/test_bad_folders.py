"""Model folders that cannot be trusted or cannot load: pickled weights, damaged safetensors, weights that do not
fit the config. Each is a ValueError that names the problem and the fix (one line from the CLI); saved folders hold
safetensors only."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from modeling_mmllm import MMLLMForConditionalGeneration
from modeling_mmllm.cli import main

PICKLE_FIX = r"holds its weights only as pickle files \(pytorch_model.bin\); mmllm loads safetensors only"


@pytest.fixture
def copy_of(saved_folder, tmp_path):
    def copy(name: str):
        return shutil.copytree(saved_folder, tmp_path / name)

    return copy


def _pickled(folder):
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    return weights


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mmllm ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_a_folder_with_only_pickled_weights_is_refused_with_the_conversion(copy_of, capsys):
    folder = copy_of("pickled")
    weights = _pickled(folder)
    with pytest.raises(ValueError, match=PICKLE_FIX + r".*use_safetensors=False\)\.save_pretrained\(NEW_FOLDER\)"):
        MMLLMForConditionalGeneration.from_pretrained(folder)
    line = _one_line_error(["generate", str(folder), "--prompt", "hi"], capsys)
    assert "pickle files (pytorch_model.bin)" in line
    trusted = MMLLMForConditionalGeneration.from_pretrained(folder, use_safetensors=False)  # the user's own choice
    for name, tensor in trusted.state_dict().items():
        if name in weights:
            torch.testing.assert_close(tensor, weights[name])


@pytest.mark.parametrize("size", [0, 5000])
def test_a_truncated_or_empty_weights_file_is_a_clear_error(copy_of, size, capsys):
    folder = copy_of(f"damaged-{size}")
    with open(folder / "model.safetensors", "r+b") as weights:
        weights.truncate(size)
    with pytest.raises(ValueError, match="weights file in .* is damaged .*truncated or not safetensors"):
        MMLLMForConditionalGeneration.from_pretrained(folder)
    assert "is damaged" in _one_line_error(["eval", str(folder), "--n", "2"], capsys)


def test_weights_that_do_not_fit_the_config_are_a_clear_error(copy_of, capsys):
    folder = copy_of("edited")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit its config.json .*Restore the config"):
        MMLLMForConditionalGeneration.from_pretrained(folder)
    assert "do not fit its config.json" in _one_line_error(["generate", str(folder), "--prompt", "hi"], capsys)


def test_saved_folders_hold_no_pickles(saved_folder):
    assert not [path.name for path in saved_folder.rglob("*") if path.suffix in (".bin", ".pt", ".pth", ".pkl")]


def test_a_processor_that_does_not_fit_the_model_is_refused_when_the_folder_loads(copy_of, capsys):
    folder = copy_of("mismatched")
    settings = json.loads((folder / "processor_config.json").read_text())
    settings["image_seq_length"] += 1
    (folder / "processor_config.json").write_text(json.dumps(settings))
    line = _one_line_error(["generate", str(folder), "--prompt", "hi"], capsys)
    assert "image_seq_length=" in line and "does not match the model config" in line
