"""The wheel carries the data folders (presets, templates, cards) inside the package; the CLI builds a folder."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from modeling_mmllm.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_presets_templates_and_cards(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("mmllm-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "configuration/llava-tiny.json",
        "configuration/llava-1.5-7b.json",
        "processing/chat_template.jinja",
        "processing/special_tokens.json",
        "processing/tokenizer_corpus.txt",
        "hub_cards/model_card.md",
        "modeling_mmllm.py",
        "component_settings.py",
        "cli/__main__.py",
        "cli/main.py",
        "training/runner.py",
        "export/saving.py",
        "evaluation/lmms_eval_model.py",
        "evaluation_tasks/mmllm_offline.yaml",
        "evaluation_tasks/mmllm_pope.yaml",
        "evaluation_tasks/mmllm_pope.parquet",
    ):
        assert f"modeling_mmllm/{name}" in names, name
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "[lmms_eval.models]\nmmllm = modeling_mmllm.evaluation.lmms_eval_model:MANIFEST" in (
        zipfile.ZipFile(wheel).read(entry_points).decode()
    )


def test_cli_build_and_clear_errors(tmp_path, capsys):
    assert main(["build", "--preset", "llava-tiny", str(tmp_path / "model")]) == 0
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert main(["build", "--preset", "llava-tiny", str(tmp_path / "model")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["build", "--preset", "nope", str(tmp_path / "other")]) == 1
    assert "Unknown preset 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
