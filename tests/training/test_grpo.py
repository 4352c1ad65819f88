"""The reinforcement-learning stage (`trainer: grpo`, TRL's GRPOTrainer): recipe keys and their errors, the built-in
verifiable rewards on hand-made completions, prompt data from conversations and files, a CLI run with its history,
card, before/after figures and resume, and TRL's GRPOTrainer on a saved folder through its remote code alone."""

import json
import re
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from PIL import Image

from modeling_mmllm import MMLLMForConditionalGeneration
from modeling_mmllm.cli import main
from modeling_mmllm.data import synthetic
from modeling_mmllm.data.loading import load_training_data, prompt_rows
from modeling_mmllm.data.synthetic import COMPARE_QUESTIONS, Scene
from modeling_mmllm.training import GRPORecipeConfig, RecipeConfig, load_recipe, recipe_help
from modeling_mmllm.training.rewards import (
    Rewards,
    exact_match_reward,
    format_reward,
    numeric_reward,
    resolve_reward,
)
from modeling_mmllm.training.runner import check_reference, grpo_prompts

SMALL_RUN = [
    "--data.n", "16", "--data.image_size", "32", "--eval.n", "8", "--eval.image_size", "32",
    "--per_device_train_batch_size", "8", "--num_generations", "4", "--logging_steps", "1", "--report_to", "none",
    "--dataloader_num_workers", "0",
    # an untrained model's answers all miss, so exact match alone gives no gradient (GRPO's advantage is zero)
    "--reward_funcs", "[exact_match, 'helpers:shorter_reward']", "--reward_weights", "[1.0, 0.5]",
]  # fmt: skip


REWARDS = ["exact_match", "helpers:shorter_reward"]


def test_a_grpo_recipe_is_a_grpo_config_with_every_field_settable():
    recipe = load_recipe(
        "quickstart-grpo",
        {
            "num_generations": 4,
            "temperature": 0.7,
            "loss_type": "grpo",
            "reward_funcs": ["exact_match", "format", "trl.rewards:think_format_reward"],
            "reward_weights": [1.0, 0.5, 0.1],
            "epsilon_high": 0.28,
        },
    )
    assert isinstance(recipe, GRPORecipeConfig) and recipe.trainer == "grpo"
    assert (recipe.num_generations, recipe.temperature, recipe.loss_type, recipe.epsilon_high) == (4, 0.7, "grpo", 0.28)
    assert recipe.reward_weights == [1.0, 0.5, 0.1]
    assert recipe.use_cpu and not recipe.bf16 and not recipe.gradient_checkpointing  # CPU-safe, as the SFT recipes
    assert load_recipe("quickstart-grpo").reward_funcs == ["exact_match"]
    assert isinstance(load_recipe("quickstart-stage2"), RecipeConfig)
    assert isinstance(load_recipe("owl2-grpo-lora"), GRPORecipeConfig)

    with pytest.raises(ValueError, match="'exact' is neither a built-in reward .*exact_match, numeric, format"):
        load_recipe("quickstart-grpo", {"reward_funcs": ["exact"]})
    with pytest.raises(ValueError, match="cannot import 'no_such_package.rewards:score'"):
        load_recipe("quickstart-grpo", {"reward_funcs": ["no_such_package.rewards:score"]})
    with pytest.raises(ValueError, match="2 weight\\(s\\) for 1 reward\\(s\\)"):
        load_recipe("quickstart-grpo", {"reward_weights": [1.0, 2.0]})
    with pytest.raises(ValueError, match="SFT stages"):
        load_recipe("quickstart-grpo", {"whiten_signal_states": 64})
    with pytest.raises(ValueError, match="mmllm's keys are .*, projector_lr, reward_funcs, signal_embedding_lr_scale"):
        load_recipe("quickstart-grpo", {"no_such_key": 1})
    with pytest.raises(ValueError, match="did you mean 'num_generations'"):
        load_recipe("quickstart-grpo", {"num_generation": 4})
    with pytest.raises(ValueError, match="'num_generations' is a GRPOConfig key: set `trainer: grpo`"):
        load_recipe("quickstart-stage2", {"num_generations": 4})


def test_train_help_lists_the_grpo_keys(capsys):
    assert "--num_generations" in recipe_help("grpo") and "--reward_funcs" in recipe_help("grpo")
    assert "--num_generations" not in recipe_help("sft") and "--reward_funcs" not in recipe_help("dpo")
    assert main(["train", "quickstart-grpo", "--help"]) == 0
    printed = capsys.readouterr().out
    assert "--max_completion_length" in printed and "GRPOConfig" in printed


def _said(*texts) -> list:
    """Conversational completions, as TRL gives them for conversational prompts."""
    return [[{"role": "assistant", "content": text}] for text in texts]


