"""Recipes and the runner: loading, overrides, freeze policies, collator masking, data sources, push."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset

from helpers import make_images
from modeling_mmllm.builders.presets import asset_dir
from modeling_mmllm.cli import main
from modeling_mmllm.data.loading import llava_json_dataset, load_training_data
from modeling_mmllm.data.synthetic import YES_NO_QUESTIONS, Scene, make_dataset, yes_no_question
from modeling_mmllm.export.hub_card import hub_set_files
from modeling_mmllm.training import (
    DPORecipeConfig,
    GRPORecipeConfig,
    RecipeConfig,
    load_recipe,
    parse_overrides,
    recipe_path,
    train,
)
from modeling_mmllm.training.collator import MultimodalCollator
from modeling_mmllm.training.model_setup import apply_freeze_policy, build_model, vision_lr_scales

RECIPES = sorted(p.stem for p in asset_dir("training_recipes").glob("*.yaml"))
TINY = {"max_steps": 2, "per_device_train_batch_size": 2, "save_steps": 100, "logging_steps": 1}


def test_all_recipes_ship_and_build_their_trainer_settings(tmp_path):
    assert {
        "quickstart-stage0-text",
        "quickstart-stage1",
        "quickstart-stage2",
        "owl2-stage1-pretrain",
        "owl2-stage2-instruct",
        "llava-stage1-projector",
        "llava-lora",
        "quickstart-dpo",
        "owl2-dpo-lora",
        "quickstart-grpo",
        "owl2-grpo-lora",
    } <= set(RECIPES)
    aligned = {"quickstart-dpo": DPORecipeConfig, "owl2-dpo-lora": DPORecipeConfig}  # TRL's DPOConfig, GRPOConfig
    aligned |= {"quickstart-grpo": GRPORecipeConfig, "owl2-grpo-lora": GRPORecipeConfig}  # the others SFTConfig
    for name in RECIPES:
        args = load_recipe(name, {"output_dir": str(tmp_path / name)})
        assert type(args) is aligned.get(name, RecipeConfig)
        assert args.output_dir == str(tmp_path / name) and (name in aligned or args.assistant_only_loss)
    owl2 = load_recipe("owl2-stage1-pretrain")
    assert (owl2.adam_beta1, owl2.adam_beta2, owl2.learning_rate, owl2.vision_lr_decay) == (0.9, 0.98, 1e-4, 0.9)
    assert owl2.activation_checkpointing and owl2.lr_scheduler_type == "cosine"
    assert yaml.safe_load(recipe_path("owl2-stage1-pretrain").read_text())["bf16"]  # on a GPU; a CPU runs float32
    assert owl2.bf16 == torch.cuda.is_available()
    assert load_recipe("owl2-stage2-instruct").learning_rate == 2e-5
    accelerate = {p.stem for p in (asset_dir("training_recipes") / "accelerate").glob("*.yaml")}
    assert accelerate == {"single_gpu", "multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp"}


def test_overrides_and_clear_errors(tmp_path):
    overrides = parse_overrides(
        ["--max_steps", "7", "--learning_rate", "3e-3", "--model", "llava-tiny", "--data.n", "10"]
    )
    recipe = load_recipe("quickstart-stage1", overrides)
    assert recipe.max_steps == 7 and recipe.learning_rate == 0.003
    assert recipe.model == {"preset": "llava-tiny"} and recipe.data["n"] == 10
    assert load_recipe("quickstart-stage1", {"model": str(tmp_path)}).model == {"path": str(tmp_path)}
    with pytest.raises(
        ValueError, match="Unknown recipe keys \\['learning_rat'\\]: 'learning_rat' -> did you mean 'learning_rate'"
    ):
        load_recipe("quickstart-stage1", {"learning_rat": 1})
    with pytest.raises(ValueError, match="Unknown data keys \\['nn'\\]: 'nn' -> did you mean 'n'\\? Valid keys: "):
        load_recipe("quickstart-stage1", {"data.nn": 10})
    with pytest.raises(ValueError, match="Unknown model keys \\['presett'\\]: 'presett' -> did you mean 'preset'"):
        load_recipe("quickstart-stage1", {"model.presett": "owl2-tiny"})
    with pytest.raises(ValueError, match="Unknown lora keys \\['rank'\\]"):
        load_recipe("llava-lora", {"lora.rank": 4})
    with pytest.raises(ValueError, match="bad_rows='drop': use stop"):
        load_recipe("quickstart-stage1", {"bad_rows": "drop"})
    with pytest.raises(FileNotFoundError, match="No recipe 'nope'.*quickstart-stage1"):
        load_recipe("nope")
    with pytest.raises(ValueError, match="--key value"):
        parse_overrides(["max_steps", "3"])
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        build_model({"path": str(tmp_path)})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"learning_rate": "fast"}, r"learning_rate: 'fast' is not a number: give a number \(default: 2e-05\)"),
        ({"max_steps": "ten"}, "max_steps: 'ten' is not a whole number"),
        ({"max_steps": 2.5}, "max_steps: 2.5 is not a whole number"),
        ({"bf16": 1}, "bf16: 1 is not true or false"),
        ({"freeze": {"vision_tower": True}}, "freeze: .* is not a list"),
        ({"save_strategy": "sometimes"}, "sometimes is not a valid SaveStrategy"),
    ],
)
def test_recipe_values_of_the_wrong_type_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_recipe("quickstart-stage1", overrides)


def test_recipe_values_yaml_reads_as_strings_become_what_the_key_needs(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {preset: llava-tiny}\ndata: {synthetic: vqa}\noutput_dir: x\nlearning_rate: 3e-3\n")
    recipe = load_recipe(str(path), {"max_steps": 4.0, "freeze": "vision_tower", "run_name": 7})
    assert recipe.learning_rate == 0.003 and recipe.max_steps == 4 and recipe.freeze == ["vision_tower"]
    assert recipe.run_name == "7"


def test_a_recipe_that_is_not_valid_yaml_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("model: {preset: llava-tiny\noutput_dir: x\n")
    assert main(["train", str(path)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"mmllm train: error: {path} is not valid YAML at line 2, column 11: expected ',' or '}}', but got ':'."
    )
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="is not a recipe: it must be a YAML mapping"):
        load_recipe(str(path))


def test_train_help_lists_every_key_with_its_help_and_default(capsys):
    assert main(["train", "quickstart-stage1", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for key in (
        "--vision_lr_decay",
        "--vision_tower_lr",
        "--projector_lr",
        "--bad_rows {stop,skip}",
        "--generator_pretraining",
        "--train_cross_attention",
        "--learning_rate",
    ):
        assert key in text
    assert (
        "Layer-wise learning-rate decay on the vision encoder (mPLUG-Owl2: 0.9), applied on top of vision_tower_lr. "
        "(default: None)"
    ) in text
    assert "Rows whose image is missing or corrupt: stop (report them) or skip. (default: stop)" in text
    assert text.index("--vision_lr_decay") < text.index("--learning_rate")  # mmllm's keys first


def test_freeze_policies_of_the_stages():
    model, _ = build_model({"preset": "owl2-tiny"})
    apply_freeze_policy(model, ["language_model"], train_modality_adaptive=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("model.vision_tower.") for n in trainable)
    assert any(n.startswith("model.multi_modal_projector.") for n in trainable)
    assert {n for n in trainable if n.startswith("model.language_model.")} == {
        n for n, _ in model.named_parameters() if ".multiway.1." in n
    }
    assert "lm_head.weight" not in trainable
    with pytest.raises(ValueError, match="Unknown components to freeze \\['llm'\\]"):
        apply_freeze_policy(model, ["llm"])


def test_freezing_the_llm_keeps_the_cross_attention_blocks_trainable():
    """Flamingo's freeze: the gated cross-attention blocks (gates included) live inside the LLM but train by default;
    `train_cross_attention: false` freezes them with it; a model without blocks cannot train any."""
    model, _ = build_model({"preset": "flamingo-tiny"})
    blocks = {n for n, _ in model.named_parameters() if ".gated_cross_attn." in n}
    assert {n for n in blocks if n.endswith(("alpha_cross_attn", "alpha_dense"))}
    apply_freeze_policy(model, ["vision_tower", "language_model"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    resampler = {n for n, _ in model.named_parameters() if n.startswith("model.multi_modal_projector.")}
    assert trainable == blocks | resampler
    apply_freeze_policy(model, ["language_model"], train_cross_attention=False)
    assert not blocks & {n for n, p in model.named_parameters() if p.requires_grad}
    owl2, _ = build_model({"preset": "owl2-tiny"})
    with pytest.raises(ValueError, match="train_cross_attention needs gated cross-attention blocks"):
        apply_freeze_policy(owl2, ["language_model"], train_cross_attention=True)
    assert all(p.requires_grad for p in owl2.parameters())  # checked before anything was frozen


def test_layerwise_vision_lr_decay():
    model, _ = build_model({"preset": "owl2-tiny"})
    scales = vision_lr_scales(model, 0.9)
    assert scales["model.vision_tower.encoder.layers.1.mlp.fc1.weight"] == pytest.approx(0.9)
    assert scales["model.vision_tower.encoder.layers.0.mlp.fc1.weight"] == pytest.approx(0.81)
    assert scales["model.vision_tower.embeddings.patch_embedding.weight"] == pytest.approx(0.729)
    assert "model.multi_modal_projector.visual_fc.weight" not in scales


def test_collator_keeps_placeholders_and_prompts_out_of_the_loss():
    _, processor = build_model({"preset": "owl2-tiny"})
    rows = [
        {
            "images": make_images(1),
            "messages": [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "red"}],
        },
        {"images": [], "messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "hi"}]},
    ]
    for assistant_only in (True, False):
        batch = MultimodalCollator(processor=processor, assistant_only_loss=assistant_only)([dict(r) for r in rows])
        labels = batch["labels"]
        assert (labels[batch["mm_token_type_ids"] != 0] == -100).all()
        assert (labels[batch["attention_mask"] == 0] == -100).all()
        if assistant_only:
            kept = processor.tokenizer.decode(labels[0][labels[0] != -100])
            assert kept == "red<|end|>"


def _llava_folder(root: Path) -> Path:
    images = root / "images"
    images.mkdir(parents=True)
    for index, image in enumerate(make_images(2)):
        image.save(images / f"{index}.png")
    (images / "broken.png").write_bytes(b"not a png")
    records = [
        {
            "image": "0.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "noise"}],
        },
        {"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]},
        {
            "image": "missing.png",
            "conversations": [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}],
        },
        {
            "image": "broken.png",
            "conversations": [{"from": "human", "value": "What about <image> here?"}, {"from": "gpt", "value": "z"}],
        },
        {
            "image": "1.png",
            "conversations": [{"from": "human", "value": "Look: <image>"}, {"from": "gpt", "value": "more noise"}],
        },
    ]
    (root / "data.json").write_text(json.dumps(records))
    return root


def test_llava_json_data_with_bad_rows(tmp_path):
    root = _llava_folder(tmp_path)
    dataset = llava_json_dataset(str(root / "data.json"), str(root / "images"))
    first = dataset[0]
    assert first["messages"][0]["content"][0]["type"] == "image" and first["messages"][1]["role"] == "assistant"
    assert dataset[1]["images"] == []
    assert [p["type"] for p in dataset[4]["messages"][0]["content"]] == ["text", "image"]
    spec = {"llava_json": str(root / "data.json"), "image_folder": str(root / "images")}
    with pytest.raises(
        ValueError, match="2 row\\(s\\) with bad images \\(row 2: missing image file.*row 3: unreadable"
    ):
        load_training_data(spec, bad_rows="stop")
    assert len(load_training_data(spec, bad_rows="skip")) == 3


def _llava_file(tmp_path, *turns, image="0.png") -> Path:
    make_images(1)[0].save(tmp_path / image)
    path = tmp_path / "llava.json"
    path.write_text(json.dumps([{"id": "a1", "image": image, "conversations": [*turns]}]))
    return path


def test_llava_rows_without_a_tag_get_their_image_first_and_other_mismatches_are_clear(tmp_path, capsys):
    answer = {"from": "gpt", "value": "a circle"}
    path = _llava_file(tmp_path, {"from": "human", "value": "What is it?"}, answer)
    row = llava_json_dataset(str(path), str(tmp_path))[0]  # LLaVA's own loader puts the image first too
    assert [part["type"] for part in row["messages"][0]["content"]] == ["image", "text"]
    path = _llava_file(tmp_path, {"from": "human", "value": "<image> or <image>?"}, answer)
    with pytest.raises(ValueError, match=r"row 0 \(id a1\): 2 <image> tag\(s\) for 1 image\(s\)"):
        llava_json_dataset(str(path), str(tmp_path))
    path = _llava_file(tmp_path, {"from": "human", "value": "<image>hi"}, {"from": "bot", "value": "x"})
    with pytest.raises(ValueError, match=r"turns need a `from` of human, user, gpt.*got \['bot'\]"):
        llava_json_dataset(str(path), str(tmp_path))
    (tmp_path / "rows.csv").write_text("images,messages\n")
    with pytest.raises(ValueError, match=r"rows.csv: .csv is no data format mmllm reads: give a .json, .jsonl"):
        load_training_data({"dataset": str(tmp_path / "rows.csv")})


def test_yes_no_questions_name_the_scenes_own_value_exactly_when_the_answer_is_yes():
    scene, rng = Scene("circle", "red", "small", "left", 2), np.random.default_rng(0)
    assert [yes_no_question(scene, category, True, rng) for category in YES_NO_QUESTIONS] == [
        "Is there a circle in the image?",
        "Are the shapes red?",
        "Are there two shapes in the image?",
        "Are the shapes on the left?",
    ]
    for category, (template, _, values) in YES_NO_QUESTIONS.items():
        asked = {yes_no_question(scene, category, False, rng) for _ in range(20)}
        assert asked == {template.format(value) for value in values} - {yes_no_question(scene, category, True, rng)}
    answers = make_dataset("yes-no", 400)["answer"]
    assert set(answers) == {"yes", "no"} and 0.4 < answers.count("yes") / 400 < 0.6
    assert make_dataset("joint", 100)["kind"].count("yes/no") == 20  # stage 2: a fifth as many as the questions


def test_datasets_from_disk_and_parquet(tmp_path):
    rows = [
        {
            "images": make_images(1),
            "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        }
    ] * 3
    dataset = Dataset.from_list(rows)
    dataset.save_to_disk(tmp_path / "disk")
    dataset.to_parquet(tmp_path / "data.parquet")
    for source in (tmp_path / "disk", tmp_path / "data.parquet"):
        loaded = load_training_data({"dataset": str(source)})
        assert len(loaded) == 3 and loaded[0]["images"][0].size == (48, 40)
    with pytest.raises(ValueError, match="needs `images` and `messages`"):
        Dataset.from_list([{"text": "x"}]).to_parquet(tmp_path / "bad.parquet")
        load_training_data({"dataset": str(tmp_path / "bad.parquet")})


@pytest.mark.parametrize(
    "name", ["llava-stage1-projector", "llava-lora", "owl2-stage1-pretrain", "owl2-stage2-instruct"]
)
def test_real_size_recipes_run_on_a_tiny_model(name, tmp_path):
    """The real recipes' freeze policies, LoRA and lr decay run end to end on a tiny model and synthetic data."""
    preset = "owl2-tiny" if name.startswith("owl2") else "llava-tiny"
    recipe = load_recipe(
        name,
        {
            "model": preset,
            "data": {"synthetic": "joint", "n": 8, "image_size": 32},
            "output_dir": str(tmp_path),
            "bf16": False,
            "activation_checkpointing": False,
            "dataloader_num_workers": 0,
            **TINY,
        },
    )
    folder = train(recipe, name=name)
    assert (folder / "README.md").is_file()
    history = json.loads((folder / "training_history.json").read_text())
    assert history[-1]["recipe"] == name and history[-1]["steps"] == 2
    if name == "llava-lora":
        assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
        assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_batches_that_reach_no_trainable_parameter_train_on(tmp_path):
    """Only the projector trains and a batch has no image (text rows mixed in): a zero gradient, not a crash."""
    recipe = load_recipe(
        "llava-stage1-projector",
        {
            "model": "llava-tiny",
            "data": {"synthetic": "text-eval"},
            "output_dir": str(tmp_path),
            "bf16": False,
            "dataloader_num_workers": 0,
            **TINY,
        },
    )
    folder = train(recipe, name="llava-stage1-projector")
    assert json.loads((folder / "training_history.json").read_text())[-1]["steps"] == 2


