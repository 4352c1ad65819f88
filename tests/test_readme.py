"""Every command and code block of the README runs, as written, so the README cannot rot.

Commands run in one working folder where `./run quickstart` already ran (`runs/quickstart`). Hub ids and
`path/to/...` folders resolve to tiny stand-ins saved under the same relative paths (transformers takes an existing
local folder before the Hub; the Hub is offline here). GPU-only commands get CPU arguments appended (accelerate:
`--cpu`, so its launcher, the config file and our CLI run, with CPU processes in place of GPUs); `mmllm push` runs
with the upload intercepted.
"""

import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    Blip2Config,
    Blip2ForConditionalGeneration,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    IdeficsForVisionText2Text,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    SiglipImageProcessorPil,
    SiglipVisionModel,
)

from helpers import (
    ARTIFACTS,
    QUICKSTART_THREADS,
    ROOT,
    ask_in_browser,
    free_port,
    save_tiny_stable_diffusion,
    start_service,
    stop_service,
    tiny_idefics_config,
    tiny_text_config,
    tiny_vision_config,
)
from modeling_mmllm.builders.presets import offline_tokenizer
from modeling_mmllm.cli import main
from modeling_mmllm.data.synthetic import Sound, make_dataset, synthesize

README = (ROOT / "README.md").read_text()
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
}
CPU_RECIPE = (
    "--model owl2-tiny --data.synthetic joint --data.n 16 --data.image_size 32 --max_steps 2 "
    "--per_device_train_batch_size 2 --bf16 false --activation_checkpointing false "
    "--dataloader_num_workers 0 --report_to none"
)

# The quickstart's chain: the README's figures of the quickstart model and of the stages trained from it (DPO)
# were measured with its threads.
pytestmark = pytest.mark.threads(QUICKSTART_THREADS)
soundfile = pytest.importorskip("soundfile", reason="audio files need mmllm[audio] (soundfile)")
ACCELERATE_CPU = "accelerate launch --cpu --num_processes 2 --mixed_precision no"
# Benchmarks once, on one thread: they check that the script runs and prints its ratios; pytest-xdist runs another
# test file on the other core meanwhile (the README's figures come from --repeats 3 on both cores).
BENCHMARK_ARGS = "--repeats 1 --threads 1"

