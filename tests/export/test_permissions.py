"""Saved folders get the umask's usual modes, as `mkdir` and `open()` give them, so other users of a shared machine
or a mounted volume can read them (issue 22, point 4): not `mkdtemp`'s 0700 folder nor safetensors' 0600 weights."""

import os
import stat
from pathlib import Path

import pytest

from modeling_mmllm.saving import save_model_folder, upgrade_folder


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _modes(folder: Path) -> dict[str, int]:
    return {path.relative_to(folder).as_posix(): _mode(path) for path in folder.rglob("*") if path.is_file()}


@pytest.fixture
def umask():
    """Set the process umask for one test (`umask(0o077)`), putting the previous one back afterwards."""
    previous = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(previous)


@pytest.mark.parametrize(
    "mask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)], ids=["umask-022", "umask-077"]
)
def test_saved_folders_have_the_umask_modes(tiny_model, processor, tmp_path, umask, mask, folder_mode, file_mode):
    umask(mask)
    pretrained = tmp_path / "pretrained"
    tiny_model.save_pretrained(pretrained)
    complete = save_model_folder(tiny_model, processor, tmp_path / "complete")
    for folder in (pretrained, complete):
        assert _mode(folder) == folder_mode, folder
        modes = _modes(folder)
        assert "model.safetensors" in modes
        assert modes == dict.fromkeys(modes, file_mode), folder


def test_upgrade_keeps_the_modes_of_the_files_it_keeps(tiny_model, processor, tmp_path, umask):
    """`mmllm upgrade` hard-links the kept files (their modes are theirs: a user's chmod survives) and writes the
    code files with the umask's mode; the folder keeps its own mode."""
    folder = save_model_folder(tiny_model, processor, tmp_path / "model")
    os.chmod(folder / "model.safetensors", 0o640)
    os.chmod(folder, 0o750)
    weights = (folder / "model.safetensors").stat()
    upgrade_folder(folder)
    assert (folder / "model.safetensors").stat().st_ino == weights.st_ino
    assert _mode(folder / "model.safetensors") == 0o640 and _mode(folder) == 0o750
    assert _mode(folder / "modeling_mmllm.py") == 0o644
