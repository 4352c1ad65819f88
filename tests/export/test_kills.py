"""Kills leave nothing behind: a save SIGKILLed at any point leaves the old folder or the complete new one, and the
next save removes the staging folder the kill left (issue 22, point 3)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modeling_mmllm import MMLLMForConditionalGeneration, staged_folder
from modeling_mmllm.staged_folder import make_staging, remove_stale_staging, staging_name, staging_prefix

# A fork server: imports once and builds two tiny models (seeds 0 and 1); per request it forks a child that saves
# one of them and reports the child's pid, then its exit status (the test kills the child in between).
SERVER = r"""
import json, os, sys, tempfile
import torch
torch.set_num_threads(1)
from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration
from modeling_mmllm.saving import save_model_folder, upgrade_folder
models = {}
for seed in (0, 1):
    torch.manual_seed(seed)
    models[seed] = MMLLMForConditionalGeneration(MMLLMConfig.from_preset("llava-tiny")).eval()
with tempfile.TemporaryDirectory() as warm:  # the first save's lazy imports, done once for every child
    save_model_folder(models[0], None, os.path.join(warm, "model"))
print("@@ ready", flush=True)
while line := sys.stdin.readline():
    api, target, seed = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if api == "save_pretrained":
                models[seed].save_pretrained(target)
            elif api == "upgrade":
                upgrade_folder(target)
            else:
                save_model_folder(models[seed], None, target, replace=True)
            code = 0
        finally:
            os._exit(code)
    print("@@", pid, flush=True)
    print("@@", os.waitpid(pid, 0)[1], flush=True)
"""
EXTRAS = {"notes.txt": "kept", "processor/notes.txt": "kept too"}  # files of the folder that save_pretrained keeps
KILLS = 12  # killed saves per API


class Saver:
    """The fork server's client: `save(...)` runs one save in a fresh child, SIGKILLed after `kill_after` s."""

    def __init__(self, log: Path):
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        assert self._line() == "ready", log.read_text()[-3000:]

    def _line(self) -> str:
        """The server's next message (its lines start with "@@"; libraries print to stdout too)."""
        while True:
            line = self.process.stdout.readline()
            assert line, f"the save server ended: {self.log.name}"
            if line.startswith("@@ "):
                return line[3:].strip()

    def save(self, api: str, target: Path, seed: int, kill_after: float | None = None) -> tuple[int, float]:
        """`(wait status, seconds)` of one save."""
        self.process.stdin.write(json.dumps([api, str(target), seed]) + "\n")
        self.process.stdin.flush()
        pid, start = int(self._line()), time.monotonic()
        if kill_after is not None:
            time.sleep(kill_after)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # the save had finished
        return int(self._line()), time.monotonic() - start

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def saver(tmp_path_factory):
    saver = Saver(tmp_path_factory.mktemp("saver") / "server.log")
    yield saver
    saver.close()


def _files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def _state(target: Path, references: dict[int, dict[str, bytes]], extras: dict[str, str]) -> int | None:
    """Which complete save `target` holds (None: no folder); anything else, a partial folder, fails."""
    if not target.exists():
        return None
    files = _files(target)
    for seed, reference in references.items():
        if files == {**reference, **{name: text.encode() for name, text in extras.items()}}:
            return seed
    raise AssertionError(
        f"{target} is neither complete save (a mix, or config and code without weights): {sorted(files)}"
    )


def _leftovers(target: Path) -> list[str]:
    return sorted(path.name for path in target.parent.iterdir() if path.name != target.name)


@pytest.mark.parametrize("api", ["save_pretrained", "save_model_folder"])
def test_a_killed_save_leaves_the_old_folder_or_the_new_one(saver, tmp_path, api):
    """Saves are SIGKILLed at seeded random points of their measured duration, into a fresh folder and over a
    complete one: after each kill the folder is absent (fresh), the old save or the new one, loading as saved; the
    next save leaves no staging folder behind. save_pretrained keeps the folder's other files (a processor's)."""
    references, durations = {}, []
    for seed in (0, 1):
        status, seconds = saver.save(api, tmp_path / f"reference-{seed}" / "model", seed)
        assert status == 0, saver.log.name
        references[seed], durations = _files(tmp_path / f"reference-{seed}" / "model"), durations + [seconds]
    keeps = api == "save_pretrained"  # save_model_folder(replace=True) replaces the whole folder
    target = tmp_path / "runs" / "model"
    rng, state, left_behind = random.Random(22), None, 0
    for trial in range(KILLS):
        if trial % 3 == 0 and target.exists():  # a fresh target, then saves over a complete one
            shutil.rmtree(target)
            state = None
        extras = EXTRAS if keeps and state is not None else {}
        seed = 1 if state == 0 else 0
        status, _ = saver.save(api, target, seed, kill_after=rng.uniform(0.0, 1.0) * min(durations))
        assert _state(target, references, extras) in (state, seed), trial
        left_behind += bool(_leftovers(target))
        assert saver.save(api, target, seed)[0] == 0  # the next save: complete, and it cleans up
        assert _leftovers(target) == [], trial
        assert _state(target, references, extras) == seed
        state = seed
        if keeps:
            for name, text in EXTRAS.items():
                (target / name).parent.mkdir(exist_ok=True)
                (target / name).write_text(text)
    assert left_behind, "no kill fell inside a save: the test did not exercise what it checks"
    MMLLMForConditionalGeneration.from_pretrained(target)  # the final folder loads


