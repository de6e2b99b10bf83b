"""Content hashes of bytes and files, as every identity in the pipeline is written (``sha256:<hex>``).

The hash of a large file (ESM-2 weights, GBs) is asked for by every Snakemake parse and every job,
so it is kept in a user cache keyed by the file's stat; :func:`lock` serialises the read-modify-write
of such user-wide records.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_HASH_BLOCK = 1 << 22
_CACHE_FROM_BYTES = 64 << 20  # hashes of larger files are kept, keyed by stat


def cache_dir() -> Path:
    """The user's cache folder of this project (``$XDG_CACHE_HOME/ptm-mamba``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ptm-mamba"


def _hash_cache_path() -> Path:
    return cache_dir() / "sha256.json"


def sha256_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def file_sha256(path: str | os.PathLike) -> str | None:
    """``sha256:<hex>`` of a file's bytes (None when it does not exist).

    A large file's hash is cached by (path, size, mtime, inode); the cache is only an accelerator:
    an unreadable or unwritable cache means hashing again.
    """
    from .fileio import atomic_write_json

    path = Path(path).expanduser()
    if not path.is_file():
        return None
    st = path.stat()
    key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]
    cached: dict = {}
    if st.st_size >= _CACHE_FROM_BYTES:
        try:
            cached = json.loads(_hash_cache_path().read_text())
            if cached.get(key, {}).get("stat") == stamp:
                return cached[key]["sha256"]
        except (OSError, ValueError, AttributeError):
            cached = {}
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    value = f"sha256:{digest.hexdigest()}"
    if st.st_size >= _CACHE_FROM_BYTES:
        try:
            atomic_write_json(_hash_cache_path(), {**cached, key: {"stat": stamp, "sha256": value}})
        except OSError:
            pass
    return value


def lock(path: Path):
    """An advisory lock held on ``path``.lock until the returned file is closed (None, and no lock,
    where locks are unavailable)."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path.with_name(f"{path.name}.lock"), "a")
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX)
    except OSError:
        pass
    return fh
