"""Writing model folders: atomically (a staging sibling folder, then renames), with their model card; the push
of a finished folder; `mmllm upgrade` (library side). The staging itself is the hub set's `staged_folder`, which
`save_pretrained` uses too."""

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..hub_upload import upload_folder_to_hub
from ..staged_folder import (
    commit_staging,
    discard_staging,
    link_or_copy,
    make_staging,
    remove_stale_staging,
    usual_modes,
)
from .hub_card import hub_set_files, write_model_card


@contextmanager
def atomic_folder(output: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; rename it to `output` only if the block succeeds.

    With `replace=True` an existing `output` stays in place until the new folder is complete, then the two are
    swapped by renames (an interruption, a kill included, leaves the old folder or the new one, never a mix or
    none). What killed saves of `output` left (staging folders `.<name>.mmllm-staging-*` of ended processes) is
    removed first. The folder gets `mkdir`'s usual mode and the files written in it `open()`'s, under the umask.
    """
    output = Path(output)
    target = Path(os.path.realpath(output))  # a symlinked folder: the folder it points to is replaced
    remove_stale_staging(target)
    if output.exists() and not replace:
        raise FileExistsError(f"{output} already exists: choose a new folder or delete it first.")
    staging = Path(make_staging(target))
    try:
        yield staging
        usual_modes(staging)
        commit_staging(staging, target)
    except BaseException:
        discard_staging(staging)
        raise


def save_model_folder(
    model, processor, output: str | Path, extra_files: dict[str, str] | None = None, replace: bool = False
) -> Path:
    """Save `model` and `processor` (`None`: a model without one) into `output` as one Hub-ready folder, with its
    model card; nothing half-written is left behind.

    A PEFT model saves its adapter only (small). `extra_files` (name -> text) are written first, so the model card
    can describe them (training history, metrics). `replace=True` swaps an existing `output` for the new folder
    once it is complete.
    """
    with atomic_folder(output, replace=replace) as staging:
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        model.save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)
        write_model_card(model, staging)
    return Path(output)


def push_folder(folder: str | Path, repo_id: str | None, private: bool = False) -> str:
    """Upload a Hub-ready folder (weights, code, processor, card) to `repo_id`, sub-folders included."""
    if not repo_id:
        raise ValueError("push_to_hub needs hub_model_id (the Hub repo to create or update).")
    return upload_folder_to_hub(folder, repo_id, private=private, commit_message="Upload mmllm model")


def upgrade_folder(folder: str | Path) -> list[str]:
    """Rewrite a saved folder's code files with this package's hub set, so it loads on the transformers releases
    this package supports; weights, config, processor and card stay as they are (the same files, hard-linked).

    The new folder is assembled beside the old one and swapped in by renames: an interruption leaves the old
    folder or the new one, never a mix. The kept files are hard links and keep their modes; the code files get the
    umask's usual mode (not the installed package's). Returns the names of the code files written.
    """
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json).")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != "mmllm":
        raise ValueError(
            f"{folder} holds a {model_type!r} model, not an mmllm one: `mmllm upgrade` only rewrites "
            "the code of mmllm folders (`mmllm convert` imports LLaVA, BLIP-2 and mPLUG-Owl2 folders)."
        )
    code = [Path(path) for path in hub_set_files()]
    with atomic_folder(folder, replace=True) as staging:
        for entry in folder.iterdir():  # the old code files (flat *.py) are replaced, everything else is kept
            if entry.suffix != ".py":
                link_or_copy(entry, staging / entry.name)  # no copy of the weights; the bytes stay the same
        for path in code:
            shutil.copy2(path, staging / path.name)  # its mode: the umask's (atomic_folder)
    return [path.name for path in code]


__all__ = ["atomic_folder", "push_folder", "save_model_folder", "upgrade_folder"]