def test_each_built_in_reward_on_hand_made_completions():
    solutions = ["yes", "Yes", "no", "red"]
    assert exact_match_reward(["yes", " yes.", "No", "blue"], solution=solutions) == [1.0, 1.0, 1.0, 0.0]
    assert exact_match_reward(_said("YES", "<answer>yes</answer>", "no way", ""), solution=solutions) == [1, 1, 0, 0]
    assert exact_match_reward(["yes\n", "<answer>\n Yes.\n</answer>"], solution=["yes", "yes"]) == [1.0, 1.0]
    typed = [[{"role": "assistant", "content": [{"type": "text", "text": "red"}]}]]
    assert exact_match_reward(typed, solution=["red"]) == [1.0]

    numbers = ["three", "3", "12", "2.5", "red"]
    completions = ["3", "There are three.", "<think>ten and two</think><answer>12</answer>", "2.50", "red"]
    assert numeric_reward(completions, solution=numbers) == [1.0, 1.0, 1.0, 1.0, None]  # no number: no reward
    assert numeric_reward(["two", "none", "-3"], solution=["3", "3", "-3"]) == [0.0, 0.0, 1.0]

    tagged = ["<answer>yes</answer>", "<think>count</think>\n<answer>3</answer>"]
    assert format_reward([*tagged, "yes", "<answer>yes", "x<answer>1</answer>"]) == [1.0, 1.0, 0.0, 0.0, 0.0]

    assert resolve_reward("exact_match") is exact_match_reward
    assert resolve_reward("modeling_mmllm.training.rewards:format_reward") is format_reward
    assert resolve_reward("modeling_mmllm.training.rewards.numeric_reward") is numeric_reward

    # weighted, as TRL sums them; a reward that does not apply (None, NaN) adds nothing; TRL's keyword arguments
    def not_a_number(completions, trainer_state, log_metric, **kwargs):
        return [float("nan")] * len(completions)

    rewards = Rewards([exact_match_reward, numeric_reward, not_a_number], [1.0, 0.5, 1.0])
    score = rewards.mean([[]] * 2, ["3", "yes"], {"solution": ["3", "yes"]})
    assert score == pytest.approx(((1.0 + 0.5) + 1.0) / 2)


def test_grpo_data_from_conversations_and_prompt_files(tmp_path):
    rows = load_training_data({"synthetic": "count-compare", "n": 8}, layout="prompt")
    assert {"prompt", "images", "solution", "kind", "answer"} <= set(rows.column_names)
    assert "messages" not in rows.column_names
    assert rows[0]["prompt"][-1]["role"] == "user" and rows[0]["prompt"][-1]["content"] in COMPARE_QUESTIONS.values()
    assert rows["solution"] == rows["answer"] and set(rows["solution"]) <= {"yes", "no"}
    typed = Dataset.from_list([_typed_row("red")]).map(lambda row: {"answer": None})  # the answer from its turn
    assert prompt_rows(typed)[0]["solution"] == "red"

    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (220, 40, 40)).save(image)
    prompt = [{"role": "user", "content": "How many shapes?"}]
    lines = [
        {"images": [str(image)], "prompt": prompt, "solution": "1"},
        {"images": [str(tmp_path / "missing.png")], "prompt": prompt, "solution": "1"},
    ]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ValueError, match="row 1: missing image"):
        load_training_data({"dataset": str(data)}, layout="prompt")
    kept = load_training_data({"dataset": str(data)}, bad_rows="skip", layout="prompt")
    assert len(kept) == 1 and isinstance(kept[0]["images"][0], Image.Image)

    no_prompt = tmp_path / "answers.jsonl"
    no_prompt.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ValueError, match="GRPO data needs a `prompt` column"):
        load_training_data({"dataset": str(no_prompt)}, layout="prompt")
    with pytest.raises(ValueError, match="GRPO trains on images only"):
        load_training_data({"synthetic": "video-order", "n": 2}, layout="prompt")


def _typed_row(answer: str) -> dict:
    """A conversation with typed parts (VQA rows become these), its answer in the assistant turn."""
    return {
        "images": [],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
    }


@pytest.mark.parametrize("count", [1, 2, 3])
def test_the_count_comparison_answers_follow_the_count(count, monkeypatch):
    """`count-compare`'s answer is the rule its question states, applied to the count of the scene drawn."""
    scene = Scene(shape="circle", colour="red", size="small", position="left", count=count)
    monkeypatch.setattr(synthetic, "random_scene", lambda rng: scene)
    rule = {"more": lambda number: count > number, "fewer": lambda number: count < number}
    rows = synthetic.compare_rows(40, image_size=32)
    for row in rows:
        ((kind, number),) = [key for key, text in COMPARE_QUESTIONS.items() if text == row["messages"][0]["content"]]
        assert row["kind"] == kind and row["answer"] == ("yes" if rule[kind](number) else "no")
    assert len({row["messages"][0]["content"] for row in rows}) == len(COMPARE_QUESTIONS)


