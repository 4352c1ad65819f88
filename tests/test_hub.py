"""The Hub boundary: a saved folder is self-contained remote code, with card, safetensors and auto_map."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.dynamic_module_utils import get_imports

from modeling_mmllm.export.hub_card import hub_set_files

pytestmark = pytest.mark.hub

PACKAGE = Path(hub_set_files()[0]).parent
HUB_SET = {Path(path).name for path in hub_set_files()}  # the registered classes' modules and their import closure
ALLOWED_IMPORTS = {"torch", "transformers", "numpy", "PIL", "huggingface_hub"}  # the last: a transformers dependency
PROMPT = "<|user|>\n<image>What colour is it?<|end|>\n<|assistant|>\n"


def test_package_root_holds_the_hub_set_and_nothing_else(saved_folder):
    """The layout rule: what `save_pretrained` copies into a folder is exactly the package root's modules; the
    library side lives in sub-packages."""
    copied = {path.name for path in saved_folder.glob("*.py")}
    assert copied == HUB_SET
    assert {path.name for path in PACKAGE.glob("*.py")} == copied | {"__init__.py"}
    for folder in (path for path in PACKAGE.iterdir() if path.is_dir() and path.name != "__pycache__"):
        assert (folder / "__init__.py").is_file() or not list(folder.glob("*.py")), folder


def test_hub_set_imports_only_the_allowed_libraries():
    files = {Path(f).name: Path(f) for f in hub_set_files()}
    assert {"configuration_mmllm.py", "modeling_mmllm.py", "processing_mmllm.py", "modality_adaptive.py"} <= set(files)
    for name, path in files.items():
        # transformers refuses a folder whose unguarded imports are missing: these must all be allowed.
        required = set(get_imports(str(path)))
        assert required <= ALLOWED_IMPORTS | set(sys.stdlib_module_names), (name, required)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module and "." not in node.module, (name, ast.dump(node))
                assert f"{node.module}.py" in HUB_SET, (name, node.module)


def test_saved_folder_contents(saved_folder):
    names = {p.name for p in saved_folder.iterdir()}
    assert HUB_SET <= names
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    assert {"config.json", "processor_config.json", "tokenizer.json", "chat_template.jinja", "README.md"} <= names
    auto_map = json.loads((saved_folder / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_mmllm.MMLLMConfig",
        "AutoModel": "modeling_mmllm.MMLLMModel",
        "AutoModelForImageTextToText": "modeling_mmllm.MMLLMForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_mmllm.MMLLMForConditionalGeneration",
    }
    processor_map = json.loads((saved_folder / "processor_config.json").read_text())["auto_map"]
    assert processor_map == {"AutoProcessor": "processing_mmllm.MMLLMProcessor"}
    assert not [p for p in saved_folder.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_model_card(saved_folder):
    card = (saved_folder / "README.md").read_text()
    header = card.split("---")[1]
    for line in (
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "license: apache-2.0",
        "- mmllm",
        "- custom_code",
    ):
        assert line in header
    for text in (
        "Modality Encoder",
        "Input Projector",
        "LLM Backbone",
        "Output Projector",
        "Modality Generator",
        "trust_remote_code=True",
        "`modeling_mmllm.py`",
        "16 tokens per image",
    ):
        assert text in card


FRESH_PROCESS = """
import json, sys
sys.modules["modeling_mmllm"] = None  # the package cannot be imported: only the folder's code may run
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
folder, image_path, prompt = sys.argv[1:4]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
inputs = processor(images=[Image.open(image_path)], text=[prompt], return_tensors="pt")
ids = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None)
print(json.dumps({
    "ids": ids[0].tolist(),
    "causal_lm": type(AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)).__name__,
    "base": type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__,
    "module": type(model).__module__,
}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tokens", "cross_attention"])
def test_fresh_process_without_the_package_generates_the_same(kind, request, images, tmp_path):
    names = (
        ("saved_folder", "tiny_model", "processor")
        if kind == "tokens"
        else ("fusion_folder", "fusion_model", "fusion_processor")
    )
    saved_folder, tiny_model, processor = (request.getfixturevalue(name) for name in names)
    image_path = tmp_path / "image.png"
    images[0].save(image_path)
    from PIL import Image

    inputs = processor(images=[Image.open(image_path)], text=[PROMPT], return_tensors="pt")
    expected = tiny_model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None)[0].tolist()
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(saved_folder), str(image_path), PROMPT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reported = json.loads(result.stdout.strip().splitlines()[-1])
    assert reported["module"].startswith("transformers_modules.")
    assert reported["causal_lm"] == "MMLLMForConditionalGeneration" and reported["base"] == "MMLLMModel"
    assert reported["ids"] == expected
    assert len(set(expected[-8:])) > 1  # a real sequence, not one repeated token


SAVE_WITHOUT_THE_PACKAGE = """
import sys
sys.modules["modeling_mmllm"] = None
from transformers import AutoModelForImageTextToText
AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).save_pretrained(sys.argv[2])
"""


@pytest.mark.slow
def test_save_pretrained_writes_the_same_files_with_or_without_the_package(saved_folder, tiny_model, tmp_path):
    """The card is the library's (`save_model_folder`, `mmllm push`): `save_pretrained` writes what it writes
    wherever it runs."""
    tiny_model.save_pretrained(tmp_path / "with")
    result = subprocess.run(
        [sys.executable, "-c", SAVE_WITHOUT_THE_PACKAGE, str(saved_folder), str(tmp_path / "without")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = [sorted(path.name for path in (tmp_path / side).iterdir()) for side in ("with", "without")]
    assert names[0] == names[1] and "model.safetensors" in names[0] and "README.md" not in names[0]


def test_reloaded_model_has_the_same_weights(saved_folder, tiny_model):
    from transformers import AutoModelForImageTextToText

    reloaded = AutoModelForImageTextToText.from_pretrained(saved_folder, trust_remote_code=True)
    ours = tiny_model.state_dict()
    assert all(torch.equal(tensor, ours[name]) for name, tensor in reloaded.state_dict().items())


def test_model_card_of_a_fusion_model(fusion_folder):
    card = (fusion_folder / "README.md").read_text()
    assert "`resampler` → 8 latents per image, read by gated cross-attention every 1 decoder layer(s)" in card
