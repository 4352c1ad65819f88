"""`mmllm convert`: a LLaVA, LLaVA-NeXT, BLIP-2, IDEFICS or original mPLUG-Owl2 checkpoint folder as an mmllm
folder."""

import argparse
from pathlib import Path

NAME = "convert"
HELP = "convert a LLaVA, LLaVA-NeXT, BLIP-2, IDEFICS or mPLUG-Owl2 checkpoint folder"
DESCRIPTION = None


def add_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("kind", choices=["llava", "llava-next", "blip2", "idefics", "mplug-owl2"])
    command.add_argument("source", help="checkpoint folder")
    command.add_argument("output", type=Path, help="folder to write (must not exist)")


def run(args: argparse.Namespace) -> None:
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
