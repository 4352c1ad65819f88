"""Video rows for training: a `videos` column (frame lists, frame folders, video files) reaches the model as video
clips, bad clips are reported by row index before training, and the `video-tiny-sft` recipe learns a task that needs
the order of frames in time to at least 90% held out."""

import json

import pytest
from PIL import Image

from modeling_mmllm.data.loading import load_training_data
from modeling_mmllm.data.synthetic import make_dataset
from modeling_mmllm.training import load_recipe, train
from modeling_mmllm.training.collator import MultimodalCollator
from modeling_mmllm.training.model_setup import build_model

CONVERSATION = [{"role": "user", "content": "What colour appears first?"}, {"role": "assistant", "content": "red"}]


@pytest.fixture
def video_files(tmp_path):
    """A data file of video rows (no `images` column): a frame folder, an empty folder, a broken file, a missing
    one."""
    frames = tmp_path / "clip"
    frames.mkdir()
    for index in range(6):
        Image.new("RGB", (32, 32), (220, 40, 40) if index < 3 else (40, 80, 230)).save(frames / f"{index:03d}.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.gif").write_bytes(b"not a gif")
    clips = [frames, tmp_path / "empty", tmp_path / "broken.gif", tmp_path / "missing.mp4"]
    rows = [{"videos": [str(clip)], "messages": CONVERSATION} for clip in clips]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    return tmp_path / "data.json"


def test_bad_video_rows_are_reported_by_index_and_good_ones_train(video_files):
    with pytest.raises(ValueError, match=r"3 row\(s\) with bad images or videos \(row 1: bad video .*empty.*row 2: .*"
                       r"cannot read .*broken.gif.*row 3: .*missing.mp4"):  # fmt: skip
        load_training_data({"dataset": str(video_files)})
    dataset = load_training_data({"dataset": str(video_files)}, bad_rows="skip")
    assert len(dataset) == 1 and dataset[0]["images"] == []  # TRL finds vision data by its `images` column
    _, processor = build_model({"preset": "video-tiny"})
    batch = MultimodalCollator(processor=processor)([dict(row) for row in dataset])
    assert batch["pixel_values_videos"].shape[:2] == (1, processor.video_num_frames)
    assert (batch["mm_token_type_ids"] == 2).sum() == processor.video_seq_length
    assert (batch["labels"][batch["mm_token_type_ids"] != 0] == -100).all()


def test_video_parts_in_a_message_get_the_row_clips_in_order():
    _, processor = build_model({"preset": "video-tiny"})
    row = dict(make_dataset("video-order", 1, image_size=32)[0])
    question = row["messages"][0]["content"]
    row["messages"] = [
        {"role": "user", "content": [{"type": "text", "text": question}, {"type": "video"}]},
        {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]},
    ]
    batch = MultimodalCollator(processor=processor)([dict(row)])
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert text.index(question) < text.index(processor.video_token)  # where the message puts it
    row["videos"] = row["videos"] * 2
    with pytest.raises(ValueError, match=r"2 video clip\(s\) but its first user message has 1"):
        MultimodalCollator(processor=processor)([row])


def test_dpo_pairs_with_videos_get_a_clear_error(tmp_path):
    pairs = [{"videos": [[]], "prompt": [CONVERSATION[0]], "chosen": [CONVERSATION[1]], "rejected": [CONVERSATION[1]]}]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    with pytest.raises(ValueError, match="DPO trains on images only"):
        load_training_data({"dataset": str(tmp_path / "pairs.json")}, layout="preference")


@pytest.mark.slow
def test_video_recipe_learns_what_appears_first_and_second(tmp_path):
    recipe = load_recipe("video-tiny-sft", {"output_dir": str(tmp_path), "report_to": "none"})
    folder = train(recipe, name="video-tiny-sft")
    metrics = json.loads((folder / "eval_results.json").read_text())
    assert metrics["accuracy/first"] >= 0.9 and metrics["accuracy/second"] >= 0.9, metrics
