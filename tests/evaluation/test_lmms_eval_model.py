"""lmms-eval evaluates mmllm folders: our `--model mmllm` (registered by entry point; batched answers equal
one-by-one answers; loglikelihood equals the model's own log-probabilities), lmms-eval's built-in `huggingface`
model with `trust_remote_code=True`, and `mmllm eval --tasks`; all offline, on a saved folder, in fresh processes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ROOT, perturb_branches
from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration, MMLLMProcessor
from modeling_mmllm.builders.presets import load_processor_preset
from modeling_mmllm.cli import main
from modeling_mmllm.evaluation.offline_benchmarks import tasks_dir
from modeling_mmllm.saving import save_model_folder

lmms_eval_tasks = pytest.importorskip("lmms_eval.tasks", reason="needs mmllm[eval] (lmms-eval)")
from lmms_eval.api.instance import Instance  # noqa: E402
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


@pytest.fixture(scope="module")
def three_modality_folder(tmp_path_factory):
    """audio-tiny with video switched on: image, video and audio parts, each with its own decoder branch."""
    video = dict(video_token_id=6, video_num_frames=4, video_temporal_pool=2)
    config = MMLLMConfig.from_preset("audio-tiny", **video, modality_adaptive_modalities=[1, 2, 3])
    torch.manual_seed(0)
    model = MMLLMForConditionalGeneration(config).eval()
    for modality in (1, 2, 3):
        perturb_branches(model, modality, seed=modality)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # well-separated greedy choices
    processor = load_processor_preset(MMLLMProcessor, "audio-tiny", config)
    return save_model_folder(model, processor, tmp_path_factory.mktemp("three") / "model")


def _instance(doc_to_messages, index: int = 0, kind: str = "generate_until") -> Instance:
    gen_kwargs = {"max_new_tokens": 5, "until": []}
    metadata = {"task": "t", "doc_id": index, "repeats": 1}
    return Instance(kind, ("", doc_to_messages, gen_kwargs, index, "t", "test"), idx=0, metadata=metadata)


def test_chat_requests_with_image_video_and_audio_parts_answer_as_the_model_does(three_modality_folder):
    """Each part reaches the processor as its own modality: the answer equals `generate` on hand-built inputs."""
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    frames = [Image.new("RGB", (40, 40), (20 * index, 100, 50)) for index in range(6)]
    wave = (0.3 * np.sin(np.arange(16000) / 16000 * 2 * np.pi * 440)).astype(np.float32)
    tone = {"array": wave, "sampling_rate": 16000}
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "url": image},
                {"type": "video", "url": frames},
                {"type": "audio", "url": tone},
                {"type": "text", "text": "What is it?"},
            ],
        }
    ]
    model = MMLLMChat(pretrained=str(three_modality_folder), device="cpu", dtype="float32")
    model.task_dict = {"t": {"test": [{}]}}
    [answer] = model.generate_until([_instance(lambda doc: messages)])
    processor = model.processor
    parts = [{"type": "image"}, {"type": "video"}, {"type": "audio"}, {"type": "text", "text": "What is it?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[image], videos=[frames], audio=[tone], return_tensors="pt")
    assert {1, 2, 3} <= set(inputs["mm_token_type_ids"][0].tolist())
    with torch.no_grad():
        output = model.model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    assert answer == expected.strip() and answer


def test_multi_round_requests_continue_one_conversation(saved_folder):
    """lmms-eval's multi-round protocol: each round gets the previous answers and adds its turns, until terminal."""
    seen = []

    def doc_to_messages(doc, round_idx=None, previous_output=None, previous_round_info=None):
        if round_idx is None:
            return [{"role": "user", "content": [{"type": "text", "text": "What colour is grass?"}]}]
        seen.append((round_idx, list(previous_output), previous_round_info))
        follow_up = [{"role": "user", "content": [{"type": "text", "text": "And the sky?"}]}]
        return follow_up, round_idx >= 2, None, {"round": round_idx}

    model = MMLLMChat(pretrained=str(saved_folder), device="cpu", dtype="float32")
    model.task_dict = {"t": {"test": [{}]}}
    [outputs] = model.generate_until_multi_round([_instance(doc_to_messages, kind="generate_until_multi_round")])
    assert len(outputs) == 2 and all(isinstance(output, str) for output in outputs)
    assert seen == [(1, outputs[:1], None), (2, outputs, {"round": 1})]


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
def test_mmllm_eval_runs_a_generation_and_a_multiple_choice_task_together(saved_folder, tmp_path, capsys, monkeypatch):
    """`mmllm eval --tasks` runs `python -m lmms_eval --model mmllm` (chat class, no --force_simple) offline, prints
    the metric table and leaves lmms-eval's results JSON and the config that repeats the run (paths relative to
    the working folder, as users type them)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").symlink_to(saved_folder)
    output = tmp_path / "results"
    code = main(
        ["eval", "model", "--tasks", "mmllm_pope,mmllm_scienceqa_img", "--limit", "4"]
        + ["--output-path", "results", "--batch-size", "2", "--device", "cpu"]
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
    """`./run` installs the eval extra: lmms-eval imports, and transformers' image processors and accelerate's CLI
    still load (no torchvision that cannot load next to this torch is left behind, nor timm, which needs it)."""
    probe = (
        "import lmms_eval, transformers, accelerate.commands.accelerate_cli\n"
        "from transformers import AutoProcessor, CLIPImageProcessor\nprint('ok')"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_a_missing_lmms_eval_or_a_broken_torchvision_is_a_clear_error(monkeypatch):
    from modeling_mmllm.evaluation import lmms_eval_runner

    real = lmms_eval_runner.importlib.util.find_spec
    monkeypatch.setattr(
        lmms_eval_runner.importlib.util, "find_spec", lambda name: None if name == "lmms_eval" else real(name)
    )
    with pytest.raises(ValueError, match=r"lmms-eval is not installed: pip install 'mmllm\[eval\]'"):
        lmms_eval_runner.check_lmms_eval()
    monkeypatch.setattr(lmms_eval_runner.importlib.util, "find_spec", lambda name: object())  # torchvision "there"
    monkeypatch.setattr(lmms_eval_runner.sys, "executable", "false")  # ... and failing to import
    with pytest.raises(ValueError, match="torchvision is installed but cannot load.*pip uninstall torchvision"):
        lmms_eval_runner.check_lmms_eval()
