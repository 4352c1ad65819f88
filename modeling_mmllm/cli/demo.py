"""`mmllm demo`: a Gradio chat app for one model folder, in the browser."""

import argparse

from .common import load_folder, quantization_option

NAME = "demo"
HELP = "a Gradio chat app in the browser (images, audio, streaming)"
DESCRIPTION = None


def add_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("model", help="model folder")
    command.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    command.add_argument("--port", type=int, default=7860)
    command.add_argument("--share", action="store_true", help="also open a public gradio.live link (72 hours)")
    quantization_option(command)


def run(args: argparse.Namespace) -> None:
    """A Gradio chat app for one model folder (in the browser; `--share` gives a public link)."""
    from ..serving.gradio_demo import launch_demo

    model, processor = load_folder(args.model, args.quantization)
    launch_demo(model, processor, title=args.model, host=args.host, port=args.port, share=args.share)
