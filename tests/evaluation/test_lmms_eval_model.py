"""lmms-eval evaluates mmllm folders: our `--model mmllm` (registered by entry point; batched answers equal
one-by-one answers; loglikelihood equals the model's own log-probabilities), lmms-eval's built-in `huggingface`
model with `trust_remote_code=True`, and `mmllm eval --tasks`; all offline, on a saved folder, in fresh processes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT
from modeling_mmllm.cli import main
from modeling_mmllm.evaluation.offline_benchmarks import tasks_dir

lmms_eval_tasks = pytest.importorskip("lmms_eval.tasks", reason="needs mmllm[eval] (lmms-eval)")
from lmms_eval.models import get_model  # noqa: E402

from modeling_mmllm.evaluation.lmms_eval_model import MMLLMChat, MMLLMSimple  # noqa: E402

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _task(name: str, task_type: str):
    manager = lmms_eval_tasks.TaskManager(include_path=str(tasks_dir()))
    return next(iter(lmms_eval_tasks.get_task_dict([name], manager, task_type=task_type).values()))


def _requests(model, name: str, task_type: str, limit: int):
    """The task's requests as lmms-eval's evaluator builds them, with the task's docs given to the model."""
    task = _task(name, task_type)
    task.build_all_requests(limit=limit)
    model.task_dict = {name: task.dataset}
    return task, task.instances


@pytest.fixture(scope="module")
def chat_model(saved_folder):
    return MMLLMChat(pretrained=str(saved_folder), device="cpu", dtype="float32", batch_size=4, max_new_tokens=6)


def test_the_entry_point_gives_lmms_eval_our_chat_and_simple_classes():
    assert get_model("mmllm") is MMLLMChat and get_model("mmllm", force_simple=True) is MMLLMSimple


def test_unknown_model_args_name_the_known_ones(saved_folder):
    with pytest.raises(ValueError, match="Unknown model_args for --model mmllm: temprature.*Known: pretrained"):
        MMLLMChat(pretrained=str(saved_folder), temprature=0.2)


@pytest.mark.parametrize("model_class, task_type", [(MMLLMChat, "chat"), (MMLLMSimple, "simple")])
def test_batched_answers_equal_one_by_one(saved_folder, model_class, task_type):
    """Left-padded batches of four (prompts of different lengths) answer as single requests do."""
    model = model_class(pretrained=str(saved_folder), device="cpu", dtype="float32", batch_size=4, max_new_tokens=6)
    _, requests = _requests(model, "mmllm_mme", task_type, limit=6)
    lengths = {len(model._inputs([model._conversation_of(request)])[0]["input_ids"][0]) for request in requests}
    assert len(lengths) > 1  # the batch really pads
    batched = model.generate_until(requests)
    model.batch_size = 1
    assert model.generate_until(requests) == batched and all(isinstance(answer, str) for answer in batched)


def test_loglikelihood_is_the_models_own_negative_log_probability(chat_model):
    """Each choice's value is -log p(choice | prompt) from one forward pass of the single prompt, batched or not."""
    task, requests = _requests(chat_model, "mmllm_scienceqa_img", "chat", limit=3)
    assert {request.request_type for request in requests} == {"loglikelihood"}
    batched = [result.text for result in chat_model.loglikelihood(requests)]
    for request, (value, greedy) in zip(requests, batched):
        conversation = chat_model._context_conversation(request)
        context, _ = chat_model._inputs([conversation])
        full, _ = chat_model._inputs([conversation], suffixes=[request.args[1]])
        start = context["input_ids"].shape[1]
        with torch.no_grad():
            log_probs = torch.log_softmax(chat_model.model(**full).logits[0, start - 1 : -1].float(), -1)
        targets = full["input_ids"][0, start:]
        assert value == pytest.approx(-log_probs.gather(-1, targets[:, None]).sum().item(), abs=1e-4)
        assert greedy == bool((log_probs.argmax(-1) == targets).all())


def _results(folder):
    [path] = list(folder.rglob("*_results.json"))
    return json.loads(path.read_text())["results"]


@pytest.mark.slow
def test_mmllm_eval_runs_a_generation_and_a_multiple_choice_task_together(saved_folder, tmp_path, capsys):
    """`mmllm eval --tasks` runs `python -m lmms_eval --model mmllm` (chat class, no --force_simple) offline, prints
    the metric table and leaves lmms-eval's results JSON and the config that repeats the run."""
    output = tmp_path / "results"
    code = main(
        ["eval", str(saved_folder), "--tasks", "mmllm_pope,mmllm_scienceqa_img", "--limit", "4"]
        + ["--output-path", str(output), "--batch-size", "2", "--device", "cpu"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    results = _results(output)
    assert set(results) == {"mmllm_pope", "mmllm_scienceqa_img"}
    assert 0.0 <= results["mmllm_scienceqa_img"]["acc,none"] <= 1.0
    assert results["mmllm_pope"]["pope_yes_ratio,none"] >= 0.0
    assert "mmllm_scienceqa_img     acc" in printed and "mmllm_pope              pope_f1_score" in printed
    assert (output / "lmms_eval_config.yaml").exists()


@pytest.mark.slow
def test_lmms_eval_huggingface_model_loads_our_folder_with_its_lm_head(saved_folder, tmp_path):
    """lmms-eval's own `huggingface` model picks its auto class from the config alone: the folder's config code
    must register the model type as one with an LM head (a headless class has no `generate` and the run fails)."""
    args = f"pretrained={saved_folder},trust_remote_code=True,device=cpu,device_map=cpu"
    run = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "huggingface", "--model_args", args, "--tasks", "mmllm_vqav2"]
        + ["--include_path", str(tasks_dir()), "--limit", "3", "--batch_size", "1", "--output_path", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=OFFLINE,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "exact_match" in str(_results(tmp_path)["mmllm_vqav2"]), run.stderr[-3000:]


def test_run_builds_an_environment_with_lmms_eval_and_a_loadable_image_stack():
    """`./run` installs the eval extra: lmms-eval imports, and transformers' image processors still load (no
    torchvision that cannot load next to this torch is left behind)."""
    probe = "import lmms_eval, transformers; from transformers import AutoProcessor, CLIPImageProcessor; print('ok')"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
