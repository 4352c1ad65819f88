"""Shared fixtures: tiny models, processors, images and one saved folder, built once per session; the deprecation net
of the hub-set tests. Helpers the tests import live in helpers.py."""

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from helpers import ROOT, DeprecatedFromHubSet, hub_code_on_stack, make_images, open_gates, seeded_model
from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration, MMLLMProcessor
from modeling_mmllm.saving import save_model_folder


@pytest.fixture(autouse=True)
def hub_set_deprecations_are_errors(request, monkeypatch):
    """In hub-set tests, a FutureWarning or DeprecationWarning raised while the hub set's code is calling (or a
    deprecation transformers logs) fails the test: the next rename shows here before it breaks users' folders."""
    if request.node.get_closest_marker("hub") is None:
        yield
        return
    warn = warnings.warn

    def strict_warn(message, category=None, stacklevel=1, source=None, **kwargs):
        kind = category or (type(message) if isinstance(message, Warning) else UserWarning)
        if issubclass(kind, (FutureWarning, DeprecationWarning)) and hub_code_on_stack(sys._getframe(1)):
            raise kind(message)
        return warn(message, category, stacklevel + 1, source, **kwargs)

    monkeypatch.setattr(warnings, "warn", strict_warn)
    check = DeprecatedFromHubSet(logging.WARNING)
    logger = logging.getLogger("transformers")  # its modules' loggers propagate to it
    logger.addHandler(check)
    try:
        yield
    finally:
        logger.removeHandler(check)


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
def fusion_processor() -> MMLLMProcessor:
    return MMLLMProcessor.from_preset("flamingo-tiny")


@pytest.fixture(scope="session")
def fusion_model() -> MMLLMForConditionalGeneration:
    """flamingo-tiny (gated cross-attention fusion) with open gates, so its answers depend on the images."""
    return open_gates(seeded_model(MMLLMConfig.from_preset("flamingo-tiny")))


@pytest.fixture(scope="session")
def fusion_folder(tmp_path_factory, fusion_model, fusion_processor):
    """flamingo-tiny and its processor saved as a Hub-ready folder."""
    return save_model_folder(fusion_model, fusion_processor, tmp_path_factory.mktemp("saved") / "flamingo-tiny")


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    return make_images(4)


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> dict:
    """The README's first command, `./run quickstart`, run once (6 to 7 minutes) and shared by many tests.

    It runs in a working folder that later README commands also use (`runs/quickstart` is its output). No timeout
    of its own: on a slow or shared machine it takes longer (818 s and over 1,200 s seen here), and CI has its limit.
    """
    workdir = tmp_path_factory.mktemp("readme")
    output = workdir / "runs" / "quickstart"
    env = {
        **os.environ,
        "MMLLM_VENV": sys.prefix,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    run = subprocess.run(
        [str(ROOT / "run"), "quickstart", "--output", str(output)],
        capture_output=True,
        text=True,
        env=env,
    )
    return {
        "workdir": workdir,
        "output": output,
        "returncode": run.returncode,
        "stdout": run.stdout,
        "stderr": run.stderr,
        **{f"stage{index}": output / f"stage{index}" / "model" for index in range(3)},
    }


@pytest.fixture(scope="session")
def staged_run(quickstart_run) -> dict:
    """The quickstart's three stage folders (stage 0 text, stage 1, stage 2), trained by the shipped recipes."""
    assert quickstart_run["returncode"] == 0, quickstart_run["stderr"][-3000:]
    return quickstart_run


@pytest.fixture(scope="session")
def vision_folder(tmp_path_factory) -> Path:
    """A tiny pretrained-style CLIP vision encoder with its image processor, saved (a `vision=` for from_components)."""
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionModel

    from helpers import tiny_vision_config

    folder = tmp_path_factory.mktemp("vision") / "clip"
    torch.manual_seed(1)
    CLIPVisionModel(tiny_vision_config("clip")).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
