"""The `mmllm` command line: every command, and user mistakes as one clear line with exit code 1."""

import io
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from helpers import FIXTURES, make_images, seeded_model, tiny_text_config, tiny_vision_config
from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration, MMLLMProcessor
from modeling_mmllm.builders.presets import offline_tokenizer
from modeling_mmllm.cli import build as build_command
from modeling_mmllm.cli import main, parser
from modeling_mmllm.cli.generate import _prompt_content
from modeling_mmllm.saving import save_model_folder

COMMANDS = ["quickstart", "train", "build", "chat", "generate", "serve", "demo", "eval", "convert", "upgrade", "push"]
FIXTURE = FIXTURES / "mplug-owl2-tiny"
TRANSFORMERS_BARS = ("Loading weights", "Writing model shards")  # transformers' own progress bars


def test_help_lists_every_command_and_each_has_help(capsys):
    help_text = parser().format_help()
    for command in COMMANDS:
        assert command in help_text
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    assert "usage: mmllm" in capsys.readouterr().out


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "image.png"
    make_images(1)[0].save(path)
    return path


def test_generate_and_eval(saved_folder, image_file, capsys):
    assert (
        main(
            [
                "generate",
                str(saved_folder),
                "--image",
                str(image_file),
                "--prompt",
                "What colour?",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip()
    assert main(["eval", str(saved_folder), "--synthetic", "vqa", "--n", "8", "--image-size", "32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("overall") and line.endswith("%") for line in lines)


@pytest.fixture(scope="module")
def any2any_folder(tmp_path_factory):
    model, processor = seeded_model(MMLLMConfig.from_preset("any2any-tiny")), MMLLMProcessor.from_preset("any2any-tiny")
    folder = save_model_folder(model, processor, tmp_path_factory.mktemp("any2any") / "model")
    return folder, model, processor


def test_generate_saves_the_image_a_model_draws(any2any_folder, tmp_path, capsys):
    folder, model, processor = any2any_folder
    target = tmp_path / "drawn.png"
    assert (
        main(
            [
                "generate",
                str(folder),
                "--prompt",
                "Draw one red circle.",
                "--save-image",
                str(target),
                "--max-new-tokens",
                "6",
            ]
        )
        == 0
    )
    assert f"image saved to {target}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["drawn.png"]  # nothing partial left beside it
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Draw one red circle."}]}], add_generation_prompt=True
    )
    pixels = model.generate(
        **processor(text=[prompt], return_tensors="pt"), generation_mode="image", max_new_tokens=6, do_sample=False
    )
    expected = processor.post_process_multimodal_output(pixels, generation_mode="image")[0]
    assert list(Image.open(target).getdata()) == list(expected.getdata())  # PNG is lossless: the same pixels


def test_generate_without_save_image_hints_at_it_when_the_answer_is_an_image(any2any_folder, capsys, monkeypatch):
    folder, model, _ = any2any_folder
    signal = model.config.signal_token_ids
    monkeypatch.setattr(
        MMLLMForConditionalGeneration,
        "generate",  # the model answers with its signal group
        lambda self, input_ids, **kwargs: torch.cat([input_ids, torch.tensor([signal])], dim=1),
    )
    assert main(["generate", str(folder), "--prompt", "Draw one red circle."]) == 0
    assert "add --save-image FILE to draw it" in capsys.readouterr().err


def test_chat_streams_answers_and_attaches_images(saved_folder, image_file):
    session = f"/image {image_file}\nWhat colour is it?\n/image /no/such.png\nAnd now?\n/quit\n"
    run = subprocess.run(
        [sys.executable, "-m", "modeling_mmllm.cli", "chat", str(saved_folder), "--max-new-tokens", "4"],
        input=session,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "[image attached: 48x40]" in run.stdout
    assert "error: No image file /no/such.png." in run.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "/no/such/folder", "--prompt", "hi"], "is not a model folder"),
        (["build", "--preset", "llava-huge", "OUT"], "Unknown preset 'llava-huge'"),
        (["generate", "SAVED", "--prompt", "hi", "--image", "/no/such.png"], "No image file /no/such.png"),
        (["generate", "SAVED", "--prompt", "hi", "--image", "NOT_AN_IMAGE"], "is not an image PIL can read"),
        (["train", "no-such-recipe"], "No recipe 'no-such-recipe'"),
        (["convert", "mplug-owl2", "/no/such", "OUT"], "No such file"),
        (["generate", "SAVED", "--prompt", "Draw.", "--save-image", "OUT.png"], "cannot generate images"),
        (["generate", "ANY2ANY", "--prompt", "Draw.", "--save-image", "OUT.txt"], "use an image file name"),
        (["generate", "ANY2ANY", "--prompt", "Draw.", "--save-image", "/no/such/dir/x.png"], "does not exist"),
        (["generate", "ANY2ANY", "--prompt", "Draw.", "--save-image", "DIR.png"], "is a folder: give a file name"),
        (["generate", "ANY2ANY", "--prompt", "Draw.", "--save-image", "/proc/x.png"], "/proc/x.png: cannot write it"),
        (["generate", "SAVED", "--prompt", "<image> vs <image>?", "--image", "IMAGE"], "has 2 <image> placeholder"),
        (["generate", "SAVED", "--prompt", "<image> what?"], "has 1 <image> placeholder(s) but 0 --image"),
        (["eval", "SAVED", "--split", "nosuch"], "split 'nosuch' is no split of the synthetic tasks: use train or"),
        (["eval", "SAVED", "--synthetic", "vqq"], "Unknown synthetic task 'vqq' (did you mean 'vqa'?)"),
        (["train", "quickstart-stage2", "--data.split", "nosuch"], "split 'nosuch' is no split of the synthetic"),
    ],
)
def test_user_mistakes_are_one_line(argv, message, saved_folder, any2any_folder, image_file, tmp_path, capsys):
    (tmp_path / "fake.png").write_text("not an image")
    (tmp_path / "dir.png").mkdir()
    replace = {
        "SAVED": str(saved_folder),
        "OUT": str(tmp_path / "out"),
        "NOT_AN_IMAGE": str(tmp_path / "fake.png"),
        "ANY2ANY": str(any2any_folder[0]),
        "OUT.png": str(tmp_path / "out.png"),
        "OUT.txt": str(tmp_path / "out.txt"),
        "DIR.png": str(tmp_path / "dir.png"),
        "IMAGE": str(image_file),
    }
    assert main([replace.get(arg, arg) for arg in argv]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mmllm ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png", "fake.png"]  # nothing partial left behind


def test_train_help_of_a_recipe_naming_an_unknown_trainer_is_one_line(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text("trainer: ppo\n")
    assert main(["train", str(tmp_path / "recipe.yaml"), "--help"]) == 1
    assert capsys.readouterr().err == "mmllm train: error: trainer: 'ppo' is no trainer: use one of sft, dpo, grpo.\n"


def _command_raising(monkeypatch, error: BaseException) -> None:
    """`mmllm build` with a `run` that raises `error` (the parser takes each command's `run` from its module)."""

    def run(args):
        raise error

    monkeypatch.setattr(build_command, "run", run)


@pytest.mark.parametrize("error", [KeyError("preset"), RuntimeError("a bug"), TypeError("a bug")])
def test_a_programming_bug_is_not_reported_as_a_user_mistake(error, tmp_path, monkeypatch, capsys):
    """A bug keeps its traceback (the exception leaves main), rather than passing for a one-line user mistake."""
    _command_raising(monkeypatch, error)
    with pytest.raises(type(error)) as raised:
        main(["build", "--preset", "owl2-tiny", str(tmp_path / "out")])
    assert raised.value is error
    assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "error", [ValueError("bad value\nmore detail"), FileNotFoundError("No such file x"), IsADirectoryError("x")]
)
def test_a_user_mistake_raised_by_a_command_is_one_line(error, tmp_path, monkeypatch, capsys):
    _command_raising(monkeypatch, error)
    assert main(["build", "--preset", "owl2-tiny", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == f"mmllm build: error: {str(error).splitlines()[0]}\n"


def test_importing_the_cli_configures_no_logging():
    """Importing `modeling_mmllm.cli` leaves logging alone; `main` quiets torchao and DeepSpeed's CPU notice."""
    code = (
        "import logging, modeling_mmllm.cli as cli\n"
        "noisy = [logging.getLogger(name) for name in ('torchao', 'torch.utils._pytree', 'DeepSpeed')]\n"
        "assert [(logger.level, logger.filters) for logger in noisy] == [(0, [])] * 3\n"
        "assert cli.main(['generate', '/no/such/folder', '--prompt', 'hi']) == 1\n"
        "assert [logger.level for logger in noisy[:2]] == [logging.ERROR] * 2 and len(noisy[2].filters) == 1\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_users_own_image_placeholder_is_where_the_image_goes(saved_folder, image_file, capsys):
    processor = MMLLMProcessor.from_pretrained(saved_folder)
    assert _prompt_content("Compare <image> and <image>.", processor, image=2) == [
        {"type": "text", "text": "Compare "},
        {"type": "image"},
        {"type": "text", "text": " and "},
        {"type": "image"},
        {"type": "text", "text": "."},
    ]
    assert _prompt_content("What colour?", processor, image=1, audio=0) == [
        {"type": "image"},
        {"type": "text", "text": "What colour?"},
    ]
    argv = ["generate", str(saved_folder), "--image", str(image_file), "--max-new-tokens", "4", "--prompt"]
    assert main([*argv, "<image>What colour?"]) == 0
    assert main([*argv, "What colour?"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second  # the same prompt: the image before the text either way


def test_convert_llava_and_mplug_owl2(tmp_path, capsys):
    tokenizer = offline_tokenizer()
    config = LlavaConfig(
        vision_config=tiny_vision_config("clip").to_dict(),
        text_config=tiny_text_config("llama").to_dict(),
        image_token_id=tokenizer.image_token_id,
        image_seq_length=16,
    )
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config)
    llava.save_pretrained(tmp_path / "llava")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default"
    ).save_pretrained(tmp_path / "llava")
    assert main(["generate", str(tmp_path / "llava"), "--prompt", "hi"]) == 1  # not converted yet
    assert f"convert it first: `mmllm convert llava {tmp_path / 'llava'} OUTPUT`" in capsys.readouterr().err
    assert main(["convert", "llava", str(tmp_path / "llava"), str(tmp_path / "ours")]) == 0
    names = {p.name for p in (tmp_path / "ours").iterdir()}
    assert {"model.safetensors", "modeling_mmllm.py", "processor_config.json", "README.md"} <= names
    assert main(["generate", str(tmp_path / "ours"), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert main(["convert", "mplug-owl2", str(FIXTURE), str(tmp_path / "owl2")]) == 0
    assert "no processor was written" in capsys.readouterr().out
    assert json.loads((tmp_path / "owl2" / "config.json").read_text())["modality_adaptive"]


def test_a_folder_that_is_not_an_mmllm_checkpoint_is_refused_before_anything_is_built(tmp_path, capsys):
    """A plain 7B-size Llama config: transformers would only warn and build a default 7B mmllm model (24 GB)."""
    from transformers import LlamaConfig

    LlamaConfig(architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "llama")
    for argv in (["generate", str(tmp_path / "llama"), "--prompt", "hi"], ["eval", str(tmp_path / "llama")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "is not an mmllm checkpoint: its config.json has model_type 'llama' (LlamaForCausalLM)" in err
        assert "from_components(vision=..., text=" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="not an mmllm checkpoint"):
        MMLLMForConditionalGeneration.from_pretrained(tmp_path / "llama")
    config = MMLLMConfig.from_preset("llava-tiny").to_dict()
    del config["text_config"]
    (tmp_path / "edited").mkdir()
    (tmp_path / "edited" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no text_config with a model_type.*7B-size"):
        MMLLMConfig.from_pretrained(tmp_path / "edited")


def test_build_from_components_and_push(tmp_path, monkeypatch, capsys):
    uploads = []
    monkeypatch.setattr(
        "huggingface_hub.HfApi.create_repo", lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id)
    )
    monkeypatch.setattr(
        "huggingface_hub.HfApi.upload_folder",
        lambda self, repo_id, folder_path, **kw: uploads.append((repo_id, folder_path)),
    )
    assert main(["build", "--preset", "owl2-tiny", str(tmp_path / "m")]) == 0
    assert main(["push", str(tmp_path / "m"), "me/owl2-tiny", "--private"]) == 0
    assert uploads == [("me/owl2-tiny", str(tmp_path / "m"))]
    card = (tmp_path / "m" / "README.md").read_text()
    assert "# me/owl2-tiny" in card and 'from_pretrained("me/owl2-tiny"' in card
    assert "pushed" in capsys.readouterr().out


@pytest.mark.slow
def test_quickstart_fast_smoke(tmp_path):
    """The main job's plumbing end to end, with a few steps per stage (the full run is in test_quickstart)."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "modeling_mmllm.cli",
            "quickstart",
            "--fast",
            "--audio",
            "--video",
            "--any2any",
            "--anyres",
            "--dpo",
            "--grpo",
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "accuracy: " in run.stdout and "answer:" in run.stdout
    assert (tmp_path / "quickstart.png").is_file() and (tmp_path / "stage2" / "model" / "model.safetensors").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 <= summary["image/overall"] <= 1 and summary["demo"]["answer"] is not None
    assert 0 <= summary["audio/overall"] <= 1 and "audio accuracy: " in run.stdout  # --audio: audio-tiny too
    assert (tmp_path / "audio" / "model" / "model.safetensors").is_file()
    assert 0 <= summary["video/overall"] <= 1 and "video accuracy: " in run.stdout  # --video: video-tiny too
    assert (tmp_path / "video" / "model" / "model.safetensors").is_file()
    assert 0 <= summary["any2any/image/shape"] <= 1 and "drawing accuracy: " in run.stdout  # --any2any: it draws
    assert (tmp_path / "any2any" / "model" / "model.safetensors").is_file()
    assert {"detail/anyres", "detail/single_view"} <= set(summary) and "small detail, anyres" in run.stdout
    assert (tmp_path / "anyres" / "anyres" / "model" / "model.safetensors").is_file()  # --anyres: both models
    assert {"dpo/preference_rate", "dpo/before/preference_rate"} <= set(summary)  # --dpo: the alignment stage
    assert "dpo, preference_rate" in run.stdout and (tmp_path / "dpo" / "model" / "model.safetensors").is_file()
    assert {"grpo/reward/mean", "grpo/before/reward/mean", "grpo/accuracy/overall"} <= set(summary)  # --grpo
    assert "grpo, reward/mean" in run.stdout and (tmp_path / "grpo" / "model" / "model.safetensors").is_file()
    with Image.open(tmp_path / "quickstart.png") as report, Image.open(tmp_path / "any2any" / "any2any.png") as drawn:
        assert report.height > drawn.height  # the drawings are part of the report


def test_commands_print_results_and_nothing_else(tmp_path):
    """No DeepSpeed GPU notice, no Future/Deprecation warning from our calls, and `mmllm eval`'s results each on a
    line of its own (no progress bar when the output is not a terminal)."""
    env = {**os.environ, "PYTHONWARNINGS": "default::FutureWarning,default::DeprecationWarning"}

    def run(*argv):
        done = subprocess.run(
            [sys.executable, "-m", "modeling_mmllm.cli", *argv], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stderr[-3000:]
        noise = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith(TRANSFORMERS_BARS)]
        assert not noise, noise
        return done.stdout

    assert "saved" in run("build", "--preset", "owl2-tiny", str(tmp_path / "tiny"))
    lines = run("eval", str(tmp_path / "tiny"), "--n", "8", "--image-size", "32").splitlines()
    assert len(lines) == 6 and all(re.fullmatch(r"\w+ +\d+\.\d%", line) for line in lines), lines


@pytest.mark.slow
def test_quickstart_again_keeps_the_finished_stages_and_their_report(tmp_path):
    """A second `mmllm quickstart` reports the three finished stages and trains none (same weights, same loss-curve
    panels in the PNG); `--overwrite` trains them again."""

    def quickstart(*extra):
        command = [sys.executable, "-m", "modeling_mmllm.cli", "quickstart", "--fast", "--output", str(tmp_path)]
        run = subprocess.run([*command, *extra], capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
        with Image.open(tmp_path / "quickstart.png") as report:
            curves = report.crop((0, 0, report.width, 220)).tobytes()  # the loss-curve panels
        return run.stderr, (tmp_path / "stage2" / "model" / "model.safetensors").read_bytes(), curves

    first, weights, curves = quickstart()
    assert first.count("training quickstart-stage") == 3
    again, same_weights, same_curves = quickstart()
    assert again.count("stage already complete") == 3 and "training quickstart-stage" not in again
    assert same_weights == weights and same_curves == curves
    overwritten, _, _ = quickstart("--overwrite")
    assert overwritten.count("training quickstart-stage") == 3 and "already complete" not in overwritten


def test_eval_scores_a_vqa_style_json_per_kind(saved_folder, tmp_path, capsys):
    """`question` / `answer` (or VQAv2's `answers`) / `image` rows, image paths relative to the file: exact match per
    kind; a file in no known layout gets the accepted layouts, as evaluation data."""
    for index, image in enumerate(make_images(2)):
        image.save(tmp_path / f"{index}.png")
    rows = [
        {"question": "What colour is it?", "answer": "red", "image": "0.png", "question_type": "colour"},
        {"question": "How many?", "answers": ["two", "two", "one"], "image": "1.png", "question_type": "count"},
    ]
    (tmp_path / "vqa.json").write_text(json.dumps(rows))
    assert main(["eval", str(saved_folder), "--dataset", str(tmp_path / "vqa.json")]) == 0
    kinds = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.endswith("%")]
    assert kinds == ["colour", "count", "overall"]
    (tmp_path / "bad.json").write_text(json.dumps([{"text": "Q?", "label": "a"}]))
    assert main(["eval", str(saved_folder), "--dataset", str(tmp_path / "bad.json")]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mmllm ")]
    assert len(errors) == 1 and errors[0].startswith("mmllm eval: error: Evaluation data needs")
    assert "`question` + `answer`" in errors[0] and "Training data" not in err and "Traceback" not in err


class _Stdin(io.StringIO):
    """Piped input whose first line is bytes that are not UTF-8 (`input()` raises, as on a strict terminal)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.broken = True

    def readline(self, *args):
        if self.broken:
            self.broken = False
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return super().readline(*args)


def test_chat_drops_the_oldest_exchanges_past_the_context_and_survives_mistakes(
    saved_folder, image_file, monkeypatch, capsys
):
    """llava-tiny's 512 positions: a third long message drops the first exchange (and its image) with a warning; a
    message too long on its own, and undecodable input, are errors that leave the chat running."""
    long = "word " * 55  # about 230 tokens
    session = [
        f"/image {image_file}",
        f"{long} first",
        f"{long} second",
        f"{long} third",
        "word " * 2000,
        "hi",
        "/quit",
    ]
    monkeypatch.setattr(sys, "stdin", _Stdin("\n".join(session) + "\n"))
    calls = []
    generate = MMLLMForConditionalGeneration.generate

    def recorded(self, **inputs):
        calls.append((inputs["input_ids"].shape[1], inputs.get("pixel_values") is not None, inputs["max_new_tokens"]))
        return generate(self, **inputs)

    monkeypatch.setattr(MMLLMForConditionalGeneration, "generate", recorded)
    assert main(["chat", str(saved_folder), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "error: that line is not valid UTF-8 text" in out
    assert "warning: the conversation is longer than the model's context (512 tokens): dropped the oldest 1 " in out
    assert "exchange(s) and their 1 image(s)." in out
    assert "error: this message is" in out and "the model's context is 512: shorten it or attach fewer images" in out
    assert len(calls) == 4  # first, second, third (after the drop), "hi" (after the error)
    assert [has_image for _, has_image, _ in calls] == [True, True, False, False]
    assert all(length + new_tokens <= 512 for length, _, new_tokens in calls)
    assert calls[3][0] > calls[2][0]  # "hi" keeps the history that fits


def test_chat_survives_input_that_is_not_utf8(saved_folder):
    """Bytes that are not UTF-8 on a strict stdin: one error line, then the next lines are read as usual."""
    session = b"\xff\xfe not text\n" + b"word " * 2000 + b"\n/quit\n"
    run = subprocess.run(
        [sys.executable, "-m", "modeling_mmllm.cli", "chat", str(saved_folder), "--max-new-tokens", "2"],
        input=session,
        capture_output=True,
        timeout=300,
        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"},
    )
    out = run.stdout.decode()
    assert run.returncode == 0 and b"Traceback" not in run.stderr, run.stderr[-2000:]
    assert out.index("error: that line is not valid UTF-8 text") < out.index("error: this message is")