def test_a_killed_upgrade_leaves_the_old_code_or_the_new(saver, tmp_path):
    """`mmllm upgrade` SIGKILLed at seeded random points: the folder holds its old code files or the new ones, never
    a mix, with its weights; the next upgrade completes and leaves no staging folder."""
    assert saver.save("save_model_folder", tmp_path / "saved" / "model", 0)[0] == 0
    saved = _files(tmp_path / "saved" / "model")
    old = {name: data + b"# an older mmllm's\n" if name.endswith(".py") else data for name, data in saved.items()}
    target = tmp_path / "runs" / "model"

    def reset() -> None:
        shutil.rmtree(target, ignore_errors=True)
        for name, data in old.items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(data)

    reset()
    status, duration = saver.save("upgrade", target, 0)
    new = _files(target)  # every hub-set file, the processor's included
    assert status == 0 and all(new[name] == data for name, data in saved.items())
    rng, states = random.Random(21), set()
    for trial in range(KILLS):
        reset()
        saver.save("upgrade", target, 0, kill_after=rng.uniform(0.0, 1.0) * duration)
        states.add("new" if _files(target) == new else "old")
        assert _files(target) in (old, new), trial
        assert saver.save("upgrade", target, 0)[0] == 0 and _files(target) == new and _leftovers(target) == []
    assert "old" in states, "no kill fell before the swap: the test did not exercise what it checks"


def _ended_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _staging_of(target: Path, pid: int, suffix: str = "", text: str = "new") -> Path:
    """A staging folder for `target` as process `pid` of this machine names it, holding a config."""
    path = target.parent / f"{staging_name(target, pid)}{suffix}"
    path.mkdir()
    (path / "config.json").write_text(text)
    return path


def test_only_stale_staging_folders_of_the_target_are_removed(tmp_path):
    """The next save removes staging folders of `target` whose process has ended, and nothing else: not those of a
    live save (another process, or this one), of another folder, or of another machine."""
    target = tmp_path / "model"
    target.mkdir()
    stale = _staging_of(target, _ended_pid())
    live = _staging_of(target, os.getppid())
    own = _staging_of(target, os.getpid())
    other_folder = _staging_of(tmp_path / "model-2", _ended_pid())
    other_host = tmp_path / f"{staging_prefix(target)}elsewhere-{_ended_pid()}-0123abcd"
    other_host.mkdir()
    unrelated = tmp_path / ".model-x1y2z3"  # a user's hidden folder that merely looks similar
    unrelated.mkdir()
    remove_stale_staging(target)
    assert not stale.exists()
    assert live.exists() and own.exists() and other_folder.exists() and other_host.exists() and unrelated.exists()


def test_a_kill_between_the_two_renames_is_undone_by_the_next_save(tmp_path, monkeypatch):
    """Without an atomic exchange (not Linux) a swap is two renames; a kill between them leaves no folder at the
    target: the next save puts the old folder back before anything else, so it is never lost."""
    target = tmp_path / "model"
    pid = _ended_pid()
    new = _staging_of(target, pid)
    previous = new.with_name(f"{new.name}{staged_folder.PREVIOUS_SUFFIX}")
    previous.mkdir()
    (previous / "config.json").write_text("old")
    remove_stale_staging(target)
    assert (target / "config.json").read_text() == "old"
    assert _leftovers(target) == []
    monkeypatch.setattr(staged_folder, "_exchange", lambda first, second: False)  # the two-rename path works too
    staging = Path(make_staging(target))
    (staging / "config.json").write_text("newer")
    staged_folder.commit_staging(staging, target)
    assert (target / "config.json").read_text() == "newer" and _leftovers(target) == []
