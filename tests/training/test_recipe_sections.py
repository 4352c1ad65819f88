"""The typed recipe sections (`model`, `data`, `eval`): one default per key, one source per section, the synthetic
task registry in the help and the errors."""

import json
from dataclasses import asdict, fields

import pytest

from modeling_mmllm.data.synthetic import SYNTHETIC_TASKS, make_dataset
from modeling_mmllm.training import load_recipe, parse_overrides, recipe_help
from modeling_mmllm.training.recipe_sections import DATA_KEYS, MODEL_KEYS, DataSection, ModelSection
from modeling_mmllm.training.recipes import DATA_KEYS as RECIPES_DATA_KEYS


def _recipe(tmp_path, text: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text + "output_dir: x\n")
    return str(path)


def test_data_and_eval_are_stored_with_every_default_filled_in_once(tmp_path):
    recipe = load_recipe("quickstart-stage2", parse_overrides(["--data.n", "64"]))
    defaults = {f.name: f.default for f in fields(DataSection)}
    assert set(recipe.data) == {f.name for f in fields(DataSection)} == set(recipe.eval)
    assert recipe.data == {**defaults, "synthetic": "joint", "n": 64, "image_size": 64}
    assert recipe.eval["split"] == "heldout" and recipe.eval["seed"] == defaults["seed"] == 0
    json.loads(recipe.to_json_string())  # TRL's serialisation: the sections stay plain dicts
    # the model section reads back as the recipe wrote it; ModelSection completes it where it is read
    assert load_recipe(_recipe(tmp_path, "model: {preset: llava-tiny}\ndata: {synthetic: vqa}\n")).model == {
        "preset": "llava-tiny"
    }
    assert ModelSection.parse("model", {"preset": "llava-tiny"}).seed == 0


def test_library_callers_pass_partial_dicts():
    section = DataSection.parse("data", {"synthetic": "vqa", "n": "64"})  # a number YAML read as a string
    assert (section.synthetic, section.n, section.split, section.image_size, section.task) == (
        "vqa",
        64,
        "train",
        64,
        "chat",
    )
    assert DataSection.parse("data", asdict(section)) == section == DataSection.parse("data", section)
    with pytest.raises(ValueError, match=r"data.n: 'many' is not a whole number: give a whole number \(default: 512\)"):
        DataSection.parse("data", {"synthetic": "vqa", "n": "many"})


def test_two_model_sources_are_an_error_naming_both_and_the_fix(tmp_path):
    path = _recipe(tmp_path, "model: {preset: llava-tiny, path: runs/x/model}\ndata: {synthetic: vqa}\n")
    with pytest.raises(ValueError, match=r"The recipe's model names 2 sources, `preset` and `path`: keep one") as error:
        load_recipe(path)
    assert "--model FOLDER_OR_PRESET" in str(error.value)
    with pytest.raises(ValueError, match="names 2 sources, `preset` and `path`"):
        load_recipe("quickstart-stage1", {"model.preset": "llava-tiny", "model.path": "x"})  # two overrides
    with pytest.raises(ValueError, match="needs one of `preset`, `path`, `components` or `mplug_owl2`"):
        load_recipe(_recipe(tmp_path, "model: {seed: 3}\ndata: {synthetic: vqa}\n"))


def test_an_override_source_replaces_the_recipe_files_source(tmp_path):
    """`--model.preset` on a recipe that loads a folder, `--data.synthetic` on one that reads LLaVA JSON: the command
    line picks the source (the README runs the real-size recipes so on a CPU)."""
    recipe = load_recipe("quickstart-stage1", parse_overrides(["--model.preset", "llava-tiny"]))
    assert recipe.model == {"preset": "llava-tiny"}
    recipe = load_recipe("owl2-dpo-lora", parse_overrides(["--model", "owl2-tiny", "--data.synthetic", "vqa"]))
    assert (recipe.data["synthetic"], recipe.data["dataset"], recipe.data["split"]) == ("vqa", None, "train")
    recipe = load_recipe("llava-lora", {"data.synthetic": "joint", "data.n": 16})
    assert recipe.data["llava_json"] is None and recipe.data["n"] == 16
    path = _recipe(tmp_path, "model: {preset: llava-tiny}\ndata: {synthetic: vqa, dataset: rows.json}\n")
    with pytest.raises(ValueError, match="The recipe's data names 2 sources, `synthetic` and `dataset`"):
        load_recipe(path)


def test_an_unknown_synthetic_task_is_an_error_listing_the_registry():
    every = ", ".join(SYNTHETIC_TASKS)
    with pytest.raises(
        ValueError, match=rf"Unknown synthetic task 'vq' \(did you mean 'vqa'\?\): use one of {every}\."
    ):
        load_recipe("quickstart-stage1", {"data.synthetic": "vq"})
    with pytest.raises(ValueError, match=rf"Unknown synthetic task 'nope': use one of {every}\."):
        make_dataset("nope")
    assert len(SYNTHETIC_TASKS) == 15 and all(task.description for task in SYNTHETIC_TASKS.values())


def test_unknown_section_keys_keep_their_did_you_mean_errors():
    with pytest.raises(ValueError, match=r"Unknown data keys \['nn'\]: 'nn' -> did you mean 'n'\? Valid keys: "):
        load_recipe("quickstart-stage1", parse_overrides(["--data.nn", "5"]))
    with pytest.raises(ValueError, match=r"Unknown eval keys \['splt'\]: 'splt' -> did you mean 'split'\?"):
        load_recipe("quickstart-stage2", {"eval.splt": "heldout"})


def test_the_help_is_generated_from_the_fields_and_the_registry():
    assert MODEL_KEYS == {f.name: MODEL_KEYS[f.name] for f in fields(ModelSection)}
    assert RECIPES_DATA_KEYS is DATA_KEYS and DATA_KEYS["n"] == "number of synthetic rows (default 512)"
    assert MODEL_KEYS["seed"] == "seed of the new weights (default 0)"
    text = " ".join(recipe_help("sft").split()).replace("- ", "-")  # argparse wraps lines after hyphens
    for name, task in SYNTHETIC_TASKS.items():
        assert f"{name} ({task.description})" in text
    assert "mplug_owl2: an original mPLUG-Owl2 folder" in text


def test_the_quickstart_bounds_a_stage_through_the_sections(tmp_path, monkeypatch):
    """`run_stage(steps=...)` trims the synthetic rows to what the steps read and the held-out rows to 16."""
    from modeling_mmllm.quickstart import run

    trained = {}
    monkeypatch.setattr(run, "train", lambda recipe, name: trained.setdefault("recipe", recipe) and tmp_path)
    monkeypatch.setattr(run, "stage_losses", lambda folder: [])
    run.run_stage("quickstart-stage2", tmp_path, fast=False, curves={}, model="owl2-tiny", steps=3)
    recipe = trained["recipe"]
    assert recipe.data["n"] == max(64, 3 * recipe.per_device_train_batch_size) < 512
    assert recipe.eval["n"] == 16 and recipe.eval["split"] == "heldout"
    assert set(recipe.data) == {f.name for f in fields(DataSection)}
