"""Files and directories switched into place whole, and fsynced: what a kill or a power cut cannot break.

A writer makes its new version in a hidden staging directory beside the target
(``.<name>.rayudf-tmp-<token>``), holding an ``flock`` on it while it lives, fsyncs it, and switches
it in whole: one ``renameat2(RENAME_EXCHANGE)`` where the system has it, else two renames through a
hidden backup (``.<name>.rayudf-old-<token>``). The old version ends up in the staging directory and
goes with it. :func:`recover`, which every load and save of a path runs first, puts right what a
writer that died left: a backup with no target is renamed back, any other backup and every staging
directory nobody holds a lock on (the kernel drops the lock of a dead process) are removed. A live
writer's leftovers, in this process or another, are left alone.

Example:
    >>> import pathlib, tempfile
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "out"
    >>> with staging(target) as stage:
    ...     _ = stage.new.write_text("v1")
    ...     stage.swap_in()
    >>> target.read_text(), leftovers(target)
    ('v1', [])
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# The hidden leftovers of a writer, beside its target: .<name>.rayudf-<kind>-<token>.
_MARK = ".rayudf-"
TMP = "tmp"  # a writer's staging directory (the new version inside), locked while the writer lives
OLD = "old"  # the old version, moved aside by a fallback swap: the one leftover that may be restored
# Enough hex digits of a uuid4 that two writers of one target never draw the same token.
_TOKEN_CHARS = 12
# A claim of a staging directory fails only when another process's recover removed it between its
# mkdir and its lock; that twice in a row is no race but something else, and is an error.
_CLAIM_ATTEMPTS = 3

# renameat2(2), from libc: paths relative to the working directory, and its flags.
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
# What renameat2 answers where the kernel or the filesystem cannot do a flag: the caller falls back.
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def _libc_renameat2() -> Callable[..., int] | None:
    try:
        call = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not glibc >= 2.28 (macOS, musl before 1.2.5, Windows)
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    call.restype = ctypes.c_int
    return call


_RENAMEAT2 = _libc_renameat2()  # looked up once; None where libc has none


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2) of ``src`` to ``dst``: True when done, False when this system cannot (the caller falls back)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def hidden(target: Path, kind: str, token: str) -> Path:
    """The name of a writer's leftover of ``kind`` (TMP or OLD) beside ``target``.

    Example:
        >>> hidden(Path("data/out"), TMP, "ab12")
        PosixPath('data/.out.rayudf-tmp-ab12')
    """
    return target.with_name(f".{target.name}{_MARK}{kind}-{token}")


def _leftover_kinds(target: Path) -> dict[tuple[str, str], Path]:
    """The leftovers beside ``target`` by (kind, token)."""
    try:
        names = os.listdir(target.parent)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    prefix = f".{target.name}{_MARK}"
    found = {}
    for name in names:
        kind, _, token = name[len(prefix):].partition("-") if name.startswith(prefix) else ("", "", "")
        if kind in (TMP, OLD) and token:
            found[kind, token] = target.with_name(name)
    return found


def leftovers(target: str | os.PathLike) -> list[Path]:
    """The hidden leftovers of writers beside ``target`` (staging directories, backups), sorted."""
    return sorted(_leftover_kinds(Path(target)).values())


# -- fsync -----------------------------------------------------------------------------------


def sync_file(path: str | os.PathLike) -> None:
    """fsync ``path``: its bytes on disk (for a directory: its entries, so the renames into it outlast a power cut)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


sync_directory = sync_file  # the same call: a directory's entries are its contents


def sync_tree(path: str | os.PathLike) -> None:
    """fsync a file, or a directory's every file and then every directory, deepest first."""
    if not os.path.isdir(path) or os.path.islink(path):
        sync_file(path)
        return
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            sync_file(os.path.join(root, name))
        sync_directory(root)


def _make_dirs(directory: Path) -> None:
    """``mkdir -p`` whose new directories outlast a power cut: each is fsynced into its parent."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for made in reversed(missing):
        made.mkdir(exist_ok=True)
        sync_directory(made.parent)


# -- removal and recovery --------------------------------------------------------------------


def _gone_already(function: object, path: str, exc_info: tuple) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):  # another process removing the same leftover is no error
        raise exc_info[1]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, onerror=_gone_already)
    else:
        path.unlink(missing_ok=True)


def _discard(backup: Path, target: Path) -> None:
    """Remove a backup: renamed to a staging name first, so that a kill part way through never leaves a
    part of an old version under the one name :func:`recover` restores."""
    doomed = hidden(target, TMP, uuid.uuid4().hex[:_TOKEN_CHARS])
    try:
        os.rename(backup, doomed)
    except FileNotFoundError:
        return  # another process's recover took it
    _remove(doomed)


def _lock(path: Path) -> int | None:
    """A descriptor of ``path`` holding its exclusive ``flock``, or None when someone else holds it.
    Raises FileNotFoundError when ``path`` is gone."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _restore(backup: Path, target: Path) -> None:
    """Rename ``backup`` back to ``target`` unless something is there already (then it is discarded)."""
    try:
        if not _renameat2(backup, target, _RENAME_NOREPLACE):
            if os.path.lexists(target):
                raise FileExistsError(errno.EEXIST, "exists", str(target))
            os.rename(backup, target)
    except FileExistsError:
        _discard(backup, target)
    except FileNotFoundError:
        pass  # another process's recover restored it


