"""`mmllm upgrade`: a folder saved by an older mmllm gets the current hub set and runs on today's transformers."""

import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from packaging.version import Version

from helpers import FIXTURES
from modeling_mmllm import cli
from modeling_mmllm.export.hub_card import hub_set_files
from modeling_mmllm.saving import upgrade_folder

pytestmark = pytest.mark.hub

FIXTURE = FIXTURES / "owl2-tiny-v0.1.0"
EXPECTED = json.loads((FIXTURE.parent / "owl2-tiny-v0.1.0.json").read_text())

# Runs in a fresh process where the package cannot be imported: only the folder's own code serves.
ANSWER = """
import json, sys
sys.modules["modeling_mmllm"] = None
import numpy as np, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
folder = sys.argv[1]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
inputs = processor(images=[image], text=[sys.argv[2]], return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
print(json.dumps({"last": logits[0, -1, :8].tolist(), "tokens": out[0, inputs["input_ids"].shape[1]:].tolist()}))
"""


def _answer(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", ANSWER, str(folder), EXPECTED["prompt"]], capture_output=True, text=True, timeout=300
    )


def _assert_answers_as_expected(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, run.stderr[-3000:]
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    assert answer["tokens"] == EXPECTED["tokens"]
    assert max(abs(a - b) for a, b in zip(answer["last"], EXPECTED["last"])) < 1e-4


@pytest.fixture
def old_folder(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "owl2-tiny-v0.1.0"))


@pytest.mark.slow
def test_an_upgraded_old_folder_answers_as_its_own_code_did(old_folder, capsys):
    # What users of old folders see today. The folder's code names the cache `past_key_values`, as transformers did
    # before 5.24: 5.24 renamed it `cache`, also in the output classes' `__init__`, so the folder's own output class
    # (declaring `past_key_values`) fails; 5.25 leaves such classes alone and takes the old name again, deprecated
    # until 5.40, so the folder answers, warning (its forward passes `past_key_values=None` next to `cache`).
    version = Version(transformers.__version__)
    if Version("5.24") <= version < Version("5.25"):
        before = _answer(old_folder)
        assert before.returncode != 0 and "unexpected keyword argument 'cache'" in before.stderr
    elif version >= Version("5.25"):
        before = _answer(old_folder)
        _assert_answers_as_expected(before)
        assert "`past_key_values` is deprecated" in before.stderr
    weights = (old_folder / "model.safetensors").stat()

    assert cli.main(["upgrade", str(old_folder)]) == 0
    assert f"{len(hub_set_files())} code files rewritten" in capsys.readouterr().out
    for path in map(Path, hub_set_files()):
        assert filecmp.cmp(path, old_folder / path.name, shallow=False)
    after = (old_folder / "model.safetensors").stat()
    assert (after.st_ino, after.st_size, after.st_mtime) == (weights.st_ino, weights.st_size, weights.st_mtime)
    assert filecmp.cmp(FIXTURE / "config.json", old_folder / "config.json", shallow=False)

    run = _answer(old_folder)
    _assert_answers_as_expected(run)
    assert "past_key_values" not in run.stderr  # the current hub set names the cache as the installed transformers


def test_an_interrupted_upgrade_leaves_the_old_folder(old_folder, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copy2", fail)
    with pytest.raises(OSError, match="disk full"):
        upgrade_folder(old_folder)
    assert all(filecmp.cmp(FIXTURE / path.name, path, shallow=False) for path in old_folder.iterdir())
    assert sorted(p.name for p in old_folder.parent.iterdir()) == [old_folder.name]  # no staging folder is left


def test_upgrade_refuses_what_is_not_an_mmllm_folder(tmp_path, capsys):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert cli.main(["upgrade", str(tmp_path / "llama")]) == 1
    assert "holds a 'llama' model, not an mmllm one" in capsys.readouterr().err
    assert cli.main(["upgrade", str(tmp_path / "missing")]) == 1
    assert "is not a model folder" in capsys.readouterr().err
