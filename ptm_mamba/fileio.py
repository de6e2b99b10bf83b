"""Atomic file writes: a stage's output appears complete or not at all."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import urllib.error
from pathlib import Path
from typing import Iterator

from .errors import PipelineError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteError(PipelineError, OSError):
    """A file that could not be written, as one line with the free space (the CLI exits 2). An
    OSError, so ``except OSError`` around optional files still works."""

    reason = ""  # "no space left on device"
    free = ""  # "12.0 KiB free on /scratch", when the write failed


_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
_HDF5_ERRNO = re.compile(r"\berrno = (\d+)")  # HDF5 reports the system error inside its message
_LOW_SPACE = 2**20  # an unexplained write failure with less free space than this is a full disk
# OSErrors raised inside a writer that are not about the file written (a download's network)
_NOT_WRITING = (urllib.error.URLError, TimeoutError, ConnectionError)


def _human(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024:
            break
    return f"{n:.1f} {unit}"


def free_space(path: str | os.PathLike) -> tuple[int, Path] | None:
    """(free bytes, mount point) of the file system ``path`` is (or would be) on; None if unknown."""
    try:
        where = Path(os.path.abspath(path))
        while not where.exists() and where != where.parent:
            where = where.parent
        free = shutil.disk_usage(where).free
        mount = where
        while not os.path.ismount(mount) and mount != mount.parent:
            mount = mount.parent
        return free, mount
    except OSError:
        return None


def _describe_free(path: str | os.PathLike) -> str:
    free = free_space(path)
    return "free space unknown" if free is None else f"{_human(free[0])} free on {free[1]}"


def _errno_of(exc: OSError) -> int | None:
    if exc.errno:
        return exc.errno
    found = _HDF5_ERRNO.search(str(exc))
    return int(found.group(1)) if found else None


def _flat(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _reason(exc: OSError, path: str | os.PathLike | None) -> str:
    """How ``exc`` reads in a one-line error: "no space left on device", "Permission denied" ...
    An error without errno or OS words (HDF5's) while ``path``'s file system is all but full is a
    full disk."""
    if isinstance(exc, WriteError):
        return exc.reason
    code = _errno_of(exc)
    words = os.strerror(code) if code else ""
    raw = exc.strerror if isinstance(exc.strerror, str) else None
    text = raw if raw and "\n" not in raw else None  # the OS's words, not a library's report
    if text is None and code is None and path is not None:  # HDF5 may leave errno unset: look at the disk
        free = free_space(path)
        if free is not None and free[0] < _LOW_SPACE:
            code, words = errno.ENOSPC, os.strerror(errno.ENOSPC)
    if code in _FULL:  # "No space left on device (injected)" -> "no space left on device (injected)"
        reason = _FULL[code] + (text[len(words):] if text and text.startswith(words) else "")
    elif text:
        reason = text
    elif words:
        reason = words
    else:
        reason = raw or str(exc) or type(exc).__name__
    return _flat(reason)


def write_error(path: str | os.PathLike, exc: OSError) -> WriteError:
    """``exc``, raised while writing ``path``, as one line: ``PATH: REASON (N KiB free on MOUNT)``."""
    if isinstance(exc, WriteError) and str(exc).startswith(f"{path}: "):
        return exc
    reason = _reason(exc, path)
    free = exc.free if isinstance(exc, WriteError) else _describe_free(path)
    err = WriteError(f"{path}: {reason} ({free})")
    err.reason, err.free = reason, free
    err.errno = _errno_of(exc) or (errno.ENOSPC if reason.startswith(_FULL[errno.ENOSPC]) else None)
    return err


def os_error_line(exc: OSError) -> str:
    """An OSError that reached the CLI, as one line."""
    if isinstance(exc, WriteError):
        return str(exc)
    where = exc.filename
    reason = _reason(exc, where)
    if where is not None and (_errno_of(exc) in _FULL or reason.startswith(tuple(_FULL.values()))):
        reason += f" ({_describe_free(where)})"
    return f"{where}: {reason}" if where is not None else reason


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def leftover_temp_files(path: str | os.PathLike) -> list[Path]:
    """The temp files that killed writers of ``path`` left behind (never read by a stage)."""
    path = Path(path)
    return sorted(path.parent.glob(f"{_temp_prefix(path)}*"))


class AtomicFile:
    """A file written under a hidden temp name (``.name.tmp-*``) and renamed onto ``path`` by
    :meth:`commit`: a kill leaves ``path`` as it was, or complete."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(self.path), dir=self.path.parent)
        except OSError as exc:
            raise write_error(self.path, exc) from None
        os.close(fd)
        self.tmp = Path(tmp)
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        except OSError as exc:
            self.abort()
            raise write_error(self.path, exc) from None

    def error(self, exc: BaseException) -> BaseException:
        """Remove the temp file; return ``exc`` as the error to raise (a file's OSError as :class:`WriteError`)."""
        if isinstance(exc, OSError) and not isinstance(exc, _NOT_WRITING):
            exc = write_error(self.path, exc)  # the free space as it was, before the temp file goes
        self.abort()
        return exc

    def commit(self) -> None:
        """Sync, rename onto the target and sync the folder; on failure the target is untouched."""
        try:
            fsync_path(self.tmp)  # a file system that allocates late (NFS, XFS) reports a full disk here
            os.replace(self.tmp, self.path)
        except OSError as exc:
            raise self.error(exc) from None
        try:
            fsync_path(self.path.parent)
        except OSError:  # some filesystems refuse to fsync a folder
            pass

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success, else remove it."""
    out = AtomicFile(path)
    try:
        yield out.tmp
        out.commit()
    except OSError as exc:  # a full disk, a quota, an I/O error: one line naming ``path``
        error = out.error(exc)
        if error is exc:
            raise
        raise error from None
    except BaseException:
        out.abort()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: str | os.PathLike, missing: str):
    """A JSON file's value; a missing file is a one-line error that says ``missing`` (what to do),
    an unreadable or invalid one says why."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: {missing}") from None
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: unreadable ({exc})") from None


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _link_aside(path: Path) -> Path | None:
    """A hard link to the current ``path`` (None if there is none), to put it back from."""
    if not path.exists():
        return None
    backup = path.with_name(f".{path.name}.old-{os.getpid()}")
    backup.unlink(missing_ok=True)
    os.link(path, backup)
    return backup


def write_together(files: dict[str | os.PathLike, str]) -> None:
    """Write several text files as one unit: all of them, or (on any error) none.

    Renamed in the given order, so the last is the unit's commit record; a failed rename restores
    the files already replaced. A kill during the renames can leave a mix, which readers detect
    through the record (``split.load_split_dir``).
    """
    staged: list[tuple[AtomicFile, Path | None]] = []  # (the new file, a backup of the old target)
    done: list[tuple[Path, Path | None]] = []
    try:
        for target, text in files.items():
            out = AtomicFile(target)
            staged.append((out, _link_aside(out.path)))
            try:
                out.tmp.write_text(text, encoding="utf-8", newline="")
            except OSError as exc:
                raise out.error(exc) from None
        for out, backup in staged:
            out.commit()
            done.append((out.path, backup))
    except BaseException:
        for target, backup in reversed(done):
            if backup is not None:
                os.replace(backup, target)
            else:
                target.unlink(missing_ok=True)
        raise
    finally:
        for out, backup in staged:
            out.abort()
            if backup is not None:
                backup.unlink(missing_ok=True)