# How each README command is exercised: extra arguments appended for a CPU run, and what it must leave behind.
COMMANDS = {
    "./run quickstart": None,  # the `quickstart_run` fixture (tests/test_quickstart.py checks it)
    "./run tests": None,  # what .ci/run runs (checked below)
    # test_quickstart_on_smollm2_keeps_its_language runs it with --fast on the `quickstart_run` stages
    "mmllm quickstart --llm smollm2": None,
    # Training commands run a few steps here (the last --max_steps wins); learning is tested in test_training_runs.
    "mmllm train quickstart-stage2 --max_steps 200 --output_dir runs/try --model runs/quickstart/stage1/model": (
        "--max_steps 20",
        "runs/try/model/model.safetensors",
    ),
    "mmllm train quickstart-stage2 --help": ("", None),
    "mmllm train llava-stage1-projector": (CPU_RECIPE + " --output_dir runs/llava-stage1", "runs/llava-stage1/model"),
    "accelerate launch --config_file training_recipes/accelerate/multi_gpu.yaml -m modeling_mmllm.cli train "
    "owl2-stage2-instruct": (CPU_RECIPE + " --output_dir runs/multi-gpu", "runs/multi-gpu/model"),
    "accelerate launch --config_file training_recipes/accelerate/deepspeed_zero3.yaml -m modeling_mmllm.cli train "
    "owl2-stage1-pretrain": (CPU_RECIPE + " --output_dir runs/zero3", "runs/zero3/model"),
    "accelerate launch --config_file training_recipes/accelerate/fsdp.yaml -m modeling_mmllm.cli train llava-lora": (
        CPU_RECIPE + " --output_dir runs/fsdp",
        "runs/fsdp/model/adapter_model.safetensors",
    ),
    "torchrun --nproc_per_node 2 -m modeling_mmllm.cli train quickstart-stage2 --output_dir runs/ddp --max_steps 100": (
        "--max_steps 10",
        "runs/ddp/model/model.safetensors",
    ),
    "mmllm train audio-tiny-sft": ("--max_steps 20 --eval.n 8 --data.n 64", "runs/audio-tiny/model/model.safetensors"),
    "mmllm train quickstart-any2any": (
        "--max_steps 4 --data.n 32 --generator_pretraining.steps 10 --generator_pretraining.n 64 --eval.n 8",
        "runs/quickstart/any2any/model/model.safetensors",
    ),
    'mmllm generate runs/audio-tiny/model --audio beeps.wav --prompt "How many beeps are there?"': ("", None),
    'mmllm generate runs/quickstart/any2any/model --prompt "Draw one large red circle on the left." '
    "--save-image drawn.png": ("", "drawn.png"),
    "trl sft --model_name_or_path runs/quickstart/stage2/model --trust_remote_code --dataset_name data_dir "
    "--assistant_only_loss True --output_dir runs/trl-sft --use_cpu True --bf16 False": (
        "--max_steps 2 --per_device_train_batch_size 2 --gradient_checkpointing False --report_to none",
        "runs/trl-sft/model.safetensors",
    ),
    "mmllm build --preset owl2-tiny runs/owl2": ("", "runs/owl2/model.safetensors"),
    "mmllm build --vision google/siglip-base-patch16-224 --text Qwen/Qwen2.5-0.5B-Instruct --projector abstractor "
    "--modality-adaptive runs/composed": ("", "runs/composed/model.safetensors"),
    "mmllm generate runs/quickstart/stage2/model --image runs/quickstart/new_image.png --prompt "
    '"What colour are the shapes?"': ("", None),
    "mmllm chat runs/quickstart/stage2/model": ("", None),
    "mmllm eval runs/quickstart/stage2/model --synthetic vqa --n 300": ("", None),
    # lmms-eval on the offline benchmarks; runs/owl2 is built by `mmllm build --preset owl2-tiny runs/owl2` above
    "mmllm eval runs/quickstart/stage2/model --tasks mmllm_offline --output-path runs/eval/quickstart": ("", None),
    "mmllm eval runs/owl2 --tasks mmllm_offline --output-path runs/eval/untrained": ("", None),
    "python -m lmms_eval --model mmllm --model_args pretrained=runs/quickstart/stage2/model --tasks "
    "mmllm_pope,mmllm_scienceqa_img --include_path evaluation_tasks --output_path runs/eval/lmms": (
        "",
        "runs/eval/lmms",
    ),
    "python -m lmms_eval --model huggingface --model_args pretrained=runs/quickstart/stage2/model,"
    "trust_remote_code=True,device=cpu,device_map=cpu --tasks mmllm_vqav2 --include_path evaluation_tasks "
    "--output_path runs/eval/hf": ("", "runs/eval/hf"),
    "mmllm convert llava path/to/llava-1.5-7b-hf runs/llava-1.5-7b": ("", "runs/llava-1.5-7b/model.safetensors"),
    "mmllm convert blip2 path/to/blip2-opt-2.7b runs/blip2-opt-2.7b": ("", "runs/blip2-opt-2.7b/model.safetensors"),
    "mmllm convert mplug-owl2 path/to/mplug-owl2-llama2-7b runs/mplug-owl2-llama2-7b": (
        "",
        "runs/mplug-owl2-llama2-7b/model.safetensors",
    ),
    "mmllm push runs/quickstart/stage2/model me/owl2-shapes --private": ("", None),
    "mmllm upgrade runs/old-model": ("", "runs/old-model/modeling_mmllm.py"),  # a folder saved by mmllm 0.1.0
    "python benchmarks/vs_llava.py --repeats 3": (BENCHMARK_ARGS, None),  # the last --repeats wins
    "python benchmarks/projector_ttft.py --repeats 3": (BENCHMARK_ARGS, None),
    "python benchmarks/modality_adaptive_cost.py --repeats 3": (BENCHMARK_ARGS, None),
    "python benchmarks/anyres_cost.py --repeats 3": (BENCHMARK_ARGS, None),
    "mmllm train anyres-detail": ("--max_steps 4 --data.n 32 --eval.n 8", "runs/anyres-detail/model/model.safetensors"),
    "mmllm train anyres-detail --model llava-tiny --output_dir runs/anyres-single": (
        "--max_steps 4 --data.n 32 --eval.n 8",
        "runs/anyres-single/model/model.safetensors",
    ),
    "mmllm convert llava-next path/to/llava-v1.6-vicuna-7b-hf runs/llava-next-7b": (
        "",
        "runs/llava-next-7b/model.safetensors",
    ),
    "mmllm convert idefics path/to/idefics-9b runs/idefics-9b": ("", "runs/idefics-9b/model.safetensors"),
    "mmllm train quickstart-stage0-text --model flamingo-tiny --output_dir runs/flamingo-tiny/stage0": (
        "--max_steps 4",
        "runs/flamingo-tiny/stage0/model/model.safetensors",
    ),
    "mmllm train flamingo-tiny-sft": ("--max_steps 4 --data.n 32 --eval.n 8", "runs/flamingo-tiny/sft/model"),
    # servers: `readme_server` starts this one for the README's client block; the browser test starts the demo
    "mmllm serve runs/quickstart/stage2/model --port 8000": None,
    "mmllm demo runs/quickstart/stage2/model": None,
    "mmllm generate runs/quickstart/stage2/model --image runs/quickstart/new_image.png --prompt "
    '"What colour are the shapes?" --quantization int8': ("", None),
    "python benchmarks/quantization.py --repeats 3": (BENCHMARK_ARGS, None),
    "python benchmarks/throughput.py --repeats 3": (BENCHMARK_ARGS, None),
    "python benchmarks/packing.py --repeats 3": (BENCHMARK_ARGS, None),
    "mmllm train quickstart-stage2 --packing true --max_length 512 --output_dir runs/packed --model "
    "runs/quickstart/stage1/model": ("--max_steps 4 --data.n 64 --eval.n 8", "runs/packed/model/model.safetensors"),
    "python benchmarks/modality_collaboration.py --json runs/collaboration.json": (
        "--steps 2 --heldout 8 --prompts 4 --passages 2 --variants llava cogvlm owl2+text",  # each code path once
        "runs/collaboration.json",
    ),
    "python benchmarks/vs_llava.py --profile": ("--threads 1", None),
    # the alignment stage: the quickstart-dpo figures are checked (below); the GPU recipe on a tiny model
    "mmllm train quickstart-dpo --model runs/quickstart/stage2/model --output_dir runs/quickstart/dpo": (
        "",
        "runs/quickstart/dpo/model/model.safetensors",
    ),
    # reinforcement learning: the quickstart-grpo figures are checked (below); the GPU recipe on a tiny model (an
    # untrained model's answers all miss, so only its code path runs), LoRA and the merged folder
    "mmllm train quickstart-grpo --model runs/quickstart/stage2/model --output_dir runs/quickstart/grpo": (
        "",
        "runs/quickstart/grpo/model/model.safetensors",
    ),
    "mmllm train owl2-grpo-lora": (
        "--model owl2-tiny --data.synthetic count-compare --data.split train --data.n 8 --data.image_size 32 "
        "--max_steps 2 --per_device_train_batch_size 8 --num_generations 4 --max_completion_length 4 --bf16 false "
        "--activation_checkpointing false --dataloader_num_workers 0 --report_to none --output_dir runs/owl2-grpo-lora",
        "runs/owl2-grpo-lora/merged/model.safetensors",
    ),
    "mmllm train owl2-dpo-lora": (
        "--model owl2-tiny --data.synthetic swatch-preference --data.n 16 --data.image_size 32 --eval null "
        "--max_steps 2 --per_device_train_batch_size 2 --bf16 false --activation_checkpointing false "
        "--dataloader_num_workers 0 --report_to none --output_dir runs/owl2-dpo-lora",
        "runs/owl2-dpo-lora/merged/model.safetensors",
    ),
}


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.MULTILINE | re.DOTALL)


