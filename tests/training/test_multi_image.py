"""Multi-image rows: several images interleaved with text in one turn reach the model where the text puts them, and
the `multi-image-tiny-sft` recipe learns a task that needs telling the images apart (the colour of the first or the
second of two swatches of different colours) to at least 90% held out."""

import json

import pytest

from modeling_mmllm.data.synthetic import make_dataset
from modeling_mmllm.training import load_recipe, train
from modeling_mmllm.training.collator import MultimodalCollator
from modeling_mmllm.training.model_setup import build_model


def test_interleaved_images_sit_where_the_text_puts_them():
    _, processor = build_model({"preset": "llava-tiny"})
    rows = make_dataset("multi-image", 4, image_size=32)
    batch = MultimodalCollator(processor=processor)([dict(row) for row in rows])
    assert batch["pixel_values"].shape[0] == 8  # two images per row, in row order
    text = processor.tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    image = processor.image_token
    first, second = text.index("First:"), text.index("Second:")
    question = text.index("What colour is the")
    assert first < text.index(image, first) < second < text.index(image, second) < question
    assert text.count(image) == 2 * processor.image_seq_length


@pytest.mark.slow
def test_multi_image_recipe_learns_which_image_a_question_is_about(tmp_path):
    recipe = load_recipe("multi-image-tiny-sft", {"output_dir": str(tmp_path), "report_to": "none"})
    folder = train(recipe, name="multi-image-tiny-sft")
    metrics = json.loads((folder / "eval_results.json").read_text())
    assert metrics["accuracy/first"] >= 0.9 and metrics["accuracy/second"] >= 0.9, metrics
