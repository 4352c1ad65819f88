"""The alignment stage (`trainer: dpo`, TRL's DPOTrainer): recipe keys, preference data, a CLI run with its resume,
history, card and before/after figures; full DPO and q/k/v/o LoRA on a modality-adaptive model learning colour
preferences from random weights, and the merged LoRA result in a fresh process."""

import json
import re
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image

from modeling_mmllm import MMLLMForConditionalGeneration, MMLLMProcessor
from modeling_mmllm.cli import main
from modeling_mmllm.data.loading import load_training_data
from modeling_mmllm.data.synthetic import make_dataset
from modeling_mmllm.evaluation.metrics import preference_rate
from modeling_mmllm.training import DPORecipeConfig, RecipeConfig, load_recipe, recipe_help, train

SMALL_RUN = [
    "--data.n", "32", "--data.image_size", "32", "--eval.n", "8", "--eval.image_size", "32",
    "--per_device_train_batch_size", "4", "--logging_steps", "1", "--report_to", "none",
    "--dataloader_num_workers", "0",
]  # fmt: skip

# A fresh process where the package cannot be imported: the merged folder's own code answers.
MERGED_LOGITS = """
import json, sys
sys.modules["modeling_mmllm"] = None
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
folder, image = sys.argv[1:3]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
with torch.no_grad():
    logits = model(**processor(images=[Image.open(image)], text=[prompt], return_tensors="pt")).logits
print(json.dumps(logits[0, -1].tolist()))
"""


def test_a_dpo_recipe_is_a_dpo_config_with_every_field_settable():
    recipe = load_recipe(
        "quickstart-dpo",
        {"beta": 0.3, "loss_type": "ipo", "max_length": 256, "precompute_ref_log_probs": True, "sync_ref_model": True},
    )
    assert isinstance(recipe, DPORecipeConfig) and recipe.trainer == "dpo"
    assert (recipe.beta, recipe.loss_type, recipe.max_length) == (0.3, ["ipo"], 256)
    assert recipe.precompute_ref_log_probs and recipe.sync_ref_model
    assert recipe.use_cpu and not recipe.bf16  # CPU-safe, as the SFT recipes
    assert load_recipe("quickstart-dpo", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}).loss_weights
    assert isinstance(load_recipe("quickstart-stage2"), RecipeConfig)

    with pytest.raises(ValueError, match="did you mean 'beta'"):
        load_recipe("quickstart-dpo", {"bta": 0.3})
    with pytest.raises(ValueError, match="'ppo' is no trainer"):
        load_recipe("quickstart-dpo", {"trainer": "ppo"})
    with pytest.raises(ValueError, match="SFT stages"):
        load_recipe("quickstart-dpo", {"whiten_signal_states": 64})
    with pytest.raises(
        ValueError, match="'beta' is a DPOConfig or GRPOConfig key: set `trainer: dpo` or `trainer: grpo`"
    ):
        load_recipe("quickstart-stage2", {"beta": 0.3})


def test_train_help_lists_the_trainers_own_keys(capsys):
    assert "--beta" in recipe_help("dpo") and "--loss_type" in recipe_help("dpo") and "--trainer" in recipe_help("dpo")
    assert "--beta" not in recipe_help("sft") and "--assistant_only_loss" in recipe_help("sft")
    assert main(["train", "quickstart-dpo", "--help"]) == 0
    printed = capsys.readouterr().out
    assert "--precompute_ref_log_probs" in printed and "DPOConfig" in printed