def readme_commands() -> list[str]:
    """Each shell command of the README, continuation lines joined, comments dropped, spaces normalised."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            command = " ".join(line.split(" #")[0].split())
            if command:
                commands.append(command)
    return commands


def test_every_readme_command_is_exercised_here():
    assert sorted(readme_commands()) == sorted(COMMANDS), "a README command was added or changed: update COMMANDS"
    assert "./run tests" in (ROOT / ".ci" / "run").read_text()


def _save_plain_lm(kind: str, folder: Path) -> None:
    tokenizer = offline_tokenizer()
    AutoModelForCausalLM.from_config(tiny_text_config(kind, vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_stand_ins(root: Path) -> None:
    """Tiny models under the README's Hub ids and `path/to/...` folders, and the README's data folder."""
    torch.manual_seed(0)
    CLIPVisionModel(tiny_vision_config("clip")).save_pretrained(root / "openai/clip-vit-large-patch14-336")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "openai/clip-vit-large-patch14-336"
    )
    SiglipVisionModel(tiny_vision_config("siglip")).save_pretrained(root / "google/siglip-base-patch16-224")
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(root / "google/siglip-base-patch16-224")
    _save_plain_lm("llama", root / "lmsys/vicuna-7b-v1.5")
    _save_plain_lm("qwen2", root / "Qwen/Qwen2.5-0.5B-Instruct")
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=tiny_vision_config("clip").to_dict(),
            text_config=tiny_text_config("llama").to_dict(),
            image_token_id=offline_tokenizer().image_token_id,
            image_seq_length=16,
        )
    )
    llava.save_pretrained(root / "path/to/llava-1.5-7b-hf")
    LlavaNextForConditionalGeneration(
        LlavaNextConfig(
            vision_config=tiny_vision_config("clip").to_dict(),
            text_config=tiny_text_config("llama").to_dict(),
            image_token_id=offline_tokenizer().image_token_id,
            image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
        )
    ).save_pretrained(root / "path/to/llava-v1.6-vicuna-7b-hf")
    IdeficsForVisionText2Text(tiny_idefics_config()).save_pretrained(root / "path/to/idefics-9b")
    blip2 = Blip2ForConditionalGeneration(
        Blip2Config(
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
            ),
            qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
            text_config=dict(
                model_type="opt",
                hidden_size=64,
                ffn_dim=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                word_embed_proj_dim=64,
                vocab_size=512,
                max_position_embeddings=128,
                pad_token_id=0,
            ),
            num_query_tokens=8,
            image_token_id=5,
        )
    )
    blip2.save_pretrained(root / "path/to/blip2-opt-2.7b")
    shutil.copytree(ROOT / "tests/fixtures/mplug-owl2-tiny", root / "path/to/mplug-owl2-llama2-7b")
    shutil.copytree(ROOT / "tests/fixtures/owl2-tiny-v0.1.0", root / "runs/old-model")
    soundfile.write(root / "beeps.wav", synthesize(Sound(count=2, pitch="high"), np.random.default_rng(0)), 16000)
    (root / "data_dir").mkdir()
    make_dataset("joint", 16).remove_columns(["kind", "answer"]).to_parquet(root / "data_dir" / "train.parquet")
    (root / "training_recipes").symlink_to(ROOT / "training_recipes")
    (root / "evaluation_tasks").symlink_to(ROOT / "evaluation_tasks")
    (root / "stable-diffusion-v1-5").mkdir()
    save_tiny_stable_diffusion(root / "sd-stand-in").rename(root / "stable-diffusion-v1-5/stable-diffusion-v1-5")


@pytest.fixture(scope="module")
def workdir(quickstart_run):
    assert quickstart_run["returncode"] == 0, quickstart_run["stderr"][-3000:]
    root = quickstart_run["workdir"]
    if not (root / "data_dir").exists():
        save_stand_ins(root)
    return root


def uses_the_quickstart(command: str) -> bool:
    """Whether a README command reads the quickstart's folder: its arguments or its recipe name `runs/quickstart`, or
    it is the collaboration benchmark (whose vision side comes from there). The others run in
    tests/test_readme_standalone.py, in a folder of their own, so pytest-xdist runs them beside this file's chain."""
    extra, _ = COMMANDS[command]
    argv = shlex.split(command) + shlex.split(extra)
    recipe = ROOT / "training_recipes" / f"{argv[argv.index('train') + 1]}.yaml" if "train" in argv else None
    in_recipe = recipe is not None and recipe.is_file() and "--model" not in argv
    in_recipe = in_recipe and "runs/quickstart" in recipe.read_text()
    return "runs/quickstart" in " ".join(argv) or in_recipe or "modality_collaboration" in command


