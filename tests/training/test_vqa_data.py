"""VQA-style rows (`question` + `answer` or VQAv2's `answers`, an image, a kind) train and evaluate as they are."""

import json

import pytest
from datasets import Dataset, Features, Image, Value

from helpers import make_images
from modeling_mmllm.data.loading import load_evaluation_data, load_training_data
from modeling_mmllm.training import load_recipe, train

TINY = {"max_steps": 2, "per_device_train_batch_size": 2, "save_steps": 100, "logging_steps": 1}


def vqa_file(root, rows=None):
    """A VQA-style JSON file with two small PNGs beside it (relative paths), VQAv2's `answers` in one row."""
    (root / "images").mkdir(parents=True)
    for index, image in enumerate(make_images(2)):
        image.save(root / "images" / f"{index}.png")
    rows = rows or [
        {"question": "What colour is it?", "answer": "red", "image": "images/0.png", "question_type": "colour"},
        {
            "question": "How many shapes?",
            "answers": [{"answer": "two"}, {"answer": "three"}, {"answer": "two"}],
            "image": "images/1.png",
            "question_type": "count",
        },
    ]
    (root / "vqa.json").write_text(json.dumps(rows))
    return root / "vqa.json"


def test_vqa_json_rows_become_conversations_with_their_images(tmp_path):
    data = load_training_data({"dataset": str(vqa_file(tmp_path))})
    assert {"images", "messages", "answer", "kind"} <= set(data.column_names)
    first, second = data[0], data[1]
    assert first["images"][0].size == (48, 40)  # read from the data file's folder
    assert [part["type"] for part in first["messages"][0]["content"]] == ["image", "text"]
    assert first["messages"][1] == {"role": "assistant", "content": [{"type": "text", "text": "red"}]}
    assert (first["answer"], first["kind"]) == ("red", "colour")
    assert (second["answer"], second["kind"]) == ("two", "count")  # the most common of VQAv2's answers


def test_vqa_layout_variants(tmp_path):
    """`image_path`, string `answers`, `<image>` where the question puts it, no kind column, a text-only row."""
    rows = [
        {"question": "Look: <image> what is it?", "answers": ["cat", "dog", "dog"], "image_path": "images/0.png"},
        {"question": "Any image?", "answers": ["no"], "image_path": None},
    ]
    data = load_training_data({"dataset": str(vqa_file(tmp_path, rows))})
    assert "kind" not in data.column_names and data["answer"] == ["dog", "no"]
    assert [part["type"] for part in data[0]["messages"][0]["content"]] == ["text", "image", "text"]
    assert data[1]["images"] == [] and data[1]["messages"][0]["content"] == [{"type": "text", "text": "Any image?"}]


def test_vqa_rows_of_a_saved_dataset_with_embedded_images(tmp_path):
    features = Features({"image": Image(), "question": Value("string"), "answer": Value("string")})
    rows = [{"image": image, "question": "Colour?", "answer": "blue"} for image in make_images(2)]
    Dataset.from_list(rows, features=features).save_to_disk(tmp_path / "disk")
    data = load_evaluation_data({"dataset": str(tmp_path / "disk")})
    assert len(data) == 2 and data[0]["images"][0].size == (48, 40) and data[0]["answer"] == "blue"


def test_vqa_rows_with_a_missing_image_or_a_marker_without_one_are_reported(tmp_path):
    rows = [
        {"question": "Q?", "answer": "a", "image": "images/0.png"},
        {"question": "Q?", "answer": "a", "image": "images/missing.png"},
    ]
    spec = {"dataset": str(vqa_file(tmp_path / "one", rows))}
    with pytest.raises(ValueError, match="1 row\\(s\\) with bad images \\(row 1: missing image file"):
        load_training_data(spec)
    assert len(load_training_data(spec, bad_rows="skip")) == 1
    rows = [{"question": "<image> and <image>?", "answer": "a", "image": "images/0.png"}]
    with pytest.raises(ValueError, match="2 <image> marker\\(s\\) but its row has 1 image"):
        load_training_data({"dataset": str(vqa_file(tmp_path / "two", rows))})


def test_an_unknown_layout_names_the_accepted_layouts(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"prompt_text": "Q?", "label": "a"}]))
    spec = {"dataset": str(tmp_path / "bad.json")}
    with pytest.raises(
        ValueError, match="^Training data needs `images` and `messages` columns.*VQA rows \\(`question` "
    ):
        load_training_data(spec)
    with pytest.raises(ValueError, match="^Evaluation data needs .*`question` \\+ `answer`.*got columns") as error:
        load_evaluation_data(spec)
    assert "Training data" not in str(error.value)


def test_a_recipe_trains_and_evaluates_on_vqa_rows(tmp_path):
    data = str(vqa_file(tmp_path / "data"))
    recipe = load_recipe(
        "llava-stage1-projector",
        {
            "model": "llava-tiny",
            "data": {"dataset": data},
            "eval": {"dataset": data},
            "output_dir": str(tmp_path / "run"),
            "bf16": False,
            "dataloader_num_workers": 0,
            **TINY,
        },
    )
    folder = train(recipe, name="llava-stage1-projector")
    assert json.loads((folder / "training_history.json").read_text())[-1]["steps"] == 2
    metrics = json.loads((folder / "eval_results.json").read_text())
    assert {"accuracy/colour", "accuracy/count", "accuracy/overall"} <= set(metrics)
