"""Run lmms-eval on a model folder (library side): what `mmllm eval FOLDER --tasks ...` and the recipes'
`eval_tasks:` call.

lmms-eval runs in a child process (`python -m lmms_eval --config FILE`), as a user would run it: its progress bars
and metric table go to the terminal, its results JSON to the output folder. The config file (kept beside the
results, so the run can be repeated) names the model (`--model mmllm`), the tasks and the include paths: mmllm's
offline benchmarks (`evaluation_tasks/`) always, plus the user's task folders.
"""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from .offline_benchmarks import tasks_dir


def check_lmms_eval() -> None:
    """A clear error when lmms-eval is missing, or when a torchvision that cannot load would break it."""
    if importlib.util.find_spec("lmms_eval") is None:
        raise ValueError("lmms-eval is not installed: pip install 'mmllm[eval]' (or use --synthetic).")
    if importlib.util.find_spec("torchvision") is not None:
        probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
        if probe.returncode:
            raise ValueError(
                "torchvision is installed but cannot load next to this torch (a CUDA build of PyPI's next to a CPU "
                "torch?): pip uninstall torchvision timm (lmms-eval's core and mmllm need neither; timm cannot load "
                "without torchvision), or install the torchvision that matches your torch."
            )


def run_lmms_eval(
    model: str,
    tasks: list[str],
    output_path: str | Path,
    include_paths: list[str | Path] = (),
    limit: float | None = None,
    batch_size: int = 8,
    model_args: dict | None = None,
    offline: bool = True,
) -> dict:
    """Evaluate `model` (a folder or Hub id) on lmms-eval `tasks` and return lmms-eval's results JSON.

    `offline` sets `HF_HUB_OFFLINE`/`HF_DATASETS_OFFLINE` for the child, which mmllm's own tasks need nowhere
    else; pass `offline=False` for lmms-eval tasks whose data comes from the Hub.
    """
    check_lmms_eval()
    for path in include_paths:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--include-path {path} is not a folder of task YAMLs.")
    output_path = Path(output_path).resolve()  # the child runs in a folder of its own: every path is absolute
    output_path.mkdir(parents=True, exist_ok=True)
    if Path(model).is_dir():
        model = str(Path(model).resolve())
    arguments = ",".join(f"{key}={value}" for key, value in {"pretrained": model, **(model_args or {})}.items())
    config = {
        "model": "mmllm",
        "model_args": arguments,
        "tasks": ",".join(tasks),
        "include_path": [str(tasks_dir()), *(str(Path(path).resolve()) for path in include_paths)],
        "batch_size": str(batch_size),
        "output_path": str(output_path),
        **({"limit": limit} if limit is not None else {}),
    }
    config_file = output_path / "lmms_eval_config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    before = set(output_path.rglob("*_results.json"))
    env = {**os.environ, **({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"} if offline else {})}
    with tempfile.TemporaryDirectory() as cwd:  # lmms-eval logs the git state of its working directory
        completed = subprocess.run([sys.executable, "-m", "lmms_eval", "--config", str(config_file)], env=env, cwd=cwd)
    written = sorted(set(output_path.rglob("*_results.json")) - before, key=lambda path: path.stat().st_mtime)
    if completed.returncode or not written:
        code = completed.returncode
        raise ValueError(f"lmms-eval failed (exit code {code}, no results written): see its messages above.")
    return json.loads(written[-1].read_text())


def task_scores(results: dict) -> dict[str, dict[str, float]]:
    """Numeric metrics per task from lmms-eval's results JSON (`{"task": {"metric": value}}`, no stderr)."""
    return {
        task: {
            metric.split(",")[0]: value
            for metric, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in metric
        }
        for task, metrics in results.get("results", {}).items()
    }


__all__ = ["check_lmms_eval", "run_lmms_eval", "task_scores"]