@pytest.mark.slow
@pytest.mark.parametrize(
    "command", [command for command, how in COMMANDS.items() if how and uses_the_quickstart(command)]
)
def test_readme_command_runs(command, workdir, monkeypatch, capsys):
    run_readme_command(command, workdir, monkeypatch, capsys)


def run_readme_command(command: str, workdir: Path, monkeypatch, capsys) -> None:
    """Runs one README command in `workdir` with its CPU arguments and checks what it prints and leaves behind."""
    extra, leaves = COMMANDS[command]
    argv = shlex.split(command) + shlex.split(extra)
    if argv[0] == "mmllm":  # in this process, so the Hub upload can be intercepted
        uploads = []
        monkeypatch.setattr(
            "huggingface_hub.HfApi.create_repo", lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id)
        )
        monkeypatch.setattr(
            "huggingface_hub.HfApi.upload_folder", lambda self, repo_id, folder_path, **kw: uploads.append(repo_id)
        )
        monkeypatch.setattr(
            "sys.stdin", io.StringIO("/image runs/quickstart/new_image.png\nWhat colour are the shapes?\n/quit\n")
        )
        monkeypatch.chdir(workdir)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        code, output = main(argv[1:]), capsys.readouterr()
        assert code == 0, output.err[-3000:]
        if argv[1] == "push":
            assert uploads == ["me/owl2-shapes"]
        if "--save-image" in argv:  # a drawing, not an answer: a real RGB PNG at the generator's size
            with Image.open(workdir / argv[argv.index("--save-image") + 1]) as drawn:
                assert drawn.mode == "RGB" and min(drawn.size) >= 16
            assert "image saved to" in output.out
        elif argv[1] in ("generate", "chat") and "runs/quickstart" in command:  # about the quickstart's new image
            assert "red" in output.out
        if argv[1] == "eval" and "--tasks" in argv:  # the README's figures, within a margin
            _check_benchmark_figures(argv[2], output.out)
        elif argv[1] == "eval":
            assert re.search(r"^overall\s+\d+\.\d%$", output.out, re.MULTILINE)
        if argv[1:3] == ["train", "quickstart-any2any"]:  # the held-out evaluation is printed, not only saved
            assert re.search(r"^image/shape\s+\d+\.\d%$", output.out, re.MULTILINE), output.out[-2000:]
        if argv[1:3] == ["train", "quickstart-dpo"]:
            _check_dpo_figures(output.out)
        if argv[1:3] == ["train", "quickstart-grpo"]:
            _check_grpo_figures(output.out)
    else:
        if argv[:2] == ["accelerate", "launch"]:
            argv = shlex.split(ACCELERATE_CPU) + argv[2:]
        if argv[0] == "python":  # the README's scripts from the checkout; modules (-m) as they are
            argv = [sys.executable, *(argv[1:] if argv[1] == "-m" else [str(ROOT / argv[1]), *argv[2:]])]
        run = subprocess.run(argv, cwd=workdir, env=ENV, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
        if argv[1:3] == ["-m", "lmms_eval"]:  # lmms-eval exits 0 on errors: its results JSON must be there
            output = workdir / argv[argv.index("--output_path") + 1]
            assert list(output.rglob("*_results.json")), (run.stdout + run.stderr)[-4000:]
        if argv[0] == "torchrun":  # every rank returns with the folder whole; the main process reports, once
            assert run.stdout.count("model folder: ") == 1, run.stdout[-2000:]
        if argv[1].startswith(str(ROOT / "benchmarks")):  # a table of ratios measured side by side
            assert re.search(r"\d\.\d{3}|\d\.\d+x", run.stdout), run.stdout
    if leaves:
        assert (workdir / leaves).exists(), f"{command} did not write {leaves}"


def _check_dpo_figures(printed: str) -> None:
    """The alignment stage's held-out figures, as the README shows them: the preference rate rises to 0.9 or more
    and no kind of answer loses more than one answer (5 points) of exact match; overall does not fall."""
    figures = {
        name: (float(before) / 100, float(after) / 100)
        for name, before, after in re.findall(r"^(\S+)\s+(\d+\.\d)% -> (\d+\.\d)%$", printed, re.MULTILINE)
    }
    before, after = figures["preference_rate"]
    assert after >= 0.9 and after > before, printed
    accuracies = {name: values for name, values in figures.items() if name.startswith("accuracy/")}
    # a kind has about 20 of the 200 held-out pairs: one answer is 5 points
    assert len(accuracies) >= 6 and all(after >= before - 0.05 for before, after in accuracies.values()), printed
    assert accuracies["accuracy/overall"][1] >= accuracies["accuracy/overall"][0], printed


def _check_grpo_figures(printed: str) -> None:
    """The reinforcement-learning stage's held-out figures, as the README shows them (37.5% -> 94.5%): GRPO, with
    nothing but the exact-match reward, lifts held-out exact match on a task no stage trained by 25 points or more,
    and the mean reward with it."""
    (before, after), *_ = re.findall(r"^accuracy/overall\s+(\d+\.\d)% -> (\d+\.\d)%$", printed, re.MULTILINE)
    assert float(after) >= 65.0 and float(after) >= float(before) + 25.0, printed
    rewards = re.search(r"^reward/mean\s+(\d\.\d{3}) -> (\d\.\d{3})$", printed, re.MULTILINE)
    assert rewards and float(rewards[2]) > float(rewards[1]), printed


def _check_benchmark_figures(model: str, printed: str) -> None:
    """The quickstart model's and the untrained model's scores on the offline benchmarks, as the README shows them."""
    scores = {
        (task, metric): float(value)
        for task, metric, value in re.findall(r"^(mmllm_\w+)\s+(\w+)\s+(-?\d+\.\d+)$", printed, re.MULTILINE)
    }
    vqa, choice = scores[("mmllm_vqav2", "exact_match")], scores[("mmllm_scienceqa_img", "acc")]
    pope, mme = scores[("mmllm_pope", "pope_accuracy")], scores[("mmllm_mme", "mme_perception_score")]
    if "quickstart" in model:  # open answers and choices right; yes/no answered in the format, near chance
        assert vqa >= 0.9 and choice >= 0.9 and pope >= 0.3 and mme >= 150, printed
    else:  # random weights: no open answer right, chance or below elsewhere
        assert vqa <= 0.1 and choice <= 0.6 and pope <= 0.6 and mme <= 450, printed


def _readme_server_command(name: str, port: int) -> list[str]:
    """The README's `mmllm NAME ...` command, run from this checkout's environment on `port`."""
    command = next(command for command in readme_commands() if command.startswith(f"mmllm {name} "))
    argv = shlex.split(command.replace("--port 8000", ""))
    return [sys.executable, "-m", "modeling_mmllm.cli", *argv[1:], "--port", str(port)]


@pytest.fixture(scope="module")
def readme_server(workdir):
    """The README's `mmllm serve` command, running (on a free port) while the README's client block runs."""
    port = free_port()
    process = start_service(_readme_server_command("serve", port), f"http://127.0.0.1:{port}/v1/models", workdir)
    yield port
    stop_service(process)


@pytest.mark.slow
def test_readme_python_blocks_run_in_order(workdir, readme_server):
    """All Python blocks, in README order, in one fresh interpreter (as a reader pasting them would)."""
    script = "\n".join(code_blocks("python")).replace("127.0.0.1:8000", f"127.0.0.1:{readme_server}")
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=workdir, env=ENV, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.split()[:1] == ["red"]  # the quickstart model's answer about the quickstart's new image
    assert re.search(r"^served: red$", run.stdout, re.MULTILINE), run.stdout  # the same answer, from the server
    assert "The capital of France is Paris." in run.stdout  # SmolLM2's own answer, composed with a vision encoder
    assert (workdir / "my-model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_readme_demo_answers_in_a_browser_as_generate_does(workdir, monkeypatch, capsys):
    """The README's `mmllm demo` in headless Chromium: attach the quickstart's new image, ask, read the answer; it
    is `mmllm generate`'s. The screenshot is the README's picture (test-artifacts/demo-quickstart.png)."""
    question = "What colour are the shapes?"
    port = free_port()
    process = start_service(_readme_server_command("demo", port), f"http://127.0.0.1:{port}/", workdir)
    try:
        shown = ask_in_browser(
            f"http://127.0.0.1:{port}/",
            [workdir / "runs/quickstart/new_image.png"],
            question,
            ARTIFACTS / "demo-quickstart.png",
        )
    finally:
        stop_service(process)
    monkeypatch.chdir(workdir)
    image = "runs/quickstart/new_image.png"
    assert main(["generate", "runs/quickstart/stage2/model", "--image", image, "--prompt", question]) == 0
    assert shown.strip() == capsys.readouterr().out.strip() == "red"
