"""Writing a folder so that a kill at any point leaves the old folder or the complete new one (hub set: stdlib only).

The new contents are written into a staging sibling named `.<name>.mmllm-staging-<host>-<pid>-<token>`, then
swapped in by renames. A process killed mid-save leaves only that staging folder; the next save for the same
target removes it (only folders with that exact prefix whose creating process is gone, so two concurrent saves
never delete each other's). Files the save writes get the modes `open()` gives under the umask (safetensors writes
0600, `mkdtemp` makes 0700 folders); files kept from the old folder are hard links and keep theirs.
"""

import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
import stat
import sys

STAGING_MARK = ".mmllm-staging-"
PREVIOUS_SUFFIX = "-previous"  # the old folder, between the two renames where an atomic exchange is unavailable
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
# Weight files one save replaces as a set (transformers' single file, shards and their index).
_WEIGHTS = re.compile(r"(model|adapter_model)((-\d{5}-of-\d{5})?\.safetensors|\.safetensors\.index\.json)")


def staging_prefix(target: str | os.PathLike) -> str:
    """The name prefix of the staging folders for `target` (in its parent folder)."""
    return f".{os.path.basename(os.path.abspath(target))}{STAGING_MARK}"


def is_own_staging(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a staging folder this process made: writing into it directly is already atomic."""
    owner = _owner(os.path.basename(os.path.abspath(folder)))
    return owner == (_HOST, os.getpid())


def _owner(name: str, prefix: str | None = None) -> tuple[str, int] | None:
    """`(host, pid)` of the process that made the staging folder `name` (None: not a staging folder)."""
    head = re.escape(prefix) if prefix else r"\..+" + re.escape(STAGING_MARK)
    match = re.fullmatch(rf"{head}(.+)-(\d+)-[0-9a-f]{{8}}(?:{PREVIOUS_SUFFIX})?", name)
    return (match[1], int(match[2])) if match else None


def _process_is_gone(host: str, pid: int) -> bool:
    """Whether the process that made a staging folder has ended: only provable for a process of this machine."""
    if host != _HOST or os.name != "posix":
        return False  # another machine's; on Windows `os.kill(pid, 0)` would send CTRL_C_EVENT, not probe
    if pid == os.getpid():
        return False  # this process (another thread may be saving)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def remove_stale_staging(target: str | os.PathLike) -> None:
    """Remove what killed saves of `target` left: its staging folders whose process is gone. Where a kill fell
    between the two renames of a swap (no folder at `target`), the old folder is put back first."""
    parent, prefix = os.path.dirname(os.path.abspath(target)), staging_prefix(target)
    try:
        names = sorted(os.listdir(parent), key=lambda name: not name.endswith(PREVIOUS_SUFFIX))
    except FileNotFoundError:
        return
    for name in names:
        owner = _owner(name, prefix)
        if owner is None or not _process_is_gone(*owner):
            continue
        path = os.path.join(parent, name)
        if name.endswith(PREVIOUS_SUFFIX) and not os.path.lexists(target):
            os.rename(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)


def staging_name(target: str | os.PathLike, pid: int | None = None) -> str:
    """A new staging folder name for `target`, of process `pid` (this one by default) of this machine."""
    return f"{staging_prefix(target)}{_HOST}-{os.getpid() if pid is None else pid}-{secrets.token_hex(4)}"


def make_staging(target: str | os.PathLike) -> str:
    """Create an empty staging folder beside `target` (after removing stale ones) and return its path. It gets
    `mkdir`'s usual mode (0777 less the umask), not `mkdtemp`'s 0700."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(target)
    while True:
        path = os.path.join(parent, staging_name(target))
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def usual_modes(folder: str | os.PathLike) -> None:
    """Give the files written under `folder` the mode `open()` gives under the umask (safetensors writes 0600, so
    other users of a shared machine could not read the weights). Hard-linked files are left alone: their mode is
    shared with the folder they are linked from."""
    mask = _umask()
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
                executable = info.st_mode & 0o111
                os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def _umask() -> int:
    """The process's umask (read by setting it, the only portable way, and putting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def keep_existing(target: str | os.PathLike, staging: str | os.PathLike) -> None:
    """Carry what `target` holds and the new save did not write into `staging` (hard links: no copy of the
    weights), as saving into an existing folder keeps other files (a processor, notes, a sub-folder). Weight files
    the new save replaces as a set (old shards, an old index) are dropped, so the folder never mixes two saves."""
    if not os.path.isdir(target):
        return
    written = set(os.listdir(staging))
    replaced = {match[1] for match in map(_WEIGHTS.fullmatch, written) if match}
    for name in os.listdir(target):
        weights = _WEIGHTS.fullmatch(name)
        if name in written or (weights and weights[1] in replaced) or _owner(name) is not None:
            continue
        link_or_copy(os.path.join(target, name), os.path.join(staging, name))


def link_or_copy(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Hard-link a file (the same bytes and mode, no copy) or copy what cannot be linked; folders recursively."""
    if os.path.isdir(source) and not os.path.islink(source):
        shutil.copytree(source, destination, symlinks=True, copy_function=link_or_copy)
        return
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def commit_staging(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the complete `staging` folder at `target`. An existing `target` is swapped out in one atomic exchange
    where the system has one (Linux); elsewhere by two renames, which `remove_stale_staging` completes after a kill
    between them. A replaced folder's own mode is kept (as saving into an existing folder keeps it)."""
    staging, target = os.fspath(staging), os.fspath(target)
    if not os.path.isdir(target):
        os.rename(staging, target)
        return
    os.chmod(staging, stat.S_IMODE(os.stat(target).st_mode))
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now the old folder
        return
    previous = staging + PREVIOUS_SUFFIX
    os.rename(target, previous)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(previous, target)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def discard_staging(staging: str | os.PathLike) -> None:
    """Remove a staging folder whose save failed (the target stays as it was)."""
    shutil.rmtree(staging, ignore_errors=True)


def _exchange(first: str, second: str) -> bool:
    """Swap two paths atomically with Linux's `renameat2(RENAME_EXCHANGE)`; False where it is unavailable (another
    system, an old kernel or C library, a file system without it)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), second)


__all__ = [
    "commit_staging",
    "discard_staging",
    "is_own_staging",
    "keep_existing",
    "link_or_copy",
    "make_staging",
    "remove_stale_staging",
    "staging_name",
    "staging_prefix",
    "usual_modes",
]
