"""`mmllm push`: a Hub-ready folder uploaded to a Hub repo, with its card rendered for that repo."""

import argparse
from pathlib import Path

from .common import load_folder

NAME = "push"
HELP = "upload a model folder to a Hub repo, with its card"
DESCRIPTION = None


def add_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("folder", help="model folder")
    command.add_argument("repo_id", help="namespace/name on the Hub")
    command.add_argument("--private", action="store_true")


def run(args: argparse.Namespace) -> None:
    """Upload a Hub-ready folder to a Hub repo, with its card rendered for that repo."""
    from ..export.hub_card import write_model_card
    from ..export.saving import push_folder

    model, _ = load_folder(args.folder)
    write_model_card(model, args.folder, repo_id=args.repo_id)
    print(
        f"pushed {args.folder} to https://huggingface.co/{push_folder(Path(args.folder), args.repo_id, args.private)}"
    )
