"""`mmllm serve`: an OpenAI-compatible server (transformers' serving code) for one model folder or Hub id."""

import argparse

from .common import check_model_source, quantization_option

NAME = "serve"
HELP = "an OpenAI-compatible server (/v1/chat/completions with images, streaming)"
DESCRIPTION = (
    "Serve a model folder or Hub id with transformers' OpenAI-compatible server: /v1/models lists "
    "it under the id you give here, /v1/chat/completions takes text, image parts (data URLs or local file "
    "paths) and, for audio models, input_audio parts; stream=true streams. Bad requests get HTTP 400."
)


def add_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("model", help="model folder or Hub id")
    command.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    command.add_argument("--port", type=int, default=8000)
    quantization_option(command)


def run(args: argparse.Namespace) -> None:
    """An OpenAI-compatible server (transformers' serving code) for one model folder or Hub id."""
    from ..serving.quantization import quantization_config

    check_model_source(args.model)
    if args.quantization:
        quantization_config(args.quantization)  # torchao is there (checked before the model loads)
    from ..serving.openai_server import serve as run_server

    run_server(args.model, host=args.host, port=args.port, quantization=args.quantization)
