"""Audio and video through the same mechanism as images: exact token counts, interleaving, the modality-adaptive
module with three modalities, clear errors, a fresh-process reload and learning from synthetic audio."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_images, perturb_branches
from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration, MMLLMProcessor
from modeling_mmllm.builders.presets import load_processor_preset
from modeling_mmllm.configuration_mmllm import AUDIO, IMAGE, VIDEO
from modeling_mmllm.data.synthetic import make_dataset
from modeling_mmllm.evaluation.metrics import exact_match
from modeling_mmllm.saving import save_model_folder
from modeling_mmllm.training import load_recipe, train

soundfile = pytest.importorskip("soundfile", reason="audio files need mmllm[audio] (soundfile)")

pytestmark = pytest.mark.hub

RATE = 16000
GREEDY = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
# audio-tiny (image + audio) with video switched on: three modalities, each with its own decoder branch.
ALL = dict(video_token_id=6, video_num_frames=4, video_temporal_pool=2, modality_adaptive_modalities=[1, 2, 3])


def _tone(seconds: float, frequency: float = 440.0) -> np.ndarray:
    time = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * frequency * time)).astype(np.float32)


def _clip(n: int = 10) -> list[Image.Image]:
    """`n` frames of distinct solid colours (frame i has red = 20 * i)."""
    return [Image.new("RGB", (40, 40), (20 * index, 100, 50)) for index in range(n)]


def _prompt(processor, *parts: str, question: str = "What is it?") -> str:
    content = [{"type": part} for part in parts] + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@pytest.fixture(scope="module")
def config():
    return MMLLMConfig.from_preset("audio-tiny", **ALL)


@pytest.fixture(scope="module")
def processor(config):
    return load_processor_preset(MMLLMProcessor, "audio-tiny", config)


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    model = MMLLMForConditionalGeneration(config).eval()
    for modality in (IMAGE, VIDEO, AUDIO):  # branches that differ from text, so routing matters
        perturb_branches(model, modality, seed=modality)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # well-separated greedy choices
    return model


def _audio_tokens(batch, row: int = 0) -> int:
    return int((batch["mm_token_type_ids"][row] == AUDIO).sum())


@pytest.mark.parametrize(
    "seconds, windows, tokens",
    [
        (0.3, 1, 4),  # 30 feature frames -> 15 encoder frames -> 4 tokens (stride 4)
        (1.0, 1, 13),  # 100 -> 50 -> 13
        (2.0, 1, 25),  # a full 2 s window of audio-tiny: 200 -> 100 -> 25
        (2.5, 2, 32),  # two windows: 25 + 7
        (4.1, 3, 52),  # 25 + 25 + 2
    ],
)
def test_audio_expands_to_the_count_of_its_real_length(processor, model, seconds, windows, tokens):
    batch = processor(
        audio=[_tone(seconds)], text=[_prompt(processor, "audio")], sampling_rate=RATE, return_tensors="pt"
    )
    assert batch["input_features"].shape[0] == windows
    assert _audio_tokens(batch) == tokens
    with torch.no_grad():
        features = model.model.get_audio_features(batch["input_features"], batch["input_features_mask"]).pooler_output
        model(**batch)  # every placeholder gets exactly one feature
    assert features.shape[1] == tokens


def test_a_long_clip_is_its_windows_in_order(processor, model):
    """A 2.5 s clip encodes as its first 2 s window followed by the remaining 0.5 s (Whisper's window is 2 s)."""
    waveform = _tone(2.5, 660.0)
    whole = processor(audio=[waveform], text=["<audio>"], sampling_rate=RATE, return_tensors="pt")
    parts = processor(
        audio=[waveform[: 2 * RATE], waveform[2 * RATE :]],
        text=["<audio><audio>"],
        sampling_rate=RATE,
        return_tensors="pt",
    )
    with torch.no_grad():

        def encode(*inputs):
            return model.model.get_audio_features(*inputs).pooler_output

        torch.testing.assert_close(
            encode(whole["input_features"], whole["input_features_mask"]),
            encode(parts["input_features"], parts["input_features_mask"]),
        )


def test_audio_as_array_tensor_dict_and_files(processor, tmp_path):
    waveform = _tone(0.7)
    soundfile.write(tmp_path / "clip.wav", waveform, RATE, subtype="FLOAT")
    soundfile.write(tmp_path / "clip.flac", waveform, RATE)  # 16-bit samples
    stereo = np.stack([waveform, waveform], axis=1)
    forms = [
        waveform,
        torch.from_numpy(waveform),
        {"array": waveform, "sampling_rate": RATE},
        stereo,
        str(tmp_path / "clip.wav"),
        str(tmp_path / "clip.flac"),
    ]
    features = [
        processor(audio=[form], text=["<audio>"], sampling_rate=RATE, return_tensors="pt")["input_features"]
        for form in forms
    ]
    for other in features[1:-1]:
        torch.testing.assert_close(other, features[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(features[-1], features[0], atol=1e-2, rtol=0)  # FLAC's 16-bit quantisation


def test_other_sampling_rates_are_resampled_or_refused(processor, tmp_path, monkeypatch):
    """A clip at another rate is resampled to the encoder's (its real length decides the tokens), from an array,
    a dict or a file alike; without soxr it is refused, never misread."""
    soundfile.write(tmp_path / "clip.wav", _tone(1.0)[::2], 8000)
    clips = {
        "array": dict(audio=[_tone(2.0)], sampling_rate=2 * RATE),
        "dict": dict(audio=[{"array": _tone(1.0)[::2], "sampling_rate": RATE // 2}]),
        "file": dict(audio=[str(tmp_path / "clip.wav")]),
    }
    for clip in clips.values():
        batch = processor(text=["<audio>"], return_tensors="pt", **clip)
        assert _audio_tokens(batch) == _audio_tokens(
            processor(audio=[_tone(1.0)], sampling_rate=RATE, text=["<audio>"], return_tensors="pt")
        )
    monkeypatch.setattr("modeling_mmllm.processing_mmllm.soxr", None)
    with pytest.raises(ValueError, match="sampled at 32000 Hz.*expects 16000 Hz: install soxr"):
        processor(text=["<audio>"], **clips["array"])


def test_audio_files_in_chat_messages_are_loaded_and_resampled(processor, tmp_path):
    soundfile.write(tmp_path / "clip.wav", _tone(1.0), 8000)  # another rate: transformers' loader resamples
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "audio", "path": str(tmp_path / "clip.wav")},
                {"type": "text", "text": "How many beeps are there?"},
            ],
        }
    ]
    batch = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt"
    )
    assert _audio_tokens(batch) == 25  # 2 s at 16 kHz after resampling


def test_video_frames_arrays_and_files_give_the_same_clip(processor, tmp_path):
    frames = _clip(10)
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=40)
    prompt = _prompt(processor, "video")
    arrays = [np.asarray(frame) for frame in frames]
    forms = [frames, np.stack(arrays), arrays, str(tmp_path / "clip.gif")]
    batches = [processor(videos=[form], text=[prompt], return_tensors="pt") for form in forms]
    batches.append(processor(videos=arrays, text=[prompt], return_tensors="pt"))  # one clip, not a list of clips
    for batch in batches:
        assert batch["pixel_values_videos"].shape == (1, 4, 3, 32, 32)
        assert int((batch["mm_token_type_ids"][0] == VIDEO).sum()) == processor.video_seq_length == 2 * 16
        torch.testing.assert_close(batch["pixel_values_videos"], batches[0]["pixel_values_videos"], atol=0.02, rtol=0)
    # Frames 0, 3, 6 and 9 are sampled uniformly from 10 (red channel 0, 60, 120, 180 before normalisation).
    singles = processor(images=[frames[i] for i in (0, 3, 6, 9)], text=["<image>" * 4], return_tensors="pt")
    torch.testing.assert_close(batches[0]["pixel_values_videos"][0], singles["pixel_values"])