def test_push_uploads_the_hub_ready_folder(tmp_path, monkeypatch):
    calls = {}

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        calls["create"] = (repo_id, private)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        calls["card"] = (Path(folder_path) / "README.md").read_text()

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", create_repo)
    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", upload_folder)
    recipe = load_recipe(
        "quickstart-stage2",
        {
            "model": "owl2-tiny",
            "data": {"synthetic": "joint", "n": 8, "image_size": 32},
            "eval": {"synthetic": "vqa", "n": 4, "split": "heldout", "image_size": 32},
            "output_dir": str(tmp_path),
            "push_to_hub": True,
            "hub_model_id": "someone/owl2-demo",
            "hub_private_repo": True,
            "eval_tasks": ["mmllm_pope"],  # lmms-eval on the saved folder, before the upload
            **TINY,
        },
    )
    train(recipe, name="quickstart-stage2")
    assert calls["create"] == ("someone/owl2-demo", True)
    assert calls["files"] == sorted(
        [
            *(Path(path).name for path in hub_set_files()),  # the code files, derived as save_pretrained copies them
            "README.md",
            "chat_template.jinja",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "processor_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "training_history.json",
            "eval_results.json",
        ]
    )
    card = calls["card"]
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "image-text-to-text"
    assert "modality-adaptive" in header["tags"]
    [index] = header["model-index"]
    scores = {(r["dataset"]["name"], m["type"]): m["value"] for r in index["results"] for m in r["metrics"]}
    metrics = ("accuracy", "precision", "recall", "f1_score", "yes_ratio")
    assert set(scores) == {("mmllm_pope", f"pope_{metric}") for metric in metrics}
    assert all(0.0 <= value <= 1.0 for value in scores.values())
    recorded = json.loads((tmp_path / "model" / "eval_results.json").read_text())
    assert recorded["lmms_eval/mmllm_pope/pope_accuracy"] == scores[("mmllm_pope", "pope_accuracy")]
    assert "accuracy/overall" in recorded and list((tmp_path / "lmms_eval").rglob("*_results.json"))
    for text in (
        "Modality Encoder",
        "Input Projector",
        "LLM Backbone",
        "Output Projector",
        "Modality Generator",
        "## Training",
        "quickstart-stage2",
        "synthetic=joint",
        "## Evaluation",
        "accuracy/overall",
        "trust_remote_code=True",
    ):
        assert text in card


