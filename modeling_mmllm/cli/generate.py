"""`mmllm generate`: one prompt (optionally about an image, a video and an audio file) answered in text, or an image
drawn (`--save-image`)."""

import argparse
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from .common import load_folder, open_image, quantization_option

NAME = "generate"
HELP = "answer one prompt (optionally about an image, a video and an audio file), or draw an image (--save-image)"
DESCRIPTION = None


def add_arguments(command: argparse.ArgumentParser) -> None:
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
    quantization_option(command)


def run(args: argparse.Namespace) -> None:
    """One prompt (optionally about an image, a video file and an audio file): a text answer, or with `--save-image`
    an image the model generates (models with an output projector and a modality generator)."""
    images = [open_image(args.image)] if args.image else []  # check the inputs before loading the model
    videos, audio = _check_file(args.video, "video"), _check_file(args.audio, "audio")
    target = _image_target(args.save_image)
    model, processor = load_folder(args.model, args.quantization)
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
