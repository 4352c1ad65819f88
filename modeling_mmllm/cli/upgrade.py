"""`mmllm upgrade`: saved folders' code files rewritten with this version's hub set (weights untouched)."""

import argparse

NAME = "upgrade"
HELP = "rewrite saved folders' code with this version's (weights untouched)"
DESCRIPTION = (
    "Folders carry their model code; a folder saved by an older mmllm "
    "may not run on a newer transformers. This rewrites the code files of each folder "
    "with the current ones, atomically, and leaves weights, config and processor as "
    "they are."
)


def add_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("folders", nargs="+", help="model folders saved by mmllm")


def run(args: argparse.Namespace) -> None:
    """Rewrite saved folders' code files with this version's hub set (weights untouched)."""
    import transformers

    from ..export.saving import upgrade_folder

    for folder in args.folders:
        written = upgrade_folder(folder)
        print(
            f"upgraded {folder}: {len(written)} code files rewritten ({', '.join(written)}); weights, config and "
            f"processor untouched; it loads on transformers {transformers.__version__}"
        )
