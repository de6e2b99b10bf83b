"""Atomic file writes: a stage's output appears complete or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator


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


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def leftover_temp_files(path: str | os.PathLike) -> list[Path]:
    """The temp files that killed writers of ``path`` left behind (never read by a stage)."""
    path = Path(path)
    return sorted(path.parent.glob(f"{_temp_prefix(path)}*"))


class AtomicFile:
    """A file written under a hidden temp name beside ``path`` (``.name.tmp-*``, which no stage
    reads) and renamed onto ``path`` by :meth:`commit`. Every writer of the pipeline goes through
    it: a kill at any moment leaves ``path`` as it was, or complete.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(self.path), dir=self.path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        self.tmp = Path(tmp)

    def commit(self) -> None:
        """Sync the temp file, rename it onto the target, and sync the folder (the rename)."""
        fsync_path(self.tmp)
        os.replace(self.tmp, self.path)
        try:
            fsync_path(self.path.parent)
        except OSError:  # some filesystems refuse to fsync a folder
            pass

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed (a kill leaves it behind under its
    hidden name) and ``path`` is untouched.
    """
    out = AtomicFile(path)
    try:
        yield out.tmp
        out.commit()
    except BaseException:
        out.abort()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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

    Every file is written and synced under a temp name first; then they are renamed into
    place in the given order, so the last one can serve as the unit's commit record. If a
    rename fails, the files already replaced get their previous contents back (hard-linked
    aside before the first rename). A kill during the renames can still leave a mix; readers
    detect it through the record written last (see ``split.load_split_dir``).
    """
    staged: list[tuple[AtomicFile, Path | None]] = []  # (the new file, a backup of the old target)
    done: list[tuple[Path, Path | None]] = []
    try:
        for target, text in files.items():
            out = AtomicFile(target)
            staged.append((out, _link_aside(out.path)))
            out.tmp.write_text(text, encoding="utf-8", newline="")
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