def test_interleaved_conversation_and_mixed_batches(processor, model):
    """Image, clip, audio and image again in one message; rows with different modality sets batch like singles."""
    image_a, image_b = make_images(2)
    rows = [
        dict(
            images=[image_a, image_b],
            videos=[_clip(6)],
            audio=[_tone(0.8)],
            text=_prompt(processor, "image", "video", "audio", "image"),
        ),
        dict(audio=[_tone(1.3, 880.0)], text=_prompt(processor, "audio", question="How many beeps are there?")),
        dict(videos=[_clip(5)], text=_prompt(processor, "video")),
        dict(text=_prompt(processor, question="What is one plus one?")),
    ]
    first = processor(**{**rows[0], "text": [rows[0]["text"]]}, sampling_rate=RATE, return_tensors="pt")
    types = first["mm_token_type_ids"][0].tolist()
    assert [types.count(modality) for modality in (IMAGE, VIDEO, AUDIO)] == [2 * 16, 32, 10]
    order = [types[i] for i in range(len(types)) if types[i] and (i == 0 or types[i - 1] != types[i])]
    assert order == [IMAGE, VIDEO, AUDIO, IMAGE]

    singles = []
    with torch.no_grad():
        for row in rows:
            batch = processor(**{**row, "text": [row["text"]]}, sampling_rate=RATE, return_tensors="pt")
            singles.append((model(**batch).logits[0, -1], model.generate(**batch, **GREEDY)[0, -5:]))
            uncached = model.generate(**batch, **GREEDY, use_cache=False)[0, -5:]
            assert torch.equal(singles[-1][1], uncached)
        mixed = processor(
            images=[image_a, image_b],
            videos=[_clip(6), _clip(5)],
            audio=[_tone(0.8), _tone(1.3, 880.0)],
            text=[row["text"] for row in rows],
            sampling_rate=RATE,
            padding=True,
            return_tensors="pt",
        )
        logits, generated = model(**mixed).logits[:, -1], model.generate(**mixed, **GREEDY)[:, -5:]
    for index, (single_logits, single_ids) in enumerate(singles):
        torch.testing.assert_close(logits[index], single_logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(generated[index], single_ids)


def test_modality_adaptive_properties_with_three_modalities(config, processor):
    plain_config = MMLLMConfig.from_preset("audio-tiny", **{**ALL, "modality_adaptive": False})
    torch.manual_seed(1)
    plain = MMLLMForConditionalGeneration(plain_config).eval()
    adaptive = copy.deepcopy(plain)
    adaptive.enable_modality_adaptive(modalities=[IMAGE, VIDEO, AUDIO])
    text = processor(text=[_prompt(processor, question="What is one plus one?")], return_tensors="pt")
    three = processor(
        images=make_images(1),
        videos=[_clip(4)],
        audio=[_tone(0.6)],
        sampling_rate=RATE,
        text=[_prompt(processor, "image", "video", "audio")],
        return_tensors="pt",
    )
    with torch.no_grad():
        assert torch.equal(plain(**text).logits, adaptive(**text).logits)  # text only: bit-identical
        torch.testing.assert_close(adaptive(**three).logits, plain(**three).logits, atol=1e-6, rtol=0)
        reference = adaptive(**three).logits[0]
        types = three["mm_token_type_ids"][0]
        for modality in (IMAGE, VIDEO, AUDIO):  # each branch affects its own tokens and what follows, nothing before
            changed = copy.deepcopy(adaptive)
            perturb_branches(changed, modality)
            logits = changed(**three).logits[0]
            first = int((types == modality).nonzero()[0])
            assert torch.equal(logits[:first], reference[:first])
            assert (logits[first:] - reference[first:]).abs().amax(-1).min() > 0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: p(audio=[_tone(1)], text=["<audio>"]), "Audio item 0 has no sampling rate"),
        (lambda p: p(audio=[np.zeros(0, np.float32)], text=["<audio>"], sampling_rate=RATE), "Audio item 0 is empty"),
        (lambda p: p(text=["<audio> where is it?"]), "Got 0 audio item\\(s\\) but 1 <audio>"),
        (lambda p: p(audio=[_tone(1)], text=["no placeholder"], sampling_rate=RATE), "Got 1 audio item\\(s\\) but 0"),
        (lambda p: p(audio=["/no/such.wav"], text=["<audio>"]), "Audio item 0: cannot read /no/such.wav"),
        (
            lambda p: p(audio=[_tone(1), _tone(45)], text=["<audio><audio>"], sampling_rate=RATE),
            "Audio item 1 \\(45.0 s\\) needs 563 tokens, more than the model's context of 512",
        ),
        (lambda p: p(videos=[[]], text=["<video>"]), "Video item 0 is empty"),
        (lambda p: p(videos=[[1, 2, 3]], text=["<video>"]), "Video item 0 is empty or not a clip"),
        (lambda p: p(videos=[_clip(3)], text=["two <video><video>"]), "Got 1 video item\\(s\\) but 2 <video>"),
        (lambda p: p(videos=["/no/such.gif"], text=["<video>"]), "Video item 0: cannot read /no/such.gif"),
    ],
)
def test_bad_audio_and_video_input_names_the_item(processor, call, message):
    with pytest.raises(ValueError, match=message):
        call(processor)


