"""`./run quickstart`, the README's first command, end to end: accuracy, the folder, the fresh-process reload,
the PNG."""

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from modeling_mmllm.export.hub_card import hub_set_files

HUB_SET = {Path(path).name for path in hub_set_files()}  # what save_pretrained copies


@pytest.mark.slow
def test_quickstart_learns_saves_reloads_and_reports(quickstart_run):
    stdout = quickstart_run["stdout"]
    assert quickstart_run["returncode"] == 0, quickstart_run["stderr"][-3000:]
    for stage in ("== stage 0", "== stage 1", "== stage 2", "== evaluation", "== reload", "== summary"):
        assert stage in stdout
    accuracy = float(re.search(r"^accuracy: (\d+\.\d)%$", stdout, re.MULTILINE).group(1))
    assert accuracy >= 95.0, stdout[-2000:]

    output = quickstart_run["output"]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["image/overall"] * 100 == pytest.approx(accuracy, abs=0.05)
    assert set(summary) >= {f"image/{kind}" for kind in ("colour", "shape", "count", "size", "position")}
    assert summary["text/facts"] >= 0.9

    demo = summary["demo"]  # a new image, answered by a process that cannot import mmllm
    assert demo["answer"] == demo["expected"]
    assert f"question:    {demo['question']}" in stdout and f"answer:      {demo['answer']}" in stdout
    assert demo["description"] in stdout

    folder = quickstart_run["stage2"]
    files = {path.name for path in folder.iterdir()}
    assert (
        HUB_SET
        | {
            "model.safetensors",
            "config.json",
            "processor_config.json",
            "tokenizer.json",
            "README.md",
            "chat_template.jinja",
            "training_history.json",
        }
        <= files
    )
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    config = json.loads((folder / "config.json").read_text())
    assert config["modality_adaptive"] and config["projector_type"] == "abstractor"
    assert "AutoModelForImageTextToText" in config["auto_map"]

    report = Image.open(output / "quickstart.png")
    assert report.width == 960 and report.height > 400  # loss curves on top, a grid of held-out images below


@pytest.mark.slow
def test_quickstart_on_smollm2_keeps_its_language(staged_run):
    """`mmllm quickstart --llm smollm2 --fast` (the README's command, few steps) on the default stages already
    trained: SmolLM2 joins through its own template, text-only answers stay SmolLM2's exactly (the LLM is frozen and
    only image tokens pass through the image branches), the summary, report and fresh-process chat are written."""
    import os
    import subprocess
    import sys

    workdir = staged_run["workdir"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "modeling_mmllm.cli", "quickstart", "--llm", "smollm2", "--fast"]
    run = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    output = workdir / "runs" / "quickstart-smollm2"
    assert [path.name for path in output.rglob("summary.json")] == ["summary.json"]
    summary = json.loads((output / "summary.json").read_text())
    assert set(summary) >= {"image/overall", "text/agreement", "text/kl", "demo"}
    assert summary["text/agreement"] == 1.0 and 0 <= summary["text/kl"] < 1e-6
    assert "Paris" in summary["demo"]["text_answer"]  # SmolLM2's answer, from the saved folder in a fresh process
    assert re.search(r"^accuracy: \d+\.\d%$", run.stdout, re.MULTILINE)
    with Image.open(output / "quickstart.png") as report:
        assert report.width == 960
    config = json.loads((Path(summary["folder"]) / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 30 and config["modality_adaptive"]
