"""AnyRes in training: recipes run with tiles, truncation never cuts an image span, and AnyRes learns a detail
that one view cannot see (the `anyres-detail` recipe as shipped)."""

import json

import pytest
from PIL import Image

from modeling_mmllm import MMLLMForConditionalGeneration, MMLLMProcessor
from modeling_mmllm.training import load_recipe, train

PROMPT = "<|user|>\n<image>What is in the picture?<|end|>\n<|assistant|>\n"


def _rows(sizes):
    from datasets import Dataset

    rows = []
    for width, height in sizes:
        rows.append(
            {
                "images": [Image.new("RGB", (width, height), (200, 30, 30))],
                "messages": [
                    {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Colour?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
                ],
            }
        )
    return Dataset.from_list(rows)


@pytest.mark.slow
def test_a_recipe_trains_with_tiles_and_never_cuts_an_image_span(tmp_path):
    """A small and a large image: the large one's tokens pass max_length, which stops the run naming the row, or
    leaves the row out with `bad_rows: skip`; the rest trains, and the folder reloads with its tiled processor."""
    _rows([(20, 20), (96, 96)]).save_to_disk(tmp_path / "data")
    overrides = {
        "model": "llava-next-tiny",
        "data": {"dataset": str(tmp_path / "data")},
        "max_length": 60,
        "max_steps": 2,
        "per_device_train_batch_size": 1,
        "logging_steps": 1,
        "save_steps": 100,
    }
    with pytest.raises(ValueError, match="1 row\\(s\\) with too many tokens \\(row 1: its image/video/audio tokens"):
        train(load_recipe("quickstart-stage2", {**overrides, "output_dir": str(tmp_path / "stop")}))
    folder = train(
        load_recipe("quickstart-stage2", {**overrides, "output_dir": str(tmp_path / "skip"), "bad_rows": "skip"})
    )
    model = MMLLMForConditionalGeneration.from_pretrained(folder)
    processor = MMLLMProcessor.from_pretrained(folder)
    assert processor.tiled and processor.grid_packing and model.model.image_newline is not None
    inputs = processor(images=[Image.new("RGB", (90, 40), (200, 30, 30))], text=[PROMPT], return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 2


@pytest.mark.slow
def test_anyres_learns_a_detail_that_one_view_cannot_see(tmp_path):
    """The `anyres-detail` recipe as shipped: llava-next-tiny reads the colour of a small square in a wide image;
    llava-tiny, with the same budget and one centre-cropped view, stays near chance (25%)."""
    accuracy = {}
    for preset in ("llava-next-tiny", "llava-tiny"):
        folder = train(load_recipe("anyres-detail", {"model": preset, "output_dir": str(tmp_path / preset)}))
        accuracy[preset] = json.loads((folder / "eval_results.json").read_text())["accuracy/detail"]
    print(accuracy)
    assert accuracy["llava-next-tiny"] >= 0.8 and accuracy["llava-tiny"] <= 0.45, accuracy