def test_models_without_audio_or_video_refuse_it_clearly():
    processor = MMLLMProcessor.from_preset("llava-tiny")
    with pytest.raises(ValueError, match="Got audio input, but this processor has no audio support"):
        processor(audio=[_tone(1)], text=["<audio>"], sampling_rate=RATE)
    with pytest.raises(ValueError, match="no video support"):
        processor(videos=[_clip(4)], text=["<video>"])


def test_presets():
    audio, video = MMLLMConfig.from_preset("audio-tiny"), MMLLMConfig.from_preset("video-tiny")
    assert audio.audio_config.model_type == "whisper" and audio.modality_adaptive_modalities == [IMAGE, AUDIO]
    assert video.video_seq_length == 2 * 9 and video.modality_adaptive_modalities == [IMAGE, VIDEO]
    processor = MMLLMProcessor.from_preset("video-tiny")
    batch = processor(videos=[_clip(7)], text=["<video>"], return_tensors="pt")
    assert int((batch["mm_token_type_ids"] == VIDEO).sum()) == 18


FRESH = """
import json, sys
sys.modules["modeling_mmllm"] = None  # only the folder's own code may run
import numpy as np, torch
from PIL import Image
from transformers import AutoModelForMultimodalLM, AutoProcessor
folder = sys.argv[1]
model = AutoModelForMultimodalLM.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
time = np.arange(12000) / 16000
clip = [Image.new("RGB", (40, 40), (20 * i, 100, 50)) for i in range(6)]
batch = processor(images=[Image.new("RGB", (40, 48), (200, 30, 30))], videos=[clip],
                  audio=[(0.3 * np.sin(2 * np.pi * 440 * time)).astype(np.float32)], sampling_rate=16000,
                  text=[sys.argv[2]], return_tensors="pt")
ids = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
print(json.dumps(ids[0, -5:].tolist()))
"""