def test_grpo_data_problems_are_refused_before_any_evaluation(owl2_folder, tmp_path):
    from modeling_mmllm.training import train

    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (220, 40, 40)).save(image)
    prompt = [{"role": "user", "content": "What colour is it?"}]
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"images": [str(image)], "prompt": prompt}) + "\n")
    settings = {"model": str(owl2_folder), "data": {"dataset": str(data)}, "output_dir": str(tmp_path / "run")}
    recipe = load_recipe("quickstart-grpo", settings)
    with pytest.raises(ValueError, match="read each row's `solution`: the data has no such column"):
        train(recipe)
    formatted = load_recipe("quickstart-grpo", {**settings, "reward_funcs": ["format"], "beta": 0})
    assert len(grpo_prompts(formatted, None)) == 1  # `format` reads no solution
    rows = [
        {"images": [str(image)], "prompt": prompt, "solution": " "},
        {"images": [str(image)], "prompt": prompt, "solution": None},
        {"images": [str(image)], "prompt": [], "solution": "red"},
        {"images": [str(image)], "prompt": prompt, "solution": "red"},
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(
        ValueError, match="3 row\\(s\\).*row 0: empty solution.*row 1: empty solution.*row 2: no prompt"
    ):
        train(recipe)
    preset = load_recipe("quickstart-grpo", {"model": "owl2-tiny", "output_dir": str(tmp_path / "p")})
    with pytest.raises(ValueError, match="beta=0.04 needs a reference model"):
        train(preset)
    quantized = load_recipe("quickstart-grpo", settings)
    quantized.model["quantization"] = "8bit"
    with pytest.raises(ValueError, match="with model.quantization: TRL would load the KL term's reference"):
        check_reference(quantized, MMLLMForConditionalGeneration.from_pretrained(owl2_folder))


def test_mmllm_train_grpo_writes_the_model_history_card_and_figures_and_resumes(owl2_folder, tmp_path, capsys, caplog):
    output = tmp_path / "grpo"
    command = ["train", "quickstart-grpo", "--model", str(owl2_folder), "--output_dir", str(output), *SMALL_RUN]
    assert main([*command, "--max_steps", "3", "--save_steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert (output / "model" / "model.safetensors").is_file()
    assert re.search(r"^reward/mean\s+-?\d+\.\d{3} -> -?\d+\.\d{3}$", printed, re.MULTILINE), printed
    metrics = json.loads((output / "model" / "eval_results.json").read_text())
    assert {"reward/mean", "before/reward/mean", "accuracy/overall", "before/accuracy/overall"} <= set(metrics)
    (stage,) = json.loads((output / "model" / "training_history.json").read_text())
    assert (stage["trainer"], stage["steps"], stage["reward_funcs"], stage["beta"]) == ("grpo", 3, REWARDS, 0.04)
    assert [step for step, _ in stage["reward_curve"]] == [1, 2, 3] and len(stage["kl_curve"]) == 3
    card = (output / "model" / "README.md").read_text()
    assert "| quickstart-grpo | grpo |" in card and "- grpo" in card
    reloaded = MMLLMForConditionalGeneration.from_pretrained(output / "model")
    assert not torch.equal(
        reloaded.model.language_model.layers[0].mlp.up_proj.weight,
        MMLLMForConditionalGeneration.from_pretrained(owl2_folder).model.language_model.layers[0].mlp.up_proj.weight,
    )

    assert main([*command, "--max_steps", "5", "--save_steps", "3"]) == 0
    assert f"resuming from {output / 'checkpoint-3'}" in caplog.text
    (stage,) = json.loads((output / "model" / "training_history.json").read_text())
    assert stage["steps"] == 5 and [step for step, _ in stage["reward_curve"]][-1] == 5


# A fresh process where the package cannot be imported: TRL's GRPOTrainer trains the folder through its own code,
# the KL term's reference loaded by TRL from the folder too.
REMOTE_GRPO = """
import json, sys, tempfile
sys.modules["modeling_mmllm"] = None
import numpy as np, torch
from datasets import Dataset
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import GRPOConfig, GRPOTrainer
folder = sys.argv[1]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
rng = np.random.default_rng(0)
images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
data = Dataset.from_list([{"images": [image], "prompt": [{"role": "user", "content": "What colour is it?"}]}
                          for image in images])
def shorter(completions, **kwargs):  # any reward that differs between completions gives a gradient
    return [-float(len(completion[0]["content"])) for completion in completions]
args = GRPOConfig(output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=6, learning_rate=1e-2, beta=0.04, use_cpu=True, bf16=False,
                  gradient_checkpointing=False, trust_remote_code=True, report_to=[], save_strategy="no",
                  logging_steps=1)
before = {name: value.clone() for name, value in model.named_parameters()}
trainer = GRPOTrainer(model=model, reward_funcs=[shorter], args=args, train_dataset=data, processing_class=processor)
trainer.train()
changed = sorted({name.split(".")[1] for name, value in model.named_parameters()
                  if not torch.equal(value, before[name])})
logs = [entry for entry in trainer.state.log_history if "kl" in entry]
print(json.dumps({"changed": changed, "module": type(model).__module__, "kl": [entry["kl"] for entry in logs]}))
"""


@pytest.mark.hub
def test_trl_grpo_trainer_trains_a_saved_folder_through_its_remote_code(owl2_folder):
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_GRPO, str(owl2_folder)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["module"].startswith("modeling_mmllm")  # the folder's own code
    assert {"language_model", "multi_modal_projector"} <= set(report["changed"])
    assert len(report["kl"]) == 2