def _pair(image, chosen="red", rejected="blue") -> dict:
    return {
        "images": [str(image)],
        "prompt": [{"role": "user", "content": "What colour is it?"}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def test_preference_data_from_a_file_stops_on_bad_rows_or_skips_them(tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (220, 40, 40)).save(image)
    rows = [_pair(image), _pair(tmp_path / "missing.png"), _pair(image, chosen=" "), _pair(image, rejected="")]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))

    with pytest.raises(ValueError, match="3 row\\(s\\).*row 1: missing image.*row 2: an empty chosen answer.*row 3"):
        load_training_data({"dataset": str(data)}, layout="preference")
    kept = load_training_data({"dataset": str(data)}, bad_rows="skip", layout="preference")
    assert len(kept) == 1 and isinstance(kept[0]["images"][0], Image.Image)  # paths opened as images

    conversations = tmp_path / "chat.jsonl"
    conversations.write_text(json.dumps({"images": [], "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="needs `prompt`, `chosen` and `rejected`"):
        load_training_data({"dataset": str(conversations)}, layout="preference")
    with pytest.raises(ValueError, match="train it with `trainer: dpo`"):
        load_training_data({"synthetic": "preference", "n": 4})


def test_mmllm_train_dpo_writes_the_model_history_card_and_figures_and_resumes(owl2_folder, tmp_path, capsys, caplog):
    output = tmp_path / "dpo"
    command = ["train", "quickstart-dpo", "--model", str(owl2_folder), "--output_dir", str(output), *SMALL_RUN]
    assert main([*command, "--max_steps", "5", "--save_steps", "5"]) == 0
    printed = capsys.readouterr().out
    assert (output / "model" / "model.safetensors").is_file()
    assert re.search(r"^preference_rate\s+\d+\.\d% -> \d+\.\d%$", printed, re.MULTILINE), printed
    metrics = json.loads((output / "model" / "eval_results.json").read_text())
    assert {"preference_rate", "before/preference_rate", "accuracy/overall", "before/accuracy/overall"} <= set(metrics)
    (stage,) = json.loads((output / "model" / "training_history.json").read_text())
    assert (stage["trainer"], stage["steps"], stage["beta"], stage["loss_type"]) == ("dpo", 5, 0.1, ["sigmoid", "sft"])
    card = (output / "model" / "README.md").read_text()
    assert stage["frozen"] == ["vision_tower"] and "| quickstart-dpo | dpo |" in card and "- dpo" in card
    reloaded = MMLLMForConditionalGeneration.from_pretrained(output / "model")
    assert not torch.equal(
        reloaded.model.language_model.layers[0].mlp.up_proj.weight,
        MMLLMForConditionalGeneration.from_pretrained(owl2_folder).model.language_model.layers[0].mlp.up_proj.weight,
    )

    assert main([*command, "--max_steps", "7", "--save_steps", "5"]) == 0
    assert f"resuming from {output / 'checkpoint-5'}" in caplog.text
    (stage,) = json.loads((output / "model" / "training_history.json").read_text())
    assert stage["steps"] == 7 and (output / "checkpoint-7").is_dir()


def _colour_recipe(tmp_path, **settings) -> DPORecipeConfig:
    recipe = {
        "trainer": "dpo",
        "model": {"preset": "owl2-tiny"},
        "data": {"synthetic": "swatch-preference", "n": 256, "image_size": 32},
        "eval": {"synthetic": "swatch-preference", "n": 64, "split": "heldout", "image_size": 32},
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 8,
        "logging_steps": 10,
        "save_steps": 1000,
        "report_to": "none",
        "dataloader_num_workers": 0,
        **settings,
    }
    path = tmp_path / "colours.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_recipe(str(path))


@pytest.mark.slow
def test_full_dpo_learns_colour_preferences_from_random_weights(tmp_path):
    folder = train(_colour_recipe(tmp_path, max_steps=60, learning_rate=1e-3))
    metrics = json.loads((folder / "eval_results.json").read_text())
    assert metrics["before/preference_rate"] <= 0.7 and metrics["preference_rate"] >= 0.9, metrics


@pytest.mark.slow
def test_qkvo_lora_dpo_on_the_modality_adaptive_branches_learns_and_merges(tmp_path):
    lora = {"r": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    folder = train(_colour_recipe(tmp_path, max_steps=200, learning_rate=5e-3, lora=lora, merge_lora=True))
    metrics = json.loads((folder / "eval_results.json").read_text())
    assert metrics["before/preference_rate"] <= 0.7 and metrics["preference_rate"] >= 0.8, metrics

    targets = json.loads((folder / "adapter_config.json").read_text())["target_modules"]
    assert all(name.startswith("model.language_model.") for name in targets)  # never the vision encoder's q/k/v
    assert {"self_attn.multiway.0.k_proj", "self_attn.multiway.1.v_proj", "self_attn.q_proj", "self_attn.o_proj"} <= {
        name.split(".", 4)[-1] for name in targets
    }

    merged = tmp_path / "run" / "merged"
    image = tmp_path / "swatch.png"
    make_dataset("swatch-preference", 1, split="heldout", image_size=32)[0]["images"][0].save(image)
    run = subprocess.run(
        [sys.executable, "-c", MERGED_LOGITS, str(merged), str(image)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    model, processor = MMLLMForConditionalGeneration.from_pretrained(merged), MMLLMProcessor.from_pretrained(merged)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    inputs = processor(
        images=[Image.open(image)],
        text=[processor.apply_chat_template(messages, add_generation_prompt=True)],
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = model(**inputs).logits[0, -1]
    torch.testing.assert_close(torch.tensor(json.loads(run.stdout.strip().splitlines()[-1])), expected)
    assert not lora_weight_names(merged)
    heldout = make_dataset("swatch-preference", 64, split="heldout", image_size=32)
    assert preference_rate(model, processor, heldout) == pytest.approx(metrics["preference_rate"], abs=0.02)


def lora_weight_names(folder) -> list[str]:
    """Names of LoRA weights left in a saved folder's safetensors (none after a merge)."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        return [name for name in weights.keys() if "lora_" in name]