@pytest.mark.slow
def test_saved_folder_reloads_in_a_fresh_process(processor, model, tmp_path):
    save_model_folder(model, processor, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForMultimodalLM"] == "modeling_mmllm.MMLLMForConditionalGeneration"
    prompt = _prompt(processor, "audio", "image", "video")
    run = subprocess.run(
        [sys.executable, "-c", FRESH, str(tmp_path / "model"), prompt], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    batch = processor(
        images=[Image.new("RGB", (40, 48), (200, 30, 30))],
        videos=[_clip(6)],
        audio=[_tone(0.75)],
        sampling_rate=RATE,
        text=[prompt],
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = model.generate(**batch, **GREEDY)[0, -5:].tolist()
    assert json.loads(run.stdout.strip().splitlines()[-1]) == expected


@pytest.mark.slow
def test_audio_model_learns_to_answer_held_out_audio_questions(tmp_path):
    """The shipped recipe trains audio-tiny from scratch on CPU (about a minute): beep counts and pitch of clips
    it never heard (chance: beeps 1/3, pitch 1/2)."""
    folder = train(
        load_recipe("audio-tiny-sft", {"output_dir": str(tmp_path), "report_to": "none"}), name="audio-tiny-sft"
    )
    reported = json.loads((folder / "eval_results.json").read_text())
    model, processor = MMLLMForConditionalGeneration.from_pretrained(folder), MMLLMProcessor.from_pretrained(folder)
    accuracy = exact_match(model, processor, make_dataset("audio", 200, split="heldout", seed=1))
    print(f"held-out audio accuracy: recipe's eval {reported}, another sample {accuracy}")
    assert accuracy["beeps"] >= 0.8 and accuracy["pitch"] >= 0.9
    assert reported["accuracy/overall"] >= 0.85


def test_cli_generate_takes_audio_and_video_files(processor, model, tmp_path, capsys):
    from modeling_mmllm.cli import main

    save_model_folder(model, processor, tmp_path / "model")
    soundfile.write(tmp_path / "beep.wav", _tone(0.9), RATE)
    frames = _clip(6)
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=40)
    assert (
        main(
            [
                "generate",
                str(tmp_path / "model"),
                "--audio",
                str(tmp_path / "beep.wav"),
                "--video",
                str(tmp_path / "clip.gif"),
                "--prompt",
                "What is it?",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip()
    assert main(["generate", str(tmp_path / "model"), "--audio", "/no/such.wav", "--prompt", "hi"]) == 1
    assert "No audio file /no/such.wav" in capsys.readouterr().err


def test_empty_item_lists_mean_no_items(processor):
    """lmms-eval's `huggingface` model passes `videos=[]` (and `images=[]`, per-sample `[[], []]`) for text-only
    requests: they mean no items, the same inputs as passing none."""
    texts = ["What is it?", "And this?"]
    plain = processor(text=texts, padding=True, return_tensors="pt")
    for empty in ({"videos": [], "audio": []}, {"images": []}, {"images": [[], []], "videos": [], "audio": []}):
        batch = processor(text=texts, padding=True, return_tensors="pt", **empty)
        assert batch.keys() == plain.keys() and all(torch.equal(batch[key], plain[key]) for key in plain), empty
