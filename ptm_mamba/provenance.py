"""Where a training run came from: data, ESM-2 weights, code, packages, machine.

:func:`provenance` gathers it as a JSON-plain dict; :func:`write_provenance` puts it in
``provenance.json`` beside the run's ``config.yaml``. Nothing here fails for want of git, a GPU
or an optional package: what cannot be found is recorded as ``null``.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

from .fileio import atomic_write_json
from .guard import run_record
from .layout import PROVENANCE_FILE
from .settings import Settings
from .esm_weights import esm_identity, esm_sha256
from .hashing import file_sha256

PACKAGES = ("ptm-mamba", "torch", "mamba-ssm", "fair-esm", "snakemake", "accelerate")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions (None for a package that is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(folder: str | os.PathLike = Path(__file__).parent) -> dict[str, object] | None:
    """The commit of the git checkout holding ``folder`` and whether it has uncommitted changes;
    None when there is no git or no checkout (an installed wheel)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        git("ls-files", "--error-unmatch", "__init__.py")  # the package's own checkout, not one around a venv
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_names() -> list[str]:
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def count_rows(path: str | os.PathLike) -> int | None:
    """Data rows of a CSV (blank lines aside); None when the file is missing."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return max(0, sum(1 for row in csv.reader(fh) if any(cell.strip() for cell in row)) - 1)
    except FileNotFoundError:
        return None


def provenance(settings: Settings, runtime: dict | None = None) -> dict:
    """The provenance of a run made with ``settings``; ``runtime`` says what ran where
    (:func:`ptm_mamba.device.describe`, precision, kernels)."""
    data, model = settings.dataset.dataset_location, settings.esm.model
    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": {"path": str(data), "sha256": file_sha256(data), "rows": count_rows(data),
                    "source": settings.lookup("dataset.source")},
        "esm": {"model": model, "identity": esm_identity(model), "sha256": esm_sha256(model)},
        "code": git_commit(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "gpus": gpu_names(),
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
        "runtime": runtime,
        **run_record(settings),  # whose run this is: the project folder and every stage's settings
    }


def write_provenance(settings: Settings, run_dir: str | os.PathLike, runtime: dict | None = None) -> Path:
    """Write ``provenance.json`` into the run folder (atomically); return its path."""
    path = Path(run_dir) / PROVENANCE_FILE
    atomic_write_json(path, provenance(settings, runtime))
    return path
