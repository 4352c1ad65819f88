"""Shared fixtures: tiny models, processors, images and one saved folder, built once per session; the deprecation net
of the hub-set tests; how pytest-xdist's workers share the machine and the quickstart run. Helpers the tests import
live in helpers.py."""

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from PIL import Image

from helpers import (
    QUICKSTART_THREADS,
    ROOT,
    DeprecatedFromHubSet,
    hub_code_on_stack,
    make_images,
    open_gates,
    seeded_model,
)
from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration, MMLLMProcessor
from modeling_mmllm.saving import save_model_folder

# The longest test files, which pytest-xdist starts first, and those that read the quickstart's stage folders,
# which run last, when the quickstart is done (see pytest_collection_modifyitems).
FIRST = ("tests/test_readme.py", "tests/test_readme_standalone.py")
AFTER_THE_QUICKSTART = ("tests/quickstart/", "tests/training/test_training_runs.py", "tests/training/test_packing.py")


def pytest_configure(config):
    """Under pytest-xdist (`./run tests` runs `-n auto`), each worker gets its share of the cores: the tiny models
    gain little from a second thread (an AnyRes training: 87 s with two, 92 s with one; a stage-1 training: 16 s
    with two, 22 s with one), so two workers of one thread each do more than one worker of two. Subprocesses
    inherit the setting."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """The order in which pytest-xdist hands out test files (`--dist loadfile --no-loadscope-reorder`: a file is one
    unit, so module fixtures are built once): the README harness first (the quickstart and the commands that use
    its folder are the longest chain) and its other commands beside it; the files that read the quickstart's
    folders last, so no worker waits for it."""

    def rank(item) -> int:
        path = item.nodeid.split("::")[0]
        return FIRST.index(path) if path in FIRST else 3 if path.startswith(AFTER_THE_QUICKSTART) else 2

    items.sort(key=rank)  # stable: each file's own order is kept


@pytest.fixture(autouse=True)
def threads_of_the_figures(request, monkeypatch):
    """`@pytest.mark.threads(N)`: the test checks figures measured with N threads (the quickstart's chain: the
    README's were measured on 2), so it runs with N whatever its pytest-xdist worker's share is."""
    marker = request.node.get_closest_marker("threads")
    if marker is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(marker.args[0])
    monkeypatch.setenv("OMP_NUM_THREADS", str(marker.args[0]))
    yield
    torch.set_num_threads(before)


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
def owl2_folder(tmp_path_factory):
    """A saved owl2-tiny (modality-adaptive) with random weights: the model a `--model FOLDER` run starts from (the
    alignment stages' tests)."""
    config = MMLLMConfig.from_preset("owl2-tiny")
    return save_model_folder(
        seeded_model(config), MMLLMProcessor.from_preset("owl2-tiny"), tmp_path_factory.mktemp("owl2") / "owl2-tiny"
    )


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
    """The README's first command, `./run quickstart`, run once (6 to 7 minutes) and shared by many tests, across
    pytest-xdist's workers too: the first worker that needs it runs it, under a file lock, and leaves a record the
    others read.

    It runs in a working folder that later README commands also use (`runs/quickstart` is its output). No timeout
    of its own: on a slow or shared machine it takes longer (818 s and over 1,200 s seen here), and CI has its limit.
    """
    shared = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:  # each worker's base is a folder of the run's own
        shared = shared.parent
    record = shared / "quickstart.json"
    with FileLock(shared / "quickstart.lock"):
        if not record.exists():
            record.write_text(json.dumps(_run_quickstart(shared / "readme")))
    run = json.loads(record.read_text())
    workdir, output = Path(run["workdir"]), Path(run["output"])
    return {
        **run,
        "workdir": workdir,
        "output": output,
        **{f"stage{index}": output / f"stage{index}" / "model" for index in range(3)},
    }


def _run_quickstart(workdir: Path) -> dict:
    output = workdir / "runs" / "quickstart"
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "MMLLM_VENV": sys.prefix,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        # Two threads, as the README's figures were measured: training's sums are ordered by the thread count, and
        # with one thread (a pytest-xdist worker's share) the quickstart ends elsewhere (91% held out, not 99.3%).
        "OMP_NUM_THREADS": str(QUICKSTART_THREADS),
    }
    run = subprocess.run(
        [str(ROOT / "run"), "quickstart", "--output", str(output)],
        capture_output=True,
        text=True,
        env=env,
    )
    return {
        "workdir": str(workdir),
        "output": str(output),
        "returncode": run.returncode,
        "stdout": run.stdout,
        "stderr": run.stderr,
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
