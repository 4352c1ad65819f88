"""Write a model folder atomically: save into a temporary sibling folder, then rename (library side)."""

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(output: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; rename it to `output` only if the block succeeds."""
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"{output} already exists: choose a new folder or delete it first.")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        yield staging
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_model_folder(model, processor, output: str | Path, extra_files: dict[str, str] | None = None) -> Path:
    """Save `model` and `processor` into `output` as one Hub-ready folder; nothing half-written is left behind.

    A PEFT model saves its adapter only (small). `extra_files` (name -> text) are written first, so the model card
    that `save_pretrained` renders can describe them (training history, metrics).
    """
    with atomic_folder(output) as staging:
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        write_adapter_card(model, staging)
    return Path(output)


def write_adapter_card(model, folder: Path) -> None:
    """Our models render their card in `save_pretrained`; a PEFT adapter over one gets it here."""
    from .hub_card import write_model_card

    if hasattr(model, "get_base_model"):
        write_model_card(model, folder)


__all__ = ["atomic_folder", "save_model_folder", "write_adapter_card"]
