"""Training end to end: learning through the stages, DDP, resume after SIGKILL, LoRA, the plain `trl sft` CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_mmllm import MMLLMForConditionalGeneration, MMLLMProcessor
from modeling_mmllm.data.synthetic import make_dataset
from modeling_mmllm.evaluation.metrics import exact_match
from modeling_mmllm.training import load_recipe, train

# The environment's console scripts (torchrun, trl), also when the virtual environment is not activated.
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
# Chance level of the held-out image questions: 4 colours, 3 shapes, 3 counts, 2 sizes, 2 positions.
CHANCE = (1 / 4 + 1 / 3 + 1 / 3 + 1 / 2 + 1 / 2) / 5


def _load(folder):
    return MMLLMForConditionalGeneration.from_pretrained(folder), MMLLMProcessor.from_pretrained(folder)


@pytest.mark.slow
def test_learning_through_the_stages(staged_run):
    """Image accuracy far above chance on fresh held-out images; the text facts of stage 0 survive joint stage 2."""
    text_after_stage0 = exact_match(*_load(staged_run["stage0"]), make_dataset("text-eval"))["overall"]
    model, processor = _load(staged_run["stage2"])
    # Another held-out sample than the quickstart's own evaluation (seed 1): no image shared with either.
    images = exact_match(model, processor, make_dataset("vqa", 300, split="heldout", seed=1))
    text_after_stage2 = exact_match(model, processor, make_dataset("text-eval"))["overall"]
    print(
        f"held-out image accuracy {images}, chance {CHANCE:.3f}; text facts {text_after_stage0:.3f} -> "
        f"{text_after_stage2:.3f}"
    )
    assert images["overall"] >= 0.95  # chance is 0.38
    # Every kind well above its chance (at most 1/2). Shape is the hardest: 79.6% in today's environment (the same
    # figure, to the digit, from the code of the last landed commit, so training is deterministic), 85%+ before.
    assert min(images.values()) >= 0.75
    assert text_after_stage0 > 0.5
    assert text_after_stage2 >= text_after_stage0 - 0.05
    history = json.loads((staged_run["stage2"] / "training_history.json").read_text())
    assert [stage["recipe"] for stage in history] == [
        "quickstart-stage0-text",
        "quickstart-stage1",
        "quickstart-stage2",
    ]


DDP_SCRIPT = Path(__file__).with_name("ddp_train.py")


@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_weights(tmp_path):
    run = subprocess.run(
        [
            "torchrun",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29577",
            str(Path(__file__).with_name("ddp_train.py")),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**ENV, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4
    assert ranks[0]["sha"] == ranks[1]["sha"]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert (run.stdout + run.stderr).count("training ddp: ") == 1  # the main process logs, once


RESUME_ARGS = [
    "--model",
    "owl2-tiny",
    "--data.synthetic",
    "joint",
    "--data.n",
    "64",
    "--data.image_size",
    "32",
    "--max_steps",
    "40",
    "--save_steps",
    "10",
    "--per_device_train_batch_size",
    "4",
    "--logging_steps",
    "5",
]


def _train_command(output: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "modeling_mmllm.cli",
        "train",
        "quickstart-stage2",
        "--output_dir",
        str(output),
        *RESUME_ARGS,
    ]


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_weights(tmp_path):
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    subprocess.run(_train_command(tmp_path / "straight"), check=True, capture_output=True, timeout=600, env=env)
    killed = tmp_path / "killed"
    process = subprocess.Popen(_train_command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not (killed / "checkpoint-20" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model").exists()  # killed before the end: no final folder
    subprocess.run(_train_command(killed), check=True, capture_output=True, timeout=600, env=env)
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(killed / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-6, rtol=0)
    assert not [p for p in killed.iterdir() if p.name.startswith(".")]  # no half-written final folder


LORA_FRESH = """
import json, sys
sys.modules["modeling_mmllm"] = None
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor
base, adapter, merged = sys.argv[1:4]
model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base, trust_remote_code=True), adapter)
full = AutoModelForImageTextToText.from_pretrained(merged, trust_remote_code=True)
ids = torch.tensor([[3, 40, 41, 42, 43]])
with torch.no_grad():
    print(json.dumps({"adapter": model(input_ids=ids).logits.tolist(), "merged": full(input_ids=ids).logits.tolist()}))
"""


@pytest.mark.slow
def test_lora_adapter_is_small_reloads_over_remote_code_and_merges(staged_run, tmp_path):
    recipe = load_recipe(
        "llava-lora",
        {
            "model": str(staged_run["stage2"]),
            "data": {"synthetic": "joint", "n": 32, "image_size": 64},
            "output_dir": str(tmp_path),
            "max_steps": 5,
            "per_device_train_batch_size": 4,
            "bf16": False,
            "activation_checkpointing": False,
            "dataloader_num_workers": 0,
            "lora": {"r": 4, "lora_alpha": 8},
        },
    )
    adapter = train(recipe, name="llava-lora")
    adapter_size = sum(p.stat().st_size for p in adapter.glob("*.safetensors"))
    full_size = (tmp_path / "merged" / "model.safetensors").stat().st_size
    assert adapter_size < full_size / 2
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert {"k_proj", "v_proj"} <= {target.rsplit(".", 1)[-1] for target in config["target_modules"]}
    adapter_keys = load_file(next(adapter.glob("*.safetensors"))).keys()
    assert any(".multiway.1." in key and "lora_A" in key for key in adapter_keys)  # the image branches get LoRA too
    assert "library_name: peft" in (adapter / "README.md").read_text()
    run = subprocess.run(
        [sys.executable, "-c", LORA_FRESH, str(staged_run["stage2"]), str(adapter), str(tmp_path / "merged")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    logits = json.loads(run.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(logits["merged"]), torch.tensor(logits["adapter"]), atol=1e-4, rtol=1e-4)
    base = MMLLMForConditionalGeneration.from_pretrained(staged_run["stage2"])
    with torch.no_grad():
        before = base(input_ids=torch.tensor([[3, 40, 41, 42, 43]])).logits
    assert not torch.allclose(before, torch.tensor(logits["merged"]))  # the adapter changed the model


@pytest.mark.slow
def test_plain_trl_sft_cli_trains_a_stage2_checkpoint(staged_run, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    make_dataset("joint", 16, image_size=64).remove_columns(["kind", "answer"]).to_parquet(data / "train.parquet")
    command = [
        "trl",
        "sft",
        "--model_name_or_path",
        str(staged_run["stage2"]),
        "--trust_remote_code",
        "--dataset_name",
        str(data),
        "--assistant_only_loss",
        "True",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--output_dir",
        str(tmp_path / "out"),
        "--use_cpu",
        "True",
        "--bf16",
        "False",
        "--report_to",
        "none",
        "--gradient_checkpointing",
        "False",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**ENV, "OMP_NUM_THREADS": "2"})
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