def recover(target: str | os.PathLike) -> None:
    """Put right what writers of ``target`` that died left beside it (see the module's docstring).

    A half-done fallback swap (no target, its backup there) is undone; a finished one's backup and
    dead writers' staging directories are removed. A staging directory whose writer lives (its
    ``flock`` held) is left alone, and so is that writer's backup. Costs one ``listdir`` when there is
    nothing to do.

    Example:
        >>> import pathlib, tempfile
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "out"
        >>> _ = hidden(target, OLD, "dead1").write_text("old rows")   # a swap killed half way
        >>> recover(target)
        >>> target.read_text(), leftovers(target)
        ('old rows', [])
    """
    target = Path(target)
    found = _leftover_kinds(target)
    if not found:
        return
    dead: dict[str, int] = {}  # token -> the lock held on that dead writer's staging directory, until it is removed
    live: set[str] = set()
    try:
        for (kind, token), path in found.items():
            if kind == TMP:
                try:
                    lock = _lock(path)
                except FileNotFoundError:
                    continue
                if lock is None:
                    live.add(token)
                else:
                    dead[token] = lock
        for (kind, token), path in sorted(found.items()):
            if kind == OLD and token not in live:
                _restore(path, target)
        for token in dead:
            _remove(found[TMP, token])
    finally:
        for lock in dead.values():
            os.close(lock)
    sync_directory(target.parent)


# -- writing ---------------------------------------------------------------------------------


class Staging:
    """One writer's hidden staging directory beside ``target``, locked while the writer lives."""

    def __init__(self, target: Path, path: Path, token: str, lock: int) -> None:
        self.target = target
        self.path = path  # the staging directory: .<name>.rayudf-tmp-<token>
        self.new = path / target.name  # where the writer puts its new version (a file or a directory)
        self._token = token  # names this writer's backup, so recover pairs the two
        self._lock = lock  # a descriptor of path holding its flock: recover leaves path alone while it is held

    @classmethod
    def claim(cls, target: Path) -> Staging:
        """A new staging directory for ``target``, its lock held (its parent directory made if missing)."""
        _make_dirs(target.parent)
        for _ in range(_CLAIM_ATTEMPTS):
            token = uuid.uuid4().hex[:_TOKEN_CHARS]
            path = hidden(target, TMP, token)
            path.mkdir()
            try:
                lock = _lock(path)
            except FileNotFoundError:
                continue
            if lock is None:
                continue
            # Another process's recover may have removed the directory between mkdir and lock: the lock
            # counts only if it is on the directory still at that name.
            held, now = os.fstat(lock), _stat(path)
            if now is not None and (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                return cls(target, path, token, lock)
            os.close(lock)
        raise OSError(errno.EAGAIN, f"could not claim a staging directory beside {target} in {_CLAIM_ATTEMPTS} attempts")

    def swap_in(self) -> None:
        """Switch :attr:`new`, fsynced, in at the target whole: readers see the old version or the new.

        A file over a file (or over nothing) is one ``rename``; where a directory is involved, one
        ``RENAME_EXCHANGE``, else the fallback: target -> backup, new -> target, backup -> here. The
        old version is left in the staging directory, removed with it by :meth:`close`.
        """
        new, target = self.new, self.target
        sync_tree(new)
        if not os.path.lexists(target) or not (os.path.isdir(target) or os.path.isdir(new)):
            os.replace(new, target)
        elif not _renameat2(new, target, _RENAME_EXCHANGE):
            backup = hidden(target, OLD, self._token)
            os.rename(target, backup)  # killed after this: no target; recover renames the backup back
            os.rename(new, target)  # killed after this: recover discards the backup
            sync_directory(target.parent)
            os.rename(backup, new)  # now only a staging directory holds the old version
        sync_directory(target.parent)

    def add(self, made: Path, dest: Path) -> None:
        """Move the finished file ``made`` (in the staging directory) to ``dest`` (inside the target),
        fsynced: readers see all of the file or none of it."""
        sync_file(made)
        _make_dirs(dest.parent)
        os.rename(made, dest)
        sync_directory(dest.parent)

    def close(self) -> None:
        """Remove the staging directory and what is left in it (an old version, a failed write)."""
        try:
            _remove(self.path)
        finally:
            os.close(self._lock)


@contextmanager
def staging(target: str | os.PathLike) -> Iterator[Staging]:
    """A writer of ``target``: :func:`recover` first, then a :class:`Staging` removed when the block ends
    (after :meth:`Staging.swap_in`, or after an error, leaving the target as it was).

    Example:
        >>> import pathlib, tempfile
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "parts"
        >>> with staging(target) as stage:
        ...     stage.new.mkdir()
        ...     _ = (stage.new / "part-0.csv").write_text("x\\n1\\n")
        ...     stage.swap_in()
        >>> sorted(p.name for p in target.iterdir())
        ['part-0.csv']
    """
    target = Path(target)
    recover(target)
    stage = Staging.claim(target)
    try:
        yield stage
    finally:
        stage.close()