def test_cli_train_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/quickstart here, whatever the checkout holds
    assert main(["train", "nope"]) == 1
    assert "No recipe 'nope'" in capsys.readouterr().err
    assert main(["train", "quickstart-stage2", "--output_dir", str(tmp_path)]) == 1
    assert "not a model folder" in capsys.readouterr().err


def test_missing_images_column_in_messages_is_reported(tmp_path):
    spec = {"dataset": str(tmp_path / "x.json")}
    (tmp_path / "x.json").write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"}]}]))
    with pytest.raises(ValueError, match="needs `images` and `messages`"):
        load_training_data(spec)


def test_save_stage_keeps_the_previous_model_until_the_new_one_is_complete(tmp_path, monkeypatch):
    """A re-run whose save fails (disk full, a kill) leaves the previous run's final folder as it was."""
    from modeling_mmllm.training import runner

    monkeypatch.setattr(runner, "write_model_card", lambda model, folder: None)  # a stand-in model has no card
    save_stage = runner.save_stage

    previous = tmp_path / "model"
    previous.mkdir()
    (previous / "model.safetensors").write_text("the previous run's weights")

    def fail(folder):
        raise OSError("disk full")

    trainer = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(_name_or_path="")), save_model=fail)
    with pytest.raises(OSError, match="disk full"):
        save_stage(trainer, None, tmp_path, {"recipe": "x"})
    assert (previous / "model.safetensors").read_text() == "the previous run's weights"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]  # no staging folder left

    def write(folder):
        (Path(folder) / "model.safetensors").write_text("the new weights")

    trainer.save_model = write
    assert save_stage(trainer, None, tmp_path, {"recipe": "x"}) == previous
    assert (previous / "model.safetensors").read_text() == "the new weights"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_a_finished_stage_is_not_trained_again_unless_overwrite(tmp_path, capsys, caplog):
    """Re-running a finished `mmllm train` changes no file (a resumed Trainer would take one more step and the
    history would claim it); a longer `--max_steps` resumes; `--overwrite` trains again from the start."""
    arguments = ["train", "quickstart-stage2", "--model", "llava-tiny", "--output_dir", str(tmp_path)]
    arguments += ["--data", '{"synthetic": "joint", "n": 8, "image_size": 32}', "--eval", "null"]
    arguments += ["--per_device_train_batch_size", "2", "--save_steps", "2", "--logging_steps", "1"]
    assert main([*arguments, "--max_steps", "2"]) == 0
    folder = tmp_path / "model"
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    history = json.loads((folder / "training_history.json").read_text())
    assert history[-1]["steps"] == 2 and [step for step, _ in history[-1]["losses"]] == [1, 2]

    caplog.clear()
    assert main([*arguments, "--max_steps", "2"]) == 0
    assert f"stage already complete: {folder}; pass --overwrite to train again" in caplog.text
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before

    assert main([*arguments, "--max_steps", "3"]) == 0  # more steps asked for: resumes from checkpoint-2
    assert f"resuming from {tmp_path / 'checkpoint-2'}" in caplog.text
    resumed = json.loads((folder / "training_history.json").read_text())[-1]
    assert resumed["steps"] == 3 and [step for step, _ in resumed["losses"]] == [1, 2, 3]

    caplog.clear()
    assert main([*arguments, "--max_steps", "2", "--overwrite"]) == 0
    assert "resuming" not in caplog.text and "already complete" not in caplog.text
    again = json.loads((folder / "training_history.json").read_text())
    assert len(again) == 1 and again[-1]["steps"] == 2
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    capsys.readouterr()
